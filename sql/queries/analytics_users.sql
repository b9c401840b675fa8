-- Per user (the attribution's user; '' for calls without one) of a tenant, costliest
-- first (a total order: `limit` users after the first `offset` are a page), from the
-- rollups that keep the user (rollup_parts.sql). Users exist within their tenant: two
-- tenants' `alice` are two rows, each saying its tenant. Activity is by request start:
-- first and last request, distinct UTC days with one (exact: the rollups keep the set
-- of days). Cost per request and per 1K tokens divide by the priced calls only (the
-- others have no known cost); both are null when no call was priced. Budget
-- rejections: calls refused because a hard-capped budget could not cover them.
SELECT
    user,
    p.tenant AS tenant,
    sum(p.requests) AS requests,
    sum(p.errors) AS errors,
    sum(p.input_tokens) AS input_tokens,
    sum(p.output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    if(sum(p.priced) = 0, NULL, sum(p.cost)) AS cost,
    sum(p.unpriced) AS unpriced_requests,
    sum(p.budget_rejections) AS budget_rejections,
    sum(p.latency_ms_sum) / requests AS avg_latency_ms,
    (requests - errors) / requests AS success_rate,
    errors / requests AS error_rate,
    length(groupUniqArrayArray(p.models)) AS unique_models,
    arraySort(groupUniqArray(p.provider)) AS providers,
    min(p.first_start) AS first_request,
    max(p.last_start) AS last_request,
    length(groupUniqArrayArray(p.start_days)) AS days_active,
    requests / days_active AS avg_requests_per_day,
    cost / nullIf(sum(p.priced), 0) AS cost_per_request,
    cost * 1000 / nullIf(sum(p.priced_tokens), 0) AS cost_per_1k_tokens,
    max(p.max_tokens) AS max_tokens_per_request
{% with group = ['user', 'tenant'], by_model = false,
        need = ['models', 'requests', 'errors', 'input_tokens', 'output_tokens', 'priced', 'cost',
                'unpriced', 'budget_rejections', 'latency_ms_sum', 'first_start', 'last_start',
                'start_days', 'priced_tokens', 'max_tokens'] %}
FROM {% include "rollup_parts" %} AS p
{% endwith %}
GROUP BY tenant, user
ORDER BY cost DESC, requests DESC, user, tenant
LIMIT {limit:UInt16} OFFSET {offset:UInt32}
