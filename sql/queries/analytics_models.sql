-- Per model: requests, errors, tokens, cost and latency over a time range.
SELECT
    model,
    provider,
    count() AS requests,
    countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(cost_total) AS cost,
    countIf(unpriced) AS unpriced_requests,
    countIf(usage_missing) AS usage_missing_requests,
    avg(latency_ms) AS avg_latency_ms,
    quantile(0.95)(latency_ms) AS p95_latency_ms
FROM calls
WHERE ts_end >= {since:DateTime64(3, 'UTC')}
{% if provider %}
  AND provider = {provider:String}
{% endif %}
GROUP BY model, provider
ORDER BY cost DESC, requests DESC, model
