-- Time buckets for charts, one row per UTC hour or day of the range, oldest first. A
-- bucket without calls is still there, filled with zeros (WITH FILL); the first and last
-- buckets are partial (the range starts and ends mid-bucket; a window with an end ends
-- with the bucket of its last millisecond: `end` is exclusive). From the rollups
-- (rollup_parts.sql; hourly ones only for hourly buckets); p95 is a t-digest estimate.
{% set unit_name = {'hour': 'Hour', 'day': 'Day'}[granularity] %}
{% set last = "{end:DateTime64(3, 'UTC')} - toIntervalMillisecond(1)"
    if bounded | default(false) else "{until:DateTime64(3, 'UTC')}" %}
SELECT
    bucket,
    requests,
    errors,
    input_tokens,
    output_tokens,
    total_tokens,
    -- An empty bucket cost 0; a bucket whose calls were all unpriced has an unknown cost.
    if(requests = 0, 0, cost) AS cost,
    p95_latency_ms
FROM
(
    SELECT
        toStartOf{{ unit_name }}(p.bucket) AS bucket,
        sum(p.requests) AS requests,
        sum(p.errors) AS errors,
        sum(p.input_tokens) AS input_tokens,
        sum(p.output_tokens) AS output_tokens,
        input_tokens + output_tokens AS total_tokens,
        if(sum(p.priced) = 0, NULL, sum(p.cost)) AS cost,
        quantilesTDigestMerge(0.5, 0.95, 0.99)(p.latency_ms_quantiles)[2] AS p95_latency_ms
    {% with unit = 'hour' if granularity == 'hour' else unit, by_model = false,
            need = ['requests', 'errors', 'input_tokens', 'output_tokens', 'priced', 'cost',
                    'latency_ms_quantiles'] %}
    FROM {% include "rollup_parts" %} AS p
    {% endwith %}
    GROUP BY bucket
    ORDER BY bucket WITH FILL
        FROM toStartOf{{ unit_name }}({since:DateTime64(3, 'UTC')})
        TO toStartOf{{ unit_name }}({{ last }}) + INTERVAL 1 {{ granularity | upper }}
        STEP INTERVAL 1 {{ granularity | upper }}
)
ORDER BY bucket
