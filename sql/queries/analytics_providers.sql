-- Per provider: how many models it served, requests, tokens, cost, latency and rates.
SELECT
    provider,
    uniqExact(model) AS models,
    count() AS requests,
    countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    sum(cost_total) AS cost,
    countIf(unpriced) AS unpriced_requests,
    avg(latency_ms) AS avg_latency_ms,
    countIf(status = 'ok') / requests AS success_rate,
    errors / requests AS error_rate
FROM calls
{% include "_filters" %}
GROUP BY provider
ORDER BY cost DESC, requests DESC, provider
