-- Per provider: how many models it served, requests, tokens, cost, latency and rates.
-- From the rollups (rollup_parts.sql); cost is null when no call could be priced.
SELECT
    provider,
    uniqExact(p.model) AS models,
    sum(p.requests) AS requests,
    sum(p.errors) AS errors,
    sum(p.input_tokens) AS input_tokens,
    sum(p.output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    if(sum(p.priced) = 0, NULL, sum(p.cost)) AS cost,
    sum(p.unpriced) AS unpriced_requests,
    sum(p.latency_ms_sum) / requests AS avg_latency_ms,
    (requests - errors) / requests AS success_rate,
    errors / requests AS error_rate
{% with need = ['requests', 'errors', 'input_tokens', 'output_tokens', 'priced', 'cost',
                'unpriced', 'latency_ms_sum'] %}
FROM {% include "rollup_parts" %} AS p
{% endwith %}
GROUP BY provider
ORDER BY cost DESC, requests DESC, provider
