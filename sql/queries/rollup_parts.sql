{#- The calls of one range as rollup-shaped rows: a subquery every analytics query over
    calls aggregates (sums the sums, merges the t-digest states), whatever the rows
    come from.

    A range is "calls that ended at or after {<span>}" (`span` names that parameter;
    default `since`): no upper bound, and a start that never aligns with buckets. With
    source 'rollup' its calls come, without overlap or gap, from
      - the daily rollup: whole UTC days from the first day boundary at or after the
        start on, the current day included (a bucket after the start is in the range
        whole);
      - the hourly rollup (by model only): the whole hours before that day boundary,
        from the first hour boundary at or after the start;
      - `calls` (its by_time projection): the rest, less than an hour (less than a day
        for the rollups without an hourly table).
    With unit 'hour' (hourly buckets: timeseries by hour) there is no daily part, and
    without an hourly rollup everything comes from `calls`.
    So every count and sum equals the raw table's; only quantiles (t-digest) estimate.
    With source 'raw' every call comes from `calls` (the same rows, for comparison).

    Which rollups: the narrowest with every dimension the query filters (`filters`) or
    groups by (`group`: 'team', 'feature', 'user'; `by_user` also asks for the user):
    analytics_by_model_* (provider, model), analytics_by_team_daily (+ team, feature,
    env), analytics_by_user_daily (provider, model, team, user). A user with a feature
    or env is in none: those read `calls`. `property` (costs by a custom property, which
    no rollup keeps) reads `calls` and adds the column `property`: the value of {prop}
    ('' when absent). `need` names the measures the query uses (default: all).
    Every branch takes the shared filters (_filters.sql). -#}
{% set span = span | default('since') %}
{% set group = group | default([]) %}
{% set with_user = by_user | default(false) or 'user_id' in filters or 'user' in group %}
{% set with_team = 'team' in group or 'feature' in group
    or 'team' in filters or 'feature' in filters or 'env' in filters %}
{% set with_feature = 'feature' in group or 'feature' in filters or 'env' in filters %}
{% set level = 'user' if with_user else ('team' if with_team else 'model') %}
{#- Where the rollups take over from `calls`, and what they answer. #}
{% set daily = unit == 'day' %}
{% set hourly = level == 'model' %}
{% set source = 'raw' if property | default(false) or (with_user and with_feature)
    or not (daily or hourly) else source | default('rollup') %}
{% set dims = {
    'model': ['provider', 'model'],
    'team': ['provider', 'model', 'team', 'feature', 'env'],
    'user': ['provider', 'model', 'team', 'user'],
}[level] if source == 'rollup' else ['provider', 'model', 'team', 'feature', 'env', 'user'] %}
{% set since = "{" ~ span ~ ":DateTime64(3, 'UTC')}" %}
{#- The first boundaries at or after the start (times have millisecond precision). #}
{% set h_from = "toStartOfHour(" ~ since ~ " + toIntervalMillisecond(3599999))" %}
{% set d_from = "toStartOfDay(" ~ since ~ " + toIntervalMillisecond(86399999))" %}
{% set raw_to = h_from if hourly else d_from %}
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
] if with_user else []) %}
{#- Only the columns the query uses (`need`, when given): less to plan and to read. #}
{% if need is defined %}
{% set measures = measures | selectattr('0', 'in', need) | list %}
{% endif %}
{% set columns = "bucket, " ~ (dims + measures | map('first') | list) | join(', ') %}
(
{% if source == 'rollup' %}
{% if daily %}
    SELECT {{ columns }}
    FROM analytics_by_{{ level }}_daily
    {% with when = "bucket >= " ~ d_from %}
    {% include "_filters" %}
    {% endwith %}
    UNION ALL
{% endif %}
{% if hourly %}
    SELECT {{ columns }}
    FROM analytics_by_{{ level }}_hourly
    {% with when = "bucket >= " ~ h_from ~ (" AND bucket < " ~ d_from if daily else "") %}
    {% include "_filters" %}
    {% endwith %}
    UNION ALL
{% endif %}
{% endif %}
    SELECT
        toDateTime(toStartOfHour(ts_end), 'UTC') AS bucket,
        {{ dims | join(', ') }},
{% if property | default(false) %}
        properties[{prop:String}] AS property,
{% endif %}
{% for name, expression in measures %}
        {{ expression }} AS {{ name }}{{ "," if not loop.last }}
{% endfor %}
    FROM calls
    {% with when = "ts_end >= " ~ since ~ (" AND ts_end < " ~ raw_to if source == 'rollup' else "") %}
    {% include "_filters" %}
    {% endwith %}
    GROUP BY bucket, {{ dims | join(', ') }}{{ ", property" if property | default(false) }}
)
