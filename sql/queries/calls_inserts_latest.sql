-- A writer's latest recorded inserts into `calls`, newest first (sinks/clickhouse/replay.py),
-- less those it recorded as committed (calls_commits): their offsets were committed,
-- whether or not the broker still remembers it.
SELECT token, ranges, skipped
FROM
(
    SELECT token, ranges, skipped, created
    FROM calls_inserts
    WHERE consumer_group = {consumer_group:String}
    ORDER BY created DESC
    LIMIT {latest:UInt32}
)
WHERE token NOT IN (
    SELECT token FROM calls_commits WHERE consumer_group = {consumer_group:String}
)
ORDER BY created DESC
