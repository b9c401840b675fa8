-- Per model and provider: requests, errors, tokens, cost and latency over the range, and
-- rolling 24h / 7d / 30d requests, tokens and cost whatever the range. One scan from the
-- earliest cutoff these need ({since}); the in_* flags mark each window's rows.
-- cost is null when none of the calls it sums could be priced (unknown, never $0);
-- a rolling window without calls cost 0. total_tokens = input + output (the other
-- token counts are subsets of those two).
WITH
    ts_end >= {range_since:DateTime64(3, 'UTC')} AS in_range,
    ts_end >= {since_24h:DateTime64(3, 'UTC')} AS in_24h,
    ts_end >= {since_7d:DateTime64(3, 'UTC')} AS in_7d,
    ts_end >= {since_30d:DateTime64(3, 'UTC')} AS in_30d
SELECT
    model,
    provider,
    countIf(in_range) AS requests,
    countIf(in_range AND status != 'ok') AS errors,
    sumIf(input_tokens, in_range) AS input_tokens,
    sumIf(output_tokens, in_range) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    sumIf(cached_input_tokens, in_range) AS cached_input_tokens,
    sumIf(reasoning_tokens, in_range) AS reasoning_tokens,
    sumIf(cost_total, in_range) AS cost,
    countIf(in_range AND unpriced) AS unpriced_requests,
    countIf(in_range AND usage_missing) AS usage_missing_requests,
    avgIf(latency_ms, in_range) AS avg_latency_ms,
    quantileIf(0.95)(latency_ms, in_range) AS p95_latency_ms,
    quantileIf(0.99)(latency_ms, in_range) AS p99_latency_ms,
    errors / requests AS error_rate,
    countIf(in_range AND status = 'ok') / requests AS success_rate,
    countIf(in_24h) AS requests_24h,
    sumIf(calls.input_tokens + calls.output_tokens, in_24h) AS tokens_24h,
    if(requests_24h = 0, 0, sumIf(cost_total, in_24h)) AS cost_24h,
    countIf(in_7d) AS requests_7d,
    sumIf(calls.input_tokens + calls.output_tokens, in_7d) AS tokens_7d,
    if(requests_7d = 0, 0, sumIf(cost_total, in_7d)) AS cost_7d,
    countIf(in_30d) AS requests_30d,
    sumIf(calls.input_tokens + calls.output_tokens, in_30d) AS tokens_30d,
    if(requests_30d = 0, 0, sumIf(cost_total, in_30d)) AS cost_30d
FROM calls
{% include "_filters" %}
GROUP BY model, provider
HAVING requests > 0
ORDER BY cost DESC, requests DESC, model
