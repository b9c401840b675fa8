-- One endpoint's latest 410 Gone recorded at or after `since` (by any store process:
-- each sends its own partitions' deliveries), if any: the receiver asks for nothing
-- more, so the endpoint is disabled in every process that was enabled before it
-- (sinks/webhooks/gone.py). Rows closed out unsent (`gone`, no status) are not 410s.
SELECT alert_id, ts
FROM webhook_deliveries
WHERE endpoint = {endpoint:String}
    AND outcome = 'gone'
    AND status_code = 410
    AND ts >= {since:DateTime64(3, 'UTC')}
ORDER BY ts DESC
LIMIT 1
