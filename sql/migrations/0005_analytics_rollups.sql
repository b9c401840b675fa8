-- What the analytics API reads (sql/queries/rollup_parts.sql): daily rollups at three
-- widths, an hourly one at the narrowest, and `calls` by time for the partial day (or
-- hour) at the start of a range. A query reads the narrowest rollup that has every
-- dimension it filters or groups by:
--   analytics_by_model_*      tenant, provider, model: most queries (a few hundred rows
--                             a bucket at most); hourly and daily;
--   analytics_by_team_daily   ... and team, feature, env: a filter or grouping on those
--                             (a key bound to a team, costs by team or feature);
--   analytics_by_user_daily   tenant, provider, model, team, user: a user filter (a key
--                             bound to a user, usage by user_id), costs by user and the
--                             users endpoint, with what only it needs (first/last request
--                             start, the UTC days with a request start, the largest
--                             request, budget rejections).
-- (A query on a user and a feature or env reads `calls` only: no rollup keeps both.)
--
-- Why not 0003's calls_hourly / calls_daily: they cannot tell a call without a known
-- cost (unpriced, or usage missing: either makes cost_total NULL) from a call that cost
-- $0, and lack the cost parts, TTFT averages and throughput, so an exact answer could not
-- come from them; and one row per user and key in every bucket is too many rows to read
-- for every request. They are left as they are (and still filled).
--
-- Every count and sum is a SimpleAggregateFunction (merged by sum, min, max or set
-- union): exact. Only the latency and TTFT quantiles are t-digest states: estimates.
--
-- `calls` gets a projection ordered by end time (by_time) with the columns those reads
-- use: a range's first partial day is then read from a few granules, where the table's
-- own order (tenant, provider, model, ts_end) makes every (tenant, provider, model) cost
-- at least one granule (~50 ms at 10M calls). It costs about half again the table's
-- size on disk, and some insert time (README, Analytics API).
--
-- Existing calls are backfilled: the rollups from `calls` (the TRUNCATE first makes a
-- re-run after an interruption count each call once), the projection by materializing
-- it (a mutation, waited for). Run migrations with writers stopped, as `llmtap store`
-- does (it migrates before its writer starts): a call written while the backfill reads
-- `calls` could be counted twice. Calls already gone from `calls` (past its retention)
-- are not in these rollups. They keep 400 days (the default rollup retention).
-- (Rendered with Jinja: a loop over the four tables, and one SELECT for both the
-- materialized view and the backfill; no values, only names.)
ALTER TABLE calls ADD PROJECTION IF NOT EXISTS by_time
(
    SELECT
        ts_end, ts_start, tenant, provider, model, team, feature, env, user, status,
        input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, usage_missing,
        latency_ms, ttft_ms, cost_input, cost_cached_input, cost_cache_write, cost_output,
        cost_reasoning, cost_total, unpriced
    ORDER BY ts_end
);

-- Not waited for by the statement (mutations_sync = 0): one waiting on its mutation sends
-- nothing, and a client over HTTP gives up after its receive timeout (the mutation goes
-- on). The migration runner waits for it (sql/migrate.py).
ALTER TABLE calls MATERIALIZE PROJECTION by_time SETTINGS mutations_sync = 0;

