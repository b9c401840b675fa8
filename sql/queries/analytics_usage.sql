-- Usage over the range: the totals (one row, even with no calls), or per model and
-- provider when rendered with by_model.
SELECT
{% if by_model %}
    model,
    provider,
{% endif %}
    count() AS requests,
    countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    -- No calls cost 0; calls none of which could be priced have an unknown cost.
    if(requests = 0, 0, sum(cost_total)) AS cost,
    countIf(unpriced) AS unpriced_requests,
    countIf(usage_missing) AS usage_missing_requests
FROM calls
{% include "_filters" %}
{% if by_model %}
GROUP BY model, provider
ORDER BY cost DESC, requests DESC, model
{% endif %}
