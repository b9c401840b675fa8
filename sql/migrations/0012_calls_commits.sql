-- Each recorded insert into `calls` (0009's calls_inserts) whose Kafka offsets the
-- writer then committed. Kafka's own committed offsets say the same while the broker
-- keeps them; a broker that kept nothing over a restart (the embedded one, memory
-- only) forgets them, and every recorded insert would look uncommitted and be reported
-- lost at the next start (sinks/clickhouse/replay.py). Kept a week, as the records.
CREATE TABLE IF NOT EXISTS calls_commits
(
    committed DateTime64(3, 'UTC'),
    consumer_group LowCardinality(String),
    token String
)
ENGINE = MergeTree
ORDER BY (consumer_group, committed)
TTL toDateTime(committed) + INTERVAL 7 DAY;
