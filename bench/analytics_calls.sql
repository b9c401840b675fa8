-- Synthetic calls for bench/analytics.py: rows {first} .. {first} + {count} - 1 of a
-- deterministic data set (every value is a hash of the row number), inserted into
-- `calls` itself so the materialized views fill the rollups as the writer's inserts do.
--
-- Shape: calls end uniformly over the {days} days before {now}, a little busier in UTC
-- working hours; 50 models over 5 providers and 1,000 users, both Zipf-like (a few
-- models and users make most calls; most of a team's feature's calls go to one
-- model); a user belongs to one of 4 tenants and 20 teams
-- and has one key; 5 features, 3 envs. About 4.7% of calls fail (upstream errors,
-- rate limits, budget rejections, disconnects, unreachable), 0.5% have no usage, and
-- the 5 rarest models have no price (unpriced). 60% stream (TTFT), 70% carry a
-- `customer` property.
-- Positional: one value for each column of `calls`, in its order (migrations 0001-0014).
INSERT INTO calls
SELECT
    generateUUIDv4(number) AS event_id,
    generateUUIDv4(number + 1) AS request_id,
    1 AS schema_version,
    ts_end - toIntervalMillisecond(toUInt64(latency_ms)) AS ts_start,
    ts_end,
    ['acme', 'globex', 'initech', 'umbrella'][user_index % 4 + 1] AS tenant,
    concat('team-', toString(user_index % 20)) AS team,
    concat('user-', toString(user_index)) AS user,
    ['chat', 'search', 'summarize', 'extract', 'agent'][feature_index + 1] AS feature,
    multiIf(u4 < 0.85, 'prod', u4 < 0.95, 'staging', 'dev') AS env,
    substring(hex(sipHash64(user_index)), 1, 16) AS key_id,
    if(u13 < 0.7, map('customer', concat('c', toString(user_index % 37))), map()) AS properties,
    provider,
    'chat.completions' AS endpoint,
    model,
    model AS model_requested,
    stream,
    status,
    multiIf(status = 'ok', 200, status = 'upstream_error', 500, status = 'upstream_unreachable',
            502, status = 'client_disconnected', 200, 429) AS http_status,
    '' AS error_class,
    input_tokens,
    output_tokens,
    cached_input_tokens,
    0 AS cache_creation_input_tokens,
    0 AS reasoning_tokens,
    usage_missing,
    false AS output_tokens_counted,
    0 AS web_search_requests,
    'standard' AS speed,
    'standard' AS service_tier,
    'global' AS inference_geo,
    latency_ms,
    if(stream AND status = 'ok', 80 + 300 * u12, NULL) AS ttft_ms,
    0.3 + u9 AS proxy_overhead_ms,
    if(priced, toDecimal64(rate_in * (input_tokens - cached_input_tokens), 9), NULL) AS cost_input,
    if(priced, toDecimal64(rate_in / 10 * cached_input_tokens, 9), NULL) AS cost_cached_input,
    if(priced, toDecimal64(0, 9), NULL) AS cost_cache_write,
    if(priced, toDecimal64(rate_in * 4 * output_tokens, 9), NULL) AS cost_output,
    if(priced, toDecimal64(0, 9), NULL) AS cost_reasoning,
    if(priced, toDecimal64(0, 9), NULL) AS cost_web_search,
    if(priced, cost_input + cost_cached_input + cost_output, NULL) AS cost_total,
    no_price AS unpriced,
    if(unpriced, '', model) AS pricing_model
FROM
(
    SELECT
        number,
        sipHash64(number, 1) % 1000000 / 1e6 AS u0,
        sipHash64(number, 2) % 1000000 / 1e6 AS u1,
        sipHash64(number, 3) % 1000000 / 1e6 AS u2,
        sipHash64(number, 4) % 1000000 / 1e6 AS u3,
        sipHash64(number, 5) % 1000000 / 1e6 AS u4,
        sipHash64(number, 6) % 1000000 / 1e6 AS u5,
        sipHash64(number, 7) % 1000000 / 1e6 AS u6,
        sipHash64(number, 8) % 1000000 / 1e6 AS u7,
        sipHash64(number, 9) % 1000000 / 1e6 AS u8,
        sipHash64(number, 10) % 1000000 / 1e6 AS u9,
        sipHash64(number, 15) % 1000000 / 1e6 AS u10,
        sipHash64(number, 11) % 1000000 / 1e6 AS u11,
        sipHash64(number, 12) % 1000000 / 1e6 AS u12,
        sipHash64(number, 13) % 1000000 / 1e6 AS u13,
        sipHash64(number, 14) % 1000000 / 1e6 AS u14,
        -- Busier from 08:00 to 18:00 UTC: a call drawn outside those hours is moved into
        -- them two times in five.
        {days:UInt32} * 86400 * u0 AS back_s,
        {now:DateTime64(3, 'UTC')} - toIntervalMillisecond(toUInt64(back_s * 1000)) AS drawn,
        if(NOT (toHour(drawn) BETWEEN 8 AND 17) AND u9 < 0.4,
           toStartOfDay(drawn) + toIntervalMillisecond(toUInt64((8 + 10 * u14) * 3600000)),
           drawn) AS moved,
        if(moved > {now:DateTime64(3, 'UTC')}, drawn, moved) AS ts_end,
        toUInt32(1000 * pow(u2, 3)) AS user_index,
        toUInt32(5 * pow(u3, 2)) AS feature_index,
        -- Most of a team's feature's calls go to its one model; the rest to any.
        if(u11 < 0.8,
           toUInt32(50 * pow(sipHash64(user_index % 20, feature_index) % 1000 / 1e3, 2.5)),
           toUInt32(50 * pow(u1, 2.5))) AS model_index,
        ['openai', 'anthropic', 'google', 'groq', 'mistral'][model_index % 5 + 1] AS provider,
        concat(provider, '-model-', toString(model_index)) AS model,
        multiIf(u5 < 0.030, 'upstream_error', u5 < 0.040, 'rate_limited',
                u5 < 0.043, 'budget_exceeded', u5 < 0.045, 'client_disconnected',
                u5 < 0.047, 'upstream_unreachable', 'ok') AS status,
        status IN ('ok', 'client_disconnected') AND u8 < 0.005 AS usage_missing,
        status IN ('ok', 'client_disconnected') AND NOT usage_missing AS answered,
        toUInt32(if(answered, 50 + 3000 * pow(u6, 2), 0)) AS input_tokens,
        toUInt32(if(answered, 5 + 800 * pow(u7, 2), 0)) AS output_tokens,
        toUInt32(if(u10 < 0.2, intDiv(input_tokens * 3, 10), 0)) AS cached_input_tokens,
        u12 < 0.6 AS stream,
        if(answered, 150 + output_tokens * 15 * (0.5 + u10), 20 + 200 * u10) AS latency_ms,
        -- Per-model USD per input token (output: 4x), so costs differ by model.
        toDecimal64((model_index % 10 + 1) * 0.0000005, 9) AS rate_in,
        -- As stream/pricing.py prices: no tokens costs $0 at any price; an unknown
        -- model or unknown usage has no cost (NULL), never $0.
        NOT usage_missing AND input_tokens = 0 AND output_tokens = 0 AS no_tokens,
        model_index >= 45 AND NOT no_tokens AS no_price,
        no_tokens OR NOT (no_price OR usage_missing) AS priced
    FROM numbers({first:UInt64}, {count:UInt64})
)
