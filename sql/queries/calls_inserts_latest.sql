-- A writer's latest recorded inserts into `calls`, newest first (sinks/clickhouse/replay.py).
SELECT token, ranges, skipped
FROM calls_inserts
WHERE consumer_group = {consumer_group:String}
ORDER BY created DESC
LIMIT {latest:UInt32}
