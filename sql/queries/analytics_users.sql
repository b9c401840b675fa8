-- Per user (the attribution's user; '' for calls without one), costliest first.
-- Activity is by request start: first and last request, distinct UTC days with one.
-- Cost per request and per 1K tokens divide by the priced calls only (the others have
-- no known cost); both are null when no call was priced.
WITH cost_total IS NOT NULL AS priced
SELECT
    user,
    count() AS requests,
    countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    sum(cost_total) AS cost,
    countIf(unpriced) AS unpriced_requests,
    avg(latency_ms) AS avg_latency_ms,
    countIf(status = 'ok') / requests AS success_rate,
    errors / requests AS error_rate,
    uniqExact(model) AS unique_models,
    arraySort(groupUniqArray(provider)) AS providers,
    min(ts_start) AS first_request,
    max(ts_start) AS last_request,
    uniqExact(toDate(ts_start)) AS days_active,
    requests / days_active AS avg_requests_per_day,
    cost / nullIf(countIf(priced), 0) AS cost_per_request,
    cost * 1000 / nullIf(sumIf(calls.input_tokens + calls.output_tokens, priced), 0)
        AS cost_per_1k_tokens,
    max(calls.input_tokens + calls.output_tokens) AS max_tokens_per_request
FROM calls
{% include "_filters" %}
GROUP BY user
ORDER BY cost DESC, requests DESC, user
LIMIT {limit:UInt16}
