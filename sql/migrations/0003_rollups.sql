-- Hourly and daily rollups of `calls`, filled by materialized views as rows arrive, so
-- long ranges never scan raw rows. The writer never inserts a call twice, so the
-- rollups never count one twice. Sums are SimpleAggregateFunction (merge = sum);
-- latency quantiles are t-digest states, merged with quantilesTDigestMerge at read.
-- Sorting key: tenant, then the dimensions analytics group by, then time.
-- (Rendered with Jinja once per granularity; no values, only names.)
{% for name, start_of in [("hourly", "toStartOfHour"), ("daily", "toStartOfDay")] %}
CREATE TABLE IF NOT EXISTS calls_{{ name }}
(
    bucket DateTime('UTC'),
    tenant LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    team LowCardinality(String),
    feature LowCardinality(String),
    env LowCardinality(String),
    user String,
    key_id LowCardinality(String),
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cached_input_tokens SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens SimpleAggregateFunction(sum, UInt64),
    cost SimpleAggregateFunction(sum, Decimal(38, 9)),
    unpriced SimpleAggregateFunction(sum, UInt64),
    usage_missing SimpleAggregateFunction(sum, UInt64),
    latency_ms_sum SimpleAggregateFunction(sum, Float64),
    latency_ms_quantiles AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64),
    ttft_ms_quantiles AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, provider, model, bucket, team, feature, env, user, key_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS calls_{{ name }}_mv TO calls_{{ name }} AS
SELECT
    {{ start_of }}(ts_end) AS bucket,
    tenant, provider, model, team, feature, env, user, key_id,
    count() AS requests,
    countIf(status != 'ok') AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(toDecimal128(ifNull(cost_total, 0), 9)) AS cost,
    countIf(unpriced) AS unpriced,
    countIf(usage_missing) AS usage_missing,
    sum(latency_ms) AS latency_ms_sum,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms_quantiles,
    quantilesTDigestStateIf(0.5, 0.95, 0.99)(ifNull(ttft_ms, 0), ttft_ms IS NOT NULL)
        AS ttft_ms_quantiles
FROM calls
GROUP BY bucket, tenant, provider, model, team, feature, env, user, key_id;
{% endfor %}
