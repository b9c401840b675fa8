-- Two more rollups for the analytics API (read through sql/queries/rollup_parts.sql),
-- with 0005's table and view macros:
--   analytics_by_property_daily  costs by a custom property: one row per day, tenant,
--                                property name and value, provider and team (ARRAY
--                                JOIN: a call with two properties is in two rows, one
--                                per name; a call without any is in none, so "calls
--                                without property X" is every call less those with it).
--                                Only what the costs endpoint reads: counts, tokens and
--                                the cost and its parts. Property values are free text
--                                (String), names LowCardinality; ordered by name before
--                                the day, as every read asks for one name.
--   analytics_by_provider_hourly tenant and provider only: timeseries by hour over a
--                                long range read a tenth of the rows (and t-digest
--                                states) of analytics_by_model_hourly.
-- And `calls`' by_time projection is made again with `properties`, so the slice of a
-- range's first day that costs by property read from `calls` comes from a few
-- granules, as for the other queries.
-- Backfilled from `calls`, like 0005 (TRUNCATE first, so an interrupted run repeats
-- cleanly); run with writers stopped, as `llmtap store` does.
{% from "0005_analytics_rollups.sql" import rollup_table, rollup_select %}
ALTER TABLE calls DROP PROJECTION IF EXISTS by_time;

ALTER TABLE calls ADD PROJECTION IF NOT EXISTS by_time
(
    SELECT
        ts_end, ts_start, tenant, provider, model, team, feature, env, user, status,
        input_tokens, output_tokens, cached_input_tokens, reasoning_tokens, usage_missing,
        latency_ms, ttft_ms, cost_input, cost_cached_input, cost_cache_write, cost_output,
        cost_reasoning, cost_total, unpriced, properties
    ORDER BY ts_end
);

-- Not waited for by the statement (mutations_sync = 0): one waiting on its mutation sends
-- nothing, and a client over HTTP gives up after its receive timeout (the mutation goes
-- on). The migration runner waits for it (sql/migrate.py).
ALTER TABLE calls MATERIALIZE PROJECTION by_time SETTINGS mutations_sync = 0;

{% set property_dims = ["tenant", "property_name", "property", "provider", "team"] %}
{% set property_join =
    "ARRAY JOIN mapKeys(properties) AS property_name, mapValues(properties) AS property" %}
{{ rollup_table("analytics_by_property_daily", property_dims, false, costs_only=true,
                order_by="(tenant, property_name, bucket, property, provider, team)") }}
TRUNCATE TABLE analytics_by_property_daily;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics_by_property_daily_mv
TO analytics_by_property_daily AS
{{ rollup_select("toStartOfDay", property_dims, false, costs_only=true,
                 array_join=property_join) }};

INSERT INTO analytics_by_property_daily
{{ rollup_select("toStartOfDay", property_dims, false, costs_only=true,
                 array_join=property_join) }};

{{ rollup_table("analytics_by_provider_hourly", ["tenant", "provider"], false) }}
TRUNCATE TABLE analytics_by_provider_hourly;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics_by_provider_hourly_mv
TO analytics_by_provider_hourly AS
{{ rollup_select("toStartOfHour", ["tenant", "provider"], false) }};

INSERT INTO analytics_by_provider_hourly
{{ rollup_select("toStartOfHour", ["tenant", "provider"], false) }};
