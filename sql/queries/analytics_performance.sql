-- Latency, time to first token and throughput over the range (one row), from the
-- rollups (rollup_parts.sql). Averages are exact; the p50/p95/p99 are t-digest
-- estimates (one merge each: identical aggregates are computed once). Throughput in
-- tokens counts successful calls with known usage only: output tokens per second of
-- their latency. requests_per_minute spreads every call over the whole range.
SELECT
    sum(p.requests) AS requests,
    sum(p.latency_ms_sum) / nullIf(requests, 0) AS avg_latency_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(p.latency_ms_quantiles)[1] AS p50_latency_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(p.latency_ms_quantiles)[2] AS p95_latency_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(p.latency_ms_quantiles)[3] AS p99_latency_ms,
    sum(p.ttft_ms_sum) / nullIf(sum(p.ttft_count), 0) AS avg_ttft_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(p.ttft_ms_quantiles)[1] AS p50_ttft_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(p.ttft_ms_quantiles)[2] AS p95_ttft_ms,
    sum(p.measured_output_tokens) * 1000 / nullIf(sum(p.measured_latency_ms_sum), 0)
        AS output_tokens_per_second,
    requests / {range_minutes:Float64} AS requests_per_minute
{% with by_model = false,
        need = ['requests', 'latency_ms_sum', 'latency_ms_quantiles', 'ttft_count', 'ttft_ms_sum',
                'ttft_ms_quantiles', 'measured_output_tokens', 'measured_latency_ms_sum'] %}
FROM {% include "rollup_parts" %} AS p
{% endwith %}
