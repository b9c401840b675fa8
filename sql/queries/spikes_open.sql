-- The spike alerts still open: per rule and series (tenant, dimension, value), the
-- latest alert by its window (of one window, the later stored) is a firing one.
-- sinks/spike_seed.py publishes them again at the store's start, for the stream
-- worker's warm-up (stream/reconcile.py). Exact without FINAL: a copy left by a merge
-- not done yet is the same alert.
SELECT payload
FROM
(
    SELECT
        argMax(payload, (window_start, stored_at)) AS payload,
        argMax(state, (window_start, stored_at)) AS last_state
    FROM alerts
    WHERE alert_type = {alert_type:String}
    GROUP BY rule, tenant, dimension, value
)
WHERE last_state = 'firing'
