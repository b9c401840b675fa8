-- Exact replay of the writer's inserts into `calls` (sinks/clickhouse/replay.py).
--
-- An insert into `calls` also inserts into every materialized view on it, and the two
-- are not one transaction: a store killed (or a view's table failing) mid-insert can
-- leave the `calls` rows stored and a view without them. Retried, that insert must fill
-- the views that lack it and nothing else. So every insert into `calls` carries an
-- insert_deduplication_token, derived from the event ids it holds, with
-- deduplicate_blocks_in_dependent_materialized_views: repeated, `calls` drops it as a
-- duplicate, and each view's table inserts it, or drops it if it has it already.
-- MergeTree tables remember the last N tokens only when given a window:
-- non_replicated_deduplication_window, here on `calls` and on every table a view on it
-- writes to (tests/test_replay.py fails for a view added without it). Inserts without a
-- token are never deduplicated (the store's client sets insert_deduplicate = 0).
{% for table in [
    "calls",
    "analytics_by_model_hourly",
    "analytics_by_model_daily",
    "analytics_by_team_daily",
    "analytics_by_user_daily",
    "analytics_by_property_daily",
    "analytics_by_provider_hourly",
    "analytics_by_tenant_hourly",
    "analytics_by_user_provider_daily",
] %}
ALTER TABLE {{ table }} MODIFY SETTING non_replicated_deduplication_window = 1000;
{% endfor %}

-- Each insert into `calls` the writer makes, recorded before it is made: the Kafka
-- offset ranges its events came from, its token, and the ids left out because they
-- were stored already. A writer that finds one whose offsets its consumer group has
-- not committed (the store was killed before the insert finished, or before its
-- commit) reads those ranges again and repeats the insert exactly: same rows, same
-- token. Kept a week; the writer reads only its group's latest ones.
CREATE TABLE IF NOT EXISTS calls_inserts
(
    created DateTime64(3, 'UTC'),
    consumer_group LowCardinality(String),
    token String,
    ranges Array(Tuple(topic String, partition UInt32, first UInt64, next UInt64)),
    skipped Array(UUID)
)
ENGINE = MergeTree
ORDER BY (consumer_group, created)
TTL toDateTime(created) + INTERVAL 7 DAY;
