{#- The calls of one range as rollup-shaped rows: a subquery every analytics query over
    calls aggregates (sums the sums, merges the t-digest states), whatever the rows
    come from.

    A range is "calls that ended at or after {<span>}" (`span` names that parameter;
    default `since`): no upper bound, and a start that never aligns with buckets. With
    source 'rollup' its calls come, without overlap or gap, from
      - the daily rollup: whole UTC days from the first day boundary at or after the
        start on, the current day included (a bucket after the start is in the range
        whole);
      - the hourly rollup (by tenant, provider or model only): the whole hours before
        that day boundary, from the first hour boundary at or after the start;
      - `calls` (its by_time projection): the rest, less than an hour (less than a day
        for the rollups without an hourly table).
    With unit 'hour' (hourly buckets: timeseries by hour) there is no daily part, and
    without an hourly rollup everything comes from `calls`.
    `bounded` (a window with an end: the API's `end`) adds "and before {end}": then the
    days are the whole ones before the last day boundary at or before {end}, the hours
    the whole ones before the last hour boundary at or before it (less the days), and
    `calls` the rest at either end (all of it for a window within one hour).
    So every count and sum equals the raw table's; only quantiles (t-digest) estimate.
    With source 'raw' every call comes from `calls` (the same rows, for comparison).

    Which rollups: the narrowest with every dimension the query filters (`filters`) or
    groups by (`group`: 'team', 'feature', 'user'; `by_user` also asks for the user;
    `by_model=false` says the query reads no model, so tenant and provider will do):
    analytics_by_tenant_hourly (tenant only) and analytics_by_provider_hourly (provider;
    the days of both from analytics_by_model_daily), analytics_by_model_* (provider,
    model), analytics_by_team_daily (+ team, feature, env), analytics_by_user_daily
    (provider, model, team, user) and, without the model, analytics_by_user_provider_daily
    (provider, team, user, and the measure `models`: the set of models used). A user
    with a feature or env is in none: those read `calls`.

    Grouped by key (`group` holds 'key'): analytics_by_key_daily (0017: the key id and
    provider; what costs read only), or `calls` with a team, user, feature, env or
    model filter (no rollup keeps both).

    `property` (costs by the custom property {prop}) adds the column `property`: its
    value, '' for calls without it. Its rollup, analytics_by_property_daily (0007:
    provider, team, and one row per property a call has), holds only the calls with
    the property, so the rows are those calls by value, plus the '' group made of
    every call (this template again, without `property`) less the calls with the
    property (their rows again, negated): counts become signed. A property with a user,
    feature, env or model filter reads `calls` (no rollup keeps both), and the property
    rollup holds only what costs read (counts, tokens, cost and its parts).

    `group` may also hold 'tenant': the rows then keep the tenant (every rollup has
    it), which a query grouping by a team, user, feature or property groups by too
    (they exist within their tenant: two tenants' team `search` are two teams).

    `need` names the measures the query uses (default: all). Every branch takes the
    shared filters (_filters.sql). -#}
{% set span = span | default('since') %}
{% set group = group | default([]) %}
{% set by_property = property | default(false) %}
{% set with_user = by_user | default(false) or 'user_id' in filters or 'user' in group %}
{% set with_team = 'team' in group or 'feature' in group
    or 'team' in filters or 'feature' in filters or 'env' in filters %}
{% set with_feature = 'feature' in group or 'feature' in filters or 'env' in filters %}
{% set with_tenant = 'tenant' in group %}
{% set with_key = 'key' in group %}
{% set with_model = by_model | default(true) or 'model_id' in filters %}
{% set with_provider = with_model or 'provider' in group or 'provider' in filters %}
{% set level = 'property' if by_property else 'key' if with_key
    else ('user' if with_model else 'user_provider') if with_user
    else 'team' if with_team else 'model' if with_model
    else 'provider' if with_provider else 'tenant' %}
{#- Where the rollups take over from `calls`, and what they answer. #}
{% set daily = unit == 'day' %}
{% set daily_table, hourly_table = {
    'tenant': ('analytics_by_model_daily', 'analytics_by_tenant_hourly'),
    'provider': ('analytics_by_model_daily', 'analytics_by_provider_hourly'),
    'model': ('analytics_by_model_daily', 'analytics_by_model_hourly'),
    'team': ('analytics_by_team_daily', none),
    'user': ('analytics_by_user_daily', none),
    'user_provider': ('analytics_by_user_provider_daily', none),
    'property': ('analytics_by_property_daily', none),
    'key': ('analytics_by_key_daily', none),
}[level] %}
{% set hourly = hourly_table is not none %}
{% set source = 'raw'
    if (by_property and (with_user or with_feature or 'model_id' in filters))
    or (with_key and (with_user or with_team or 'model_id' in filters))
    or (with_user and with_feature) or not (daily or hourly)
    else source | default('rollup') %}
{% set dims = {
    'tenant': [],
    'provider': ['provider'],
    'model': ['provider', 'model'],
    'team': ['provider', 'model', 'team', 'feature', 'env'],
    'user': ['provider', 'model', 'team', 'user'],
    'user_provider': ['provider', 'team', 'user'],
    'property': ['provider', 'team'],
    'key': ['key_id', 'provider'],
}[level] if source == 'rollup'
    else ['provider', 'model', 'team', 'feature', 'env', 'user'] + (['key_id'] if with_key else []) %}
{% set dims = (['tenant'] if with_tenant or (level == 'tenant' and source == 'rollup') else []) + dims %}
{#- What the property branches keep besides the bucket and the property. #}
{% set kept = ['tenant'] if with_tenant else [] %}
{% set since = "{" ~ span ~ ":DateTime64(3, 'UTC')}" %}
{#- The first boundaries at or after the start (times have millisecond precision). #}
{% set h_from = "toStartOfHour(" ~ since ~ " + toIntervalMillisecond(3599999))" %}
{% set d_from = "toStartOfDay(" ~ since ~ " + toIntervalMillisecond(86399999))" %}
{% set raw_to = h_from if hourly else d_from %}
{#- With an end: the last boundaries at or before it (a bucket before them ends by it). #}
{% set bounded = bounded | default(false) %}
{% set end = "{end:DateTime64(3, 'UTC')}" %}
{% set h_to = "toStartOfHour(" ~ end ~ ")" %}
{% set d_to = "toStartOfDay(" ~ end ~ ")" %}
{% set days = "bucket >= " ~ d_from ~ (" AND bucket < " ~ d_to if bounded else "") %}
{% set hours = "bucket >= " ~ h_from ~ (
    (" AND bucket < " ~ h_to ~ (" AND NOT (" ~ days ~ ")" if daily else ""))
    if bounded else (" AND bucket < " ~ d_from if daily else "")) %}
{% set edges = "ts_end >= " ~ since ~ (
    (" AND ts_end < " ~ end ~ " AND NOT (ts_end >= " ~ raw_to ~ " AND ts_end < "
        ~ (h_to if hourly else d_to) ~ ")")
    if bounded else " AND ts_end < " ~ raw_to) %}
{#- (name, how a call's rows make it): the rollups' columns, in their order; the same
    expressions as their materialized views (0005_analytics_rollups.sql). #}
{% set measures = [
    ('requests', "count()"),
    ('errors', "countIf(status != 'ok')"),
    ('input_tokens', "sum(calls.input_tokens)"),
    ('output_tokens', "sum(calls.output_tokens)"),
    ('cached_input_tokens', "sum(calls.cached_input_tokens)"),
    ('reasoning_tokens', "sum(calls.reasoning_tokens)"),
    ('priced', "countIf(cost_total IS NOT NULL)"),
    ('unpriced', "countIf(calls.unpriced)"),
    ('usage_missing', "countIf(calls.usage_missing)"),
    ('cost', "sum(toDecimal128(ifNull(cost_total, 0), 9))"),
    ('cost_input', "sum(toDecimal128(ifNull(calls.cost_input, 0), 9))"),
    ('cost_cached_input', "sum(toDecimal128(ifNull(calls.cost_cached_input, 0), 9))"),
    ('cost_cache_write', "sum(toDecimal128(ifNull(calls.cost_cache_write, 0), 9))"),
    ('cost_output', "sum(toDecimal128(ifNull(calls.cost_output, 0), 9))"),
    ('cost_reasoning', "sum(toDecimal128(ifNull(calls.cost_reasoning, 0), 9))"),
    ('latency_ms_sum', "sum(latency_ms)"),
    ('ttft_count', "countIf(ttft_ms IS NOT NULL)"),
    ('ttft_ms_sum', "sum(ifNull(ttft_ms, 0))"),
    ('measured_output_tokens',
        "sumIf(toUInt64(calls.output_tokens), status = 'ok' AND NOT calls.usage_missing)"),
    ('measured_latency_ms_sum', "sumIf(latency_ms, status = 'ok' AND NOT calls.usage_missing)"),
    ('latency_ms_quantiles', "quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms)"),
    ('ttft_ms_quantiles',
        "quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(ttft_ms, 0), ttft_ms IS NOT NULL)"),
] + ([
    ('budget_rejections', "countIf(status = 'budget_exceeded')"),
    ('priced_tokens',
        "sumIf(toUInt64(calls.input_tokens) + calls.output_tokens, cost_total IS NOT NULL)"),
    ('max_tokens', "max(toUInt64(calls.input_tokens) + calls.output_tokens)"),
    ('first_start', "min(ts_start)"),
    ('last_start', "max(ts_start)"),
    ('start_days', "groupUniqArray(toDate(ts_start))"),
] if with_user else []) + ([
    ('models', "groupUniqArray(toString(model))"),
] if level == 'user_provider' or source == 'raw' else []) %}
{#- Only the columns the query uses (`need`, when given): less to plan and to read. #}
{% if need is defined %}
{% set measures = measures | selectattr('0', 'in', need) | list %}
{% endif %}
{% set names = measures | map('first') | list %}
{% if level == 'property' and source == 'rollup' and not property_rows | default(false) %}
{#- The calls with the property by value, and the '' group: every call less those.
    Counts as signed integers (money is a signed Decimal already). #}
{% macro signed(name) %}{{ name if name.startswith('cost') else 'toInt64(' ~ name ~ ')' }}{% endmacro %}
(
    SELECT
        bucket,
{% for name in kept %}
        {{ name }},
{% endfor %}
        '' AS property,
{% for name in names %}
        {{ signed(name) }} AS {{ name }}{{ "," if not loop.last }}
{% endfor %}
    FROM {% with property = false, group = kept %}{% include "rollup_parts" %}{% endwith %}
    UNION ALL
    SELECT
        bucket,
{% for name in kept %}
        {{ name }},
{% endfor %}
        if(sign = 1, property, '') AS property,
{% for name in names %}
        sign * {{ signed(name) }} AS {{ name }}{{ "," if not loop.last }}
{% endfor %}
    FROM {% with property_rows = true %}{% include "rollup_parts" %}{% endwith %}
    ARRAY JOIN [1, -1] AS sign
)
{% else %}
{% set columns = "bucket, " ~ (dims + (['property'] if by_property else []) + names) | join(', ') %}
(
{% if source == 'rollup' %}
{% if daily %}
    SELECT {{ columns }}
    FROM {{ daily_table }}
    {% with when = days %}
    {% include "_filters" %}
    {% endwith %}
{% if by_property %}
      AND property_name = {prop:String}
{% endif %}
    UNION ALL
{% endif %}
{% if hourly %}
    SELECT {{ columns }}
    FROM {{ hourly_table }}
    {% with when = hours %}
    {% include "_filters" %}
    {% endwith %}
    UNION ALL
{% endif %}
{% endif %}
    SELECT
        toDateTime(toStartOfHour(ts_end), 'UTC') AS bucket,
        {{ dims | join(', ') }},
{% if by_property %}
        properties[{prop:String}] AS property,
{% endif %}
{% for name, expression in measures %}
        {{ expression }} AS {{ name }}{{ "," if not loop.last }}
{% endfor %}
    FROM calls
    {% with when = edges if source == 'rollup'
        else "ts_end >= " ~ since ~ (" AND ts_end < " ~ end if bounded else "") %}
    {% include "_filters" %}
    {% endwith %}
{% if by_property and source == 'rollup' %}
      AND mapContains(properties, {prop:String})
{% endif %}
    GROUP BY bucket, {{ dims | join(', ') }}{{ ", property" if by_property }}
)
{% endif %}
