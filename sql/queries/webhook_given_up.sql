-- One endpoint's deliveries given up (their latest redelivery ended dead_lettered, gone
-- or refused, and not delivered), for `llmtap alerts redeliver`: optionally only
-- these alerts', and only those given up at or after `since`. Each with the partition
-- its alert was read from and the redelivery to record next (0019).
SELECT
    alert_id,
    max(alert_partition) AS alert_partition,
    max(redelivery) + 1 AS next_redelivery
FROM webhook_deliveries
WHERE endpoint = {endpoint:String}
{% if alert_ids %}
    AND alert_id IN {alert_ids:Array(UUID)}
{% endif %}
    AND (alert_id, redelivery) IN
    (
        SELECT alert_id, max(redelivery)
        FROM webhook_deliveries
        WHERE endpoint = {endpoint:String}
{% if alert_ids %}
            AND alert_id IN {alert_ids:Array(UUID)}
{% endif %}
        GROUP BY alert_id
    )
GROUP BY alert_id
HAVING countIf(outcome IN {given_up:Array(String)}) > 0
    AND countIf(outcome = 'delivered') = 0
{% if since %}
    AND maxIf(ts, outcome IN {given_up:Array(String)}) >= {since:DateTime64(3, 'UTC')}
{% endif %}
ORDER BY alert_id