{% macro rollup_select(start_of, dims, by_user, costs_only=false, array_join="", with_models=false) %}
-- `calls.` where a column's name is also the alias of its sum. Throughput counts
-- successful calls with known usage only (measured). `costs_only`: what costs need
-- (0007's property rollup), `array_join` an ARRAY JOIN clause after FROM calls, and
-- `with_models` the set of models (0008's user rollup without a model dimension).
WITH status = 'ok' AND NOT calls.usage_missing AS measured
SELECT
    toDateTime({{ start_of }}(ts_end), 'UTC') AS bucket,
    {{ dims | join(', ') }},
    count() AS requests,
{% if not costs_only %}
    countIf(status != 'ok') AS errors,
{% endif %}
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
{% if not costs_only %}
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
{% endif %}
    countIf(cost_total IS NOT NULL) AS priced,
    countIf(calls.unpriced) AS unpriced,
{% if not costs_only %}
    countIf(calls.usage_missing) AS usage_missing,
{% endif %}
    sum(toDecimal128(ifNull(cost_total, 0), 9)) AS cost,
    sum(toDecimal128(ifNull(cost_input, 0), 9)) AS cost_input,
    sum(toDecimal128(ifNull(cost_cached_input, 0), 9)) AS cost_cached_input,
    sum(toDecimal128(ifNull(cost_cache_write, 0), 9)) AS cost_cache_write,
    sum(toDecimal128(ifNull(cost_output, 0), 9)) AS cost_output,
    sum(toDecimal128(ifNull(cost_reasoning, 0), 9)) AS cost_reasoning{{ "," if not costs_only }}
{% if not costs_only %}
    sum(latency_ms) AS latency_ms_sum,
    countIf(ttft_ms IS NOT NULL) AS ttft_count,
    sum(ifNull(ttft_ms, 0)) AS ttft_ms_sum,
    sumIf(toUInt64(calls.output_tokens), measured) AS measured_output_tokens,
    sumIf(latency_ms, measured) AS measured_latency_ms_sum,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms_quantiles,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(ttft_ms, 0), ttft_ms IS NOT NULL)
        AS ttft_ms_quantiles{{ "," if by_user }}
{% endif %}
{% if by_user %}
    countIf(status = 'budget_exceeded') AS budget_rejections,
    sumIf(toUInt64(calls.input_tokens) + calls.output_tokens, cost_total IS NOT NULL)
        AS priced_tokens,
    max(toUInt64(calls.input_tokens) + calls.output_tokens) AS max_tokens,
    min(ts_start) AS first_start,
    max(ts_start) AS last_start,
    groupUniqArray(toDate(ts_start)) AS start_days{{ "," if with_models }}
{% endif %}
{% if with_models %}
    groupUniqArray(toString(model)) AS models
{% endif %}
FROM calls
{% if array_join %}
{{ array_join }}
{% endif %}
GROUP BY bucket, {{ dims | join(', ') }}
{% endmacro %}
{% macro rollup_table(table, dims, by_user, costs_only=false, order_by=none, with_models=false) %}
CREATE TABLE IF NOT EXISTS {{ table }}
(
    bucket DateTime('UTC'),
{% for dim in dims %}
    {{ dim }} {{ "String" if dim in ("user", "property") else "LowCardinality(String)" }},
{% endfor %}
    requests SimpleAggregateFunction(sum, UInt64),
{% if not costs_only %}
    errors SimpleAggregateFunction(sum, UInt64),
{% endif %}
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
{% if not costs_only %}
    cached_input_tokens SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens SimpleAggregateFunction(sum, UInt64),
{% endif %}
    priced SimpleAggregateFunction(sum, UInt64),
    unpriced SimpleAggregateFunction(sum, UInt64),
{% if not costs_only %}
    usage_missing SimpleAggregateFunction(sum, UInt64),
{% endif %}
    cost SimpleAggregateFunction(sum, Decimal(38, 9)),
    cost_input SimpleAggregateFunction(sum, Decimal(38, 9)),
    cost_cached_input SimpleAggregateFunction(sum, Decimal(38, 9)),
    cost_cache_write SimpleAggregateFunction(sum, Decimal(38, 9)),
    cost_output SimpleAggregateFunction(sum, Decimal(38, 9)),
    cost_reasoning SimpleAggregateFunction(sum, Decimal(38, 9)){{ "," if not costs_only }}
{% if not costs_only %}
    latency_ms_sum SimpleAggregateFunction(sum, Float64),
    ttft_count SimpleAggregateFunction(sum, UInt64),
    ttft_ms_sum SimpleAggregateFunction(sum, Float64),
    measured_output_tokens SimpleAggregateFunction(sum, UInt64),
    measured_latency_ms_sum SimpleAggregateFunction(sum, Float64),
    latency_ms_quantiles AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64),
    ttft_ms_quantiles AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64){{ "," if by_user }}
{% endif %}
{% if by_user %}
    budget_rejections SimpleAggregateFunction(sum, UInt64),
    priced_tokens SimpleAggregateFunction(sum, UInt64),
    max_tokens SimpleAggregateFunction(max, UInt64),
    first_start SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_start SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    start_days SimpleAggregateFunction(groupUniqArrayArray, Array(Date)){{ "," if with_models }}
{% endif %}
{% if with_models %}
    models SimpleAggregateFunction(groupUniqArrayArray, Array(String))
{% endif %}
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY {{ order_by or '(tenant, bucket, ' ~ dims[1:] | join(', ') ~ ')' }}
TTL bucket + toIntervalDay(400)
-- Parts older than an hour are merged even when small, so a read finds one row per key
-- and bucket, not one per part (the rows a read merges are what it costs).
SETTINGS min_age_to_force_merge_seconds = 3600;

{% endmacro %}
{% for table, start_of, dims in [
    ("analytics_by_model_hourly", "toStartOfHour", ["tenant", "provider", "model"]),
    ("analytics_by_model_daily", "toStartOfDay", ["tenant", "provider", "model"]),
    ("analytics_by_team_daily", "toStartOfDay",
     ["tenant", "provider", "model", "team", "feature", "env"]),
    ("analytics_by_user_daily", "toStartOfDay", ["tenant", "provider", "model", "team", "user"]),
] %}
{% set by_user = "user" in dims %}
{{ rollup_table(table, dims, by_user) }}
TRUNCATE TABLE {{ table }};

CREATE MATERIALIZED VIEW IF NOT EXISTS {{ table }}_mv TO {{ table }} AS
{{ rollup_select(start_of, dims, by_user) }};

INSERT INTO {{ table }}
{{ rollup_select(start_of, dims, by_user) }};
{% endfor %}
