-- Time buckets for charts, one row per UTC hour or day of the range, oldest first. A
-- bucket without calls is still there, filled with zeros (WITH FILL); the first and last
-- buckets are partial (the range starts and ends mid-bucket).
{% set unit = {'hour': 'Hour', 'day': 'Day'}[granularity] %}
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
        toStartOf{{ unit }}(ts_end) AS bucket,
        count() AS requests,
        countIf(status != 'ok') AS errors,
        sum(input_tokens) AS input_tokens,
        sum(output_tokens) AS output_tokens,
        input_tokens + output_tokens AS total_tokens,
        sum(cost_total) AS cost,
        quantile(0.95)(latency_ms) AS p95_latency_ms
    FROM calls
    {% include "_filters" %}
    GROUP BY bucket
    ORDER BY bucket WITH FILL
        FROM toStartOf{{ unit }}({since:DateTime64(3, 'UTC')})
        TO toStartOf{{ unit }}({until:DateTime64(3, 'UTC')}) + INTERVAL 1 {{ unit | upper }}
        STEP INTERVAL 1 {{ unit | upper }}
)
ORDER BY bucket
