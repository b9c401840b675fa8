-- Which of these alert ids are stored already, with the baseline each was raised against
-- (a budget alert's: the limit; sinks/budget_seed.py tells a threshold's alert of an
-- earlier limit from one of the limit in force), and the scope and value it was of (an
-- id made before ids named the budget's owner: its owner may have been another).
SELECT DISTINCT event_id, baseline, dimension, value
FROM alerts
WHERE event_id IN {alert_ids:Array(UUID)}
