-- Unfinished deliveries (their latest redelivery has no final row: 0019) of endpoints
-- not configured, renamed or removed: never sent unless one is configured again under
-- its name. How many per endpoint, said at the dispatcher's start.
SELECT endpoint, count() AS deliveries
FROM
(
    SELECT alert_id, endpoint, argMax(finished, redelivery) AS finished
    FROM
    (
        SELECT
            alert_id,
            endpoint,
            redelivery,
            countIf(outcome IN {final:Array(String)}) > 0 AS finished
        FROM webhook_deliveries
        WHERE NOT has({endpoints:Array(String)}, endpoint)
        GROUP BY alert_id, endpoint, redelivery
    )
    GROUP BY alert_id, endpoint
)
WHERE NOT finished
GROUP BY endpoint
ORDER BY endpoint
