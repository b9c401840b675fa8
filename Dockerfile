# One image for every llmtap process; docker-compose.yml picks the subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LLMTAP_DATA_DIR=/data

WORKDIR /app
# What `pip install .` builds from, and nothing else: the directory the image is built
# from is the compose file's, where a `.env` (provider keys, CLICKHOUSE_PASSWORD), a
# config file with secrets or a client key may be kept; `COPY . .` put them in a layer.
COPY pyproject.toml README.md ./
COPY llmtap ./llmtap
COPY ingress ./ingress
COPY stream ./stream
COPY sinks ./sinks
COPY sql ./sql
# tini as PID 1, llmtap its child, wherever the image runs (compose, `docker run`,
# Kubernetes): as PID 1 a process ignores a signal it has no handler for yet, so a SIGTERM
# during the first second's imports was dropped and the stop waited out its grace.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin llmtap \
    && mkdir -p /data /keys \
    && chown llmtap:llmtap /data /keys

USER llmtap
EXPOSE 8080 8081 8082
ENTRYPOINT ["tini", "--"]
CMD ["llmtap", "up"]
