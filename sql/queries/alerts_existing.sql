-- Which of these alert ids are stored already (the dispatcher's insert-if-absent check).
SELECT DISTINCT event_id
FROM alerts
WHERE event_id IN {alert_ids:Array(UUID)}
