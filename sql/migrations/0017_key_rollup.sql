-- Costs by virtual key (the analytics API's costs?group_by=key), through
-- sql/queries/rollup_parts.sql, with 0005's table and view macros:
--   analytics_by_key_daily  one row per day, tenant, key id and provider: a key is the
--                           credential a service calls with, so "which service spends"
--                           over a long range reads a few rows a day per key, not the
--                           raw calls. Only what the costs endpoint reads (counts,
--                           tokens, the cost and its parts), as 0007's property rollup.
--                           Ordered by tenant, then the day, then the key: a read asks
--                           for one tenant's keys (a virtual key's own tenant) or all.
-- A key bound to a team or user, or a query filtering on them, on a feature, env or
-- model, reads `calls` (no rollup keeps both a key and those).
-- Backfilled from `calls`, like 0005 (TRUNCATE first, so an interrupted run repeats
-- cleanly); run with writers stopped, as `llmtap store` does.
{% from "0005_analytics_rollups.sql" import rollup_table, rollup_select %}
{% set key_dims = ["tenant", "key_id", "provider"] %}
{{ rollup_table("analytics_by_key_daily", key_dims, false, costs_only=true,
                order_by="(tenant, bucket, key_id, provider)") }}
-- Like every table a view on `calls` writes to, it remembers the last inserts' tokens
-- (0009): an insert into `calls` repeated after a crash (sinks/clickhouse/replay.py) is
-- dropped by `calls` and by every rollup, this one too.
ALTER TABLE analytics_by_key_daily MODIFY SETTING non_replicated_deduplication_window = 1000;

TRUNCATE TABLE analytics_by_key_daily;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics_by_key_daily_mv
TO analytics_by_key_daily AS
{{ rollup_select("toStartOfDay", key_dims, false, costs_only=true) }};

INSERT INTO analytics_by_key_daily
{{ rollup_select("toStartOfDay", key_dims, false, costs_only=true) }};
