-- Latency, time to first token and throughput over the range (one row). Throughput in
-- tokens counts successful calls with known usage only: output tokens per second of
-- their latency. requests_per_minute spreads every call over the whole range.
WITH status = 'ok' AND NOT usage_missing AS measured
SELECT
    count() AS requests,
    avg(latency_ms) AS avg_latency_ms,
    quantile(0.5)(latency_ms) AS p50_latency_ms,
    quantile(0.95)(latency_ms) AS p95_latency_ms,
    quantile(0.99)(latency_ms) AS p99_latency_ms,
    avg(ttft_ms) AS avg_ttft_ms,
    quantile(0.5)(ttft_ms) AS p50_ttft_ms,
    quantile(0.95)(ttft_ms) AS p95_ttft_ms,
    sumIf(output_tokens, measured) * 1000 / nullIf(sumIf(latency_ms, measured), 0)
        AS output_tokens_per_second,
    requests / {range_minutes:Float64} AS requests_per_minute
FROM calls
{% include "_filters" %}
