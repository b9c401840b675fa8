-- Per model and provider: requests, errors, tokens, cost and latency over the range
-- (calls that ended since {range_since}), and the rolling 24h / 7d / 30d requests,
-- tokens and cost whatever the range (since {since_24h}, {since_7d}, {since_30d}).
-- Each is one read of the rollups (rollup_parts.sql), joined by model and provider; the
-- window that is the range (`range_name`, when given) is the range's read, not another.
-- cost is null when none of the calls it sums could be priced (unknown, never $0);
-- a rolling window without calls cost 0. total_tokens = input + output (the other
-- token counts are subsets of those two). p95/p99 are t-digest estimates.
SELECT
    r.model AS model,
    r.provider AS provider,
    r.requests AS requests,
    r.errors AS errors,
    r.input_tokens AS input_tokens,
    r.output_tokens AS output_tokens,
    r.input_tokens + r.output_tokens AS total_tokens,
    r.cached_input_tokens AS cached_input_tokens,
    r.reasoning_tokens AS reasoning_tokens,
    r.cost AS cost,
    r.unpriced_requests AS unpriced_requests,
    r.usage_missing_requests AS usage_missing_requests,
    r.avg_latency_ms AS avg_latency_ms,
    r.latency[2] AS p95_latency_ms,
    r.latency[3] AS p99_latency_ms,
    r.errors / r.requests AS error_rate,
    (r.requests - r.errors) / r.requests AS success_rate,
{% for window in ['24h', '7d', '30d'] %}
{% if window == range_name | default('') %}
    r.requests AS requests_{{ window }},
    r.input_tokens + r.output_tokens AS tokens_{{ window }},
    r.cost AS cost_{{ window }}{{ "," if not loop.last }}
{% else %}
    ifNull(w{{ window }}.requests, 0) AS requests_{{ window }},
    ifNull(w{{ window }}.tokens, 0) AS tokens_{{ window }},
    if(requests_{{ window }} = 0, 0, w{{ window }}.cost) AS cost_{{ window }}{{ "," if not loop.last }}
{% endif %}
{% endfor %}
FROM
(
    SELECT
        model,
        provider,
        sum(p.requests) AS requests,
        sum(p.errors) AS errors,
        sum(p.input_tokens) AS input_tokens,
        sum(p.output_tokens) AS output_tokens,
        sum(p.cached_input_tokens) AS cached_input_tokens,
        sum(p.reasoning_tokens) AS reasoning_tokens,
        if(sum(p.priced) = 0, NULL, sum(p.cost)) AS cost,
        sum(p.unpriced) AS unpriced_requests,
        sum(p.usage_missing) AS usage_missing_requests,
        sum(p.latency_ms_sum) / requests AS avg_latency_ms,
        quantilesTDigestMerge(0.5, 0.95, 0.99)(p.latency_ms_quantiles) AS latency
    {% with span = 'range_since',
            need = ['requests', 'errors', 'input_tokens', 'output_tokens', 'cached_input_tokens',
                    'reasoning_tokens', 'priced', 'cost', 'unpriced', 'usage_missing',
                    'latency_ms_sum', 'latency_ms_quantiles'] %}
    FROM {% include "rollup_parts" %} AS p
    {% endwith %}
    GROUP BY model, provider
    HAVING requests > 0
) AS r
{% for window in ['24h', '7d', '30d'] if window != range_name | default('') %}
LEFT JOIN
(
    SELECT
        model,
        provider,
        sum(p.requests) AS requests,
        sum(p.input_tokens + p.output_tokens) AS tokens,
        if(sum(p.priced) = 0, NULL, sum(p.cost)) AS cost
    {% with span = 'since_' ~ window,
            need = ['requests', 'input_tokens', 'output_tokens', 'priced', 'cost'] %}
    FROM {% include "rollup_parts" %} AS p
    {% endwith %}
    GROUP BY model, provider
) AS w{{ window }} ON w{{ window }}.model = r.model AND w{{ window }}.provider = r.provider
{% endfor %}
ORDER BY cost DESC, requests DESC, model
