-- One row per call, written once when the call ends and never updated: reads need no
-- FINAL. Sorting key: tenant first (every analytics query is scoped to one), then the
-- low-cardinality dimensions the queries group and filter by, then time.
CREATE TABLE IF NOT EXISTS calls
(
    event_id UUID,
    request_id UUID,
    schema_version UInt16,
    ts_start DateTime64(3, 'UTC'),
    ts_end DateTime64(3, 'UTC'),
    tenant LowCardinality(String),
    team LowCardinality(String),
    user String,
    feature LowCardinality(String),
    env LowCardinality(String),
    key_id LowCardinality(String),
    properties Map(LowCardinality(String), String),
    provider LowCardinality(String),
    endpoint LowCardinality(String),
    model LowCardinality(String),
    model_requested LowCardinality(String),
    stream Bool,
    status LowCardinality(String),
    http_status UInt16,
    error_class LowCardinality(String),
    input_tokens UInt32,
    output_tokens UInt32,
    cached_input_tokens UInt32,
    cache_creation_input_tokens UInt32,
    reasoning_tokens UInt32,
    usage_missing Bool,
    latency_ms Float64,
    ttft_ms Nullable(Float64),
    proxy_overhead_ms Float64,
    cost_input Nullable(Decimal(18, 9)),
    cost_cached_input Nullable(Decimal(18, 9)),
    cost_cache_write Nullable(Decimal(18, 9)),
    cost_output Nullable(Decimal(18, 9)),
    cost_reasoning Nullable(Decimal(18, 9)),
    cost_total Nullable(Decimal(18, 9)),
    unpriced Bool,
    pricing_model LowCardinality(String),
    -- The writer asks "which of these event ids are stored already?" before each insert.
    INDEX idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts_end)
ORDER BY (tenant, provider, model, ts_end);

-- Messages the writer could not decode: kept with their raw bytes, never dropped.
CREATE TABLE IF NOT EXISTS dead_letters
(
    ts DateTime64(3, 'UTC'),
    topic LowCardinality(String),
    partition UInt32,
    offset UInt64,
    raw String,
    error String
)
ENGINE = MergeTree
ORDER BY (topic, ts);
