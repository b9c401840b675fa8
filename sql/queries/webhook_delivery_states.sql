-- For these alerts, each (alert, endpoint) delivery already recorded, and whether it
-- has reached a final outcome (in its latest redelivery: 0019).
SELECT
    alert_id,
    endpoint,
    countIf(outcome IN {final:Array(String)}) > 0 AS finished
FROM webhook_deliveries
WHERE alert_id IN {alert_ids:Array(UUID)}
    AND (alert_id, endpoint, redelivery) IN
    (
        SELECT alert_id, endpoint, max(redelivery)
        FROM webhook_deliveries
        WHERE alert_id IN {alert_ids:Array(UUID)}
        GROUP BY alert_id, endpoint
    )
GROUP BY alert_id, endpoint
