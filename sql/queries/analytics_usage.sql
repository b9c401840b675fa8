-- Usage over the range: the totals (one row, even with no calls), or per model and
-- provider when rendered with by_model. From the rollups (rollup_parts.sql).
SELECT
{% if by_model %}
    model,
    provider,
{% endif %}
    sum(p.requests) AS requests,
    sum(p.errors) AS errors,
    sum(p.input_tokens) AS input_tokens,
    sum(p.output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    sum(p.cached_input_tokens) AS cached_input_tokens,
    sum(p.reasoning_tokens) AS reasoning_tokens,
    -- No calls cost 0; calls none of which could be priced have an unknown cost.
    multiIf(requests = 0, toDecimal128(0, 9), sum(p.priced) = 0, NULL, sum(p.cost)) AS cost,
    sum(p.unpriced) AS unpriced_requests,
    sum(p.usage_missing) AS usage_missing_requests
{% with need = ['requests', 'errors', 'input_tokens', 'output_tokens', 'cached_input_tokens',
                'reasoning_tokens', 'priced', 'cost', 'unpriced', 'usage_missing'] %}
FROM {% include "rollup_parts" %} AS p
{% endwith %}
{% if by_model %}
GROUP BY model, provider
ORDER BY cost DESC, requests DESC, model, provider
LIMIT {limit:UInt32}
{% endif %}
