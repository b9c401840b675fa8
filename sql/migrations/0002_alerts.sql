-- Alerts (spike and budget), one row per alert id, as the webhook dispatcher read them
-- from llmtap.alerts. The dispatcher inserts only ids not stored yet (insert-if-absent,
-- checked by primary key), so a plain count or read is exact without FINAL. The engine
-- is ReplacingMergeTree on the id as well, for the one gap that check leaves: a
-- rebalance that hands a partition to another dispatcher between its check and its
-- insert. Merges then collapse that copy; readers that must be exact even in that
-- window can add FINAL. `payload` is the alert's JSON as published, which is what a
-- delivery resumed after a restart renders again.
CREATE TABLE IF NOT EXISTS alerts
(
    event_id UUID,
    schema_version UInt16,
    alert_type LowCardinality(String),
    state LowCardinality(String),
    severity LowCardinality(String),
    rule LowCardinality(String),
    dimension LowCardinality(String),
    value String,
    metric LowCardinality(String),
    observed Decimal(38, 9),
    baseline Nullable(Decimal(38, 9)),
    threshold Nullable(Decimal(38, 9)),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    first_seen DateTime64(3, 'UTC'),
    message String,
    payload String,
    stored_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY event_id;

-- Webhook deliveries: an append-only log, one row per step of one alert's delivery to
-- one endpoint. Attempt 0 is `pending` (recorded, with the alert, before the alert's
-- Kafka offset is committed); attempts 1..N are HTTP requests: `retrying` (failed, will
-- be retried), or a final `delivered` / `dead_lettered`. `refused` is final too: the
-- SSRF guard refused the target and no request was sent. A delivery with no final row
-- is unfinished, and is resumed when the dispatcher starts.
CREATE TABLE IF NOT EXISTS webhook_deliveries
(
    alert_id UUID,
    endpoint LowCardinality(String),
    attempt UInt16,
    ts DateTime64(3, 'UTC'),
    status_code Nullable(UInt16),
    error String,
    outcome LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (alert_id, endpoint, attempt, ts);
