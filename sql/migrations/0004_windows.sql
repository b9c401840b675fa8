-- Closed tumbling windows from the stream (llmtap.windows): one row per window, per
-- dimension value, per share. With one stream worker a window has one share; with
-- several, each worker writes the share of the partitions it owns (`partitions`) and
-- readers sum the shares (every count and sum adds up; the sketches merge in Python).
-- The writer inserts only ids not stored yet; ReplacingMergeTree on the id as well,
-- for a rebalance between its check and its insert.
-- Sorting key: the series (dimension, value, length), then time: reads ask for one
-- series or one dimension over a time range.
CREATE TABLE IF NOT EXISTS windows
(
    event_id UUID,
    schema_version UInt16,
    size_s UInt32,
    dimension LowCardinality(String),
    value String,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    partitions Array(UInt16),
    requests UInt64,
    errors UInt64,
    errors_by_class Map(LowCardinality(String), UInt64),
    input_tokens UInt64,
    output_tokens UInt64,
    cached_input_tokens UInt64,
    cost Decimal(18, 9),
    unpriced UInt64,
    usage_missing UInt64,
    late_events UInt64,
    latency_p50_ms Nullable(Float64),
    latency_p95_ms Nullable(Float64),
    latency_p99_ms Nullable(Float64),
    ttft_p50_ms Nullable(Float64),
    ttft_p95_ms Nullable(Float64),
    ttft_p99_ms Nullable(Float64),
    latency_sketch String,
    ttft_sketch String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(window_start)
ORDER BY (dimension, value, size_s, window_start, event_id);
