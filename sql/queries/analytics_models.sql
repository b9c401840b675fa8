-- Per model and provider: requests, errors, tokens, cost and latency over the range
-- (calls that ended since {range_since}), and the rolling 24h / 7d / 30d requests,
-- tokens and cost whatever the range (since {since_24h}, {since_7d}, {since_30d}).
-- Each is one read of the rollups (rollup_parts.sql), joined by model and provider; the
-- window that is the range (`range_name`, when given) is the range's read, not another.
-- The rows: every model seen in the range or a window. All of them run to now, so that
-- is the widest one's: the range's, or the 30d window's when the range is narrower (a
-- model with no call in the range then has requests 0, cost 0, and no latency or rates).
-- A window (`range_name` '', and `bounded` when it has an end) need not hold or be held by
-- the 30d window: its rows are the models of either.
-- cost is null when none of the calls it sums could be priced (unknown, never $0);
-- a range or window without calls cost 0. total_tokens = input + output (the other
-- token counts are subsets of those two). p95/p99 are t-digest estimates. At most
-- {limit} rows: model names are the callers' to choose.
{% set range_name = range_name | default('') %}
{% set rows_from = 'w30d' if range_name in ['24h', '7d'] else 'r' if range_name else 'k' %}
{% set no_calls = 'ifNull(r.requests, 0) = 0' %}
{% macro window_read(window) %}
    SELECT
        model,
        provider,
        sum(p.requests) AS requests,
        sum(p.input_tokens + p.output_tokens) AS tokens,
        if(sum(p.priced) = 0, NULL, sum(p.cost)) AS cost
    {% with span = 'since_' ~ window, bounded = false,
            need = ['requests', 'input_tokens', 'output_tokens', 'priced', 'cost'] %}
    FROM {% include "rollup_parts" %} AS p
    {% endwith %}
    GROUP BY model, provider
{% endmacro %}
{% macro range_read() %}
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
{% endmacro %}
SELECT
    {{ rows_from }}.model AS model,
    {{ rows_from }}.provider AS provider,
    ifNull(r.requests, 0) AS requests,
    ifNull(r.errors, 0) AS errors,
    ifNull(r.input_tokens, 0) AS input_tokens,
    ifNull(r.output_tokens, 0) AS output_tokens,
    ifNull(r.input_tokens + r.output_tokens, 0) AS total_tokens,
    ifNull(r.cached_input_tokens, 0) AS cached_input_tokens,
    ifNull(r.reasoning_tokens, 0) AS reasoning_tokens,
    if({{ no_calls }}, 0, r.cost) AS cost,
    ifNull(r.unpriced_requests, 0) AS unpriced_requests,
    ifNull(r.usage_missing_requests, 0) AS usage_missing_requests,
    if({{ no_calls }}, NULL, r.avg_latency_ms) AS avg_latency_ms,
    if({{ no_calls }}, NULL, r.latency[2]) AS p95_latency_ms,
    if({{ no_calls }}, NULL, r.latency[3]) AS p99_latency_ms,
    if({{ no_calls }}, NULL, r.errors / r.requests) AS error_rate,
    if({{ no_calls }}, NULL, (r.requests - r.errors) / r.requests) AS success_rate,
{% for window in ['24h', '7d', '30d'] %}
{% if window == range_name %}
    ifNull(r.requests, 0) AS requests_{{ window }},
    ifNull(r.input_tokens + r.output_tokens, 0) AS tokens_{{ window }},
    if({{ no_calls }}, 0, r.cost) AS cost_{{ window }}{{ "," if not loop.last }}
{% else %}
    ifNull(w{{ window }}.requests, 0) AS requests_{{ window }},
    ifNull(w{{ window }}.tokens, 0) AS tokens_{{ window }},
    if(requests_{{ window }} = 0, 0, w{{ window }}.cost) AS cost_{{ window }}{{ "," if not loop.last }}
{% endif %}
{% endfor %}
FROM
{% if rows_from == 'k' %}
(
    SELECT DISTINCT model, provider
    FROM
    (
        SELECT model, provider FROM
        (
{{ range_read() }}
        )
        UNION ALL
        SELECT model, provider FROM
        (
{{ window_read('30d') }}
            HAVING requests > 0
        )
    )
) AS k
LEFT JOIN
{% endif %}
{% if rows_from == 'w30d' %}
(
{{ window_read('30d') }}
    HAVING requests > 0
) AS w30d
LEFT JOIN
{% endif %}
(
{{ range_read() }}
) AS r
{% if rows_from != 'r' %}
ON r.model = {{ rows_from }}.model AND r.provider = {{ rows_from }}.provider
{% endif %}
{% for window in ['24h', '7d', '30d'] if window != range_name and 'w' ~ window != rows_from %}
LEFT JOIN
(
{{ window_read(window) }}
) AS w{{ window }}
    ON w{{ window }}.model = {{ rows_from }}.model AND w{{ window }}.provider = {{ rows_from }}.provider
{% endfor %}
ORDER BY requests = 0, cost DESC, requests DESC, model, provider
LIMIT {limit:UInt32}
