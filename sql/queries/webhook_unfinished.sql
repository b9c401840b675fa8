-- One endpoint's deliveries with no final outcome yet, of the alerts-topic partitions
-- this store process owns (and those recorded before deliveries had one, -1, with
-- partition 0), oldest first, with the alert to render again, how many attempts
-- were already made (0: only recorded as pending) and when the next one is due
-- (the latest retry_at of its failed attempts; NULL, none recorded: now), and when its
-- sending began (`since`: its first attempt, or, none made yet, its pending row; too
-- long ago, it is dead-lettered unsent, records.py: time spent queued behind others
-- does not count against one being retried).
-- Only a delivery's latest redelivery counts (0019: `llmtap alerts redeliver` starts
-- one afresh after the earlier one's final row), and its attempts are that one's.
-- They go in the order they were recorded pending (`queued`), and alerts recorded
-- together (one batch: one `queued`) in the order they were raised, a firing before
-- its resolve, a budget's 50% before its 80%, not in id order.
WITH unfinished AS
(
    SELECT
        alert_id,
        max(attempt) AS attempts,
        min(ts) AS queued,
        if(countIf(attempt > 0) > 0, minIf(ts, attempt > 0), queued) AS since,
        max(alert_partition) AS alert_partition,
        max(retry_at) AS retry_at,
        max(redelivery) AS sending
    FROM webhook_deliveries
    WHERE endpoint = {endpoint:String}
        AND (alert_id, redelivery) IN
        (
            SELECT alert_id, max(redelivery)
            FROM webhook_deliveries
            WHERE endpoint = {endpoint:String}
            GROUP BY alert_id
        )
    GROUP BY alert_id
    HAVING countIf(outcome IN {final:Array(String)}) = 0
        AND (has({partitions:Array(Int32)}, alert_partition)
             OR (alert_partition = -1 AND has({partitions:Array(Int32)}, 0)))
)
SELECT
    u.alert_id AS alert_id,
    u.attempts AS attempts,
    u.alert_partition AS alert_partition,
    u.retry_at AS retry_at,
    u.sending AS redelivery,
    u.since AS since,
    a.payload AS payload
FROM unfinished AS u
INNER JOIN
(
    SELECT
        event_id,
        any(payload) AS payload,
        any(first_seen) AS first_seen,
        any(state) AS state,
        any(threshold) AS threshold
    FROM alerts
    WHERE event_id IN (SELECT alert_id FROM unfinished)
    GROUP BY event_id
) AS a ON a.event_id = u.alert_id
ORDER BY u.queued, a.first_seen, a.state = 'resolved', a.threshold, u.alert_id
LIMIT {limit:UInt32}
