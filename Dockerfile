# One image for every llmtap process; docker-compose.yml picks the subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LLMTAP_DATA_DIR=/data

WORKDIR /app
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin llmtap \
    && mkdir -p /data /keys \
    && chown llmtap:llmtap /data /keys

USER llmtap
EXPOSE 8080 8081 8082
CMD ["llmtap", "up"]
