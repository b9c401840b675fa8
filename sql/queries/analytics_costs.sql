-- Cost breakdown, one row per group. The group expression comes from this fixed list,
-- picked by name; a property's name is a bound parameter (calls without that property
-- form the group ''). Days are UTC, oldest first; other groups costliest first.
{% set groups = {
    'model': 'model',
    'provider': 'provider',
    'day': 'toDate(ts_end)',
    'team': 'team',
    'user': 'user',
    'feature': 'feature',
    'property': 'properties[{prop:String}]',
} %}
SELECT
    {{ groups[group_by] }} AS key,
    count() AS requests,
    countIf(unpriced) AS unpriced_requests,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    input_tokens + output_tokens AS total_tokens,
    sum(cost_input) AS cost_input,
    sum(cost_cached_input) AS cost_cached_input,
    sum(cost_cache_write) AS cost_cache_write,
    sum(cost_output) AS cost_output,
    sum(cost_reasoning) AS cost_reasoning,
    sum(cost_total) AS cost
FROM calls
{% include "_filters" %}
GROUP BY key
{% if group_by == 'day' %}
ORDER BY key
{% else %}
ORDER BY cost DESC, requests DESC, key
{% endif %}
