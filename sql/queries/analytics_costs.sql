-- Cost breakdown, one row per group. The group expression comes from this fixed list,
-- picked by name; a property's name is a bound parameter (calls without that property
-- form the group ''). Groups are ranked costliest first (cost desc, unknown cost last,
-- then requests desc, then key: a total order), and `limit` of them are kept after the
-- first `offset` (sql/analytics.py asks one more, to tell whether a next page exists,
-- and shows a page's days oldest first).
-- Teams, users, features, property values and keys exist within their tenant: grouped by one
-- of them, a row is one tenant's (two tenants' team `search` are two rows) and says
-- which. Models, providers and days are every tenant's: `tenant` is the tenant filtered
-- on (a virtual key's own), else null.
-- From the rollups (rollup_parts.sql; by property, the property rollup and every call
-- less those with the property for the '' group). A cost is null when no call could be
-- priced. The rollups hold the token parts and the total, not the web search fee
-- (migration 0011): it is what the total holds beyond the parts, exactly (each call's
-- total is the sum of its parts and its fee, in Decimal).
{% set groups = {
    'model': 'model',
    'provider': 'provider',
    'day': 'toDate(p.bucket)',
    'tenant': 'tenant',
    'team': 'team',
    'user': 'user',
    'feature': 'feature',
    'property': 'property',
    'key': 'key_id',
} %}
{% set per_tenant = group_by in ['tenant', 'team', 'user', 'feature', 'property', 'key'] %}
SELECT
    {{ groups[group_by] }} AS key,
{% if per_tenant %}
    p.tenant AS tenant,
{% elif 'tenant' in filters %}
    toNullable({tenant:String}) AS tenant,
{% else %}
    CAST(NULL AS Nullable(String)) AS tenant,
{% endif %}
    sum(p.requests) AS requests,
    sum(p.unpriced) AS unpriced_requests,
    sum(p.input_tokens) AS input_tokens,
    sum(p.output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    if(sum(p.priced) = 0, NULL, sum(p.cost_input)) AS cost_input,
    if(sum(p.priced) = 0, NULL, sum(p.cost_cached_input)) AS cost_cached_input,
    if(sum(p.priced) = 0, NULL, sum(p.cost_cache_write)) AS cost_cache_write,
    if(sum(p.priced) = 0, NULL, sum(p.cost_output)) AS cost_output,
    if(sum(p.priced) = 0, NULL, sum(p.cost_reasoning)) AS cost_reasoning,
    if(sum(p.priced) = 0, NULL,
       sum(p.cost) - sum(p.cost_input) - sum(p.cost_cached_input) - sum(p.cost_cache_write)
       - sum(p.cost_output) - sum(p.cost_reasoning)) AS cost_web_search,
    if(sum(p.priced) = 0, NULL, sum(p.cost)) AS cost
{% with group = [group_by] + (['tenant'] if per_tenant else []),
        property = group_by == 'property', by_model = group_by == 'model',
        need = ['requests', 'unpriced', 'input_tokens', 'output_tokens', 'priced', 'cost',
                'cost_input', 'cost_cached_input', 'cost_cache_write', 'cost_output',
                'cost_reasoning'] %}
FROM {% include "rollup_parts" %} AS p
{% endwith %}
GROUP BY {{ "tenant, " if per_tenant }}key
HAVING requests > 0  -- the '' group of a property every call has nets to none
ORDER BY cost DESC, requests DESC, key{{ ", tenant" if per_tenant }}
LIMIT {limit:UInt16} OFFSET {offset:UInt32}
