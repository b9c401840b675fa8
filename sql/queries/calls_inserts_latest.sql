-- A writer's latest recorded inserts into `calls`, newest first (sinks/clickhouse/replay.py),
-- less those it recorded as committed (calls_commits): their offsets were committed,
-- whether or not the broker still remembers it. A commit is recorded after its insert,
-- so only commits since the oldest of these (less an hour, for another host's clock)
-- are read, from the front of calls_commits' order.
SELECT token, ranges, skipped
FROM
(
    SELECT token, ranges, skipped, created
    FROM calls_inserts
    WHERE consumer_group = {consumer_group:String}
    ORDER BY created DESC
    LIMIT {latest:UInt32}
) AS latest
WHERE token NOT IN (
    SELECT token
    FROM calls_commits
    WHERE consumer_group = {consumer_group:String}
      AND committed >= (
          SELECT min(created) - INTERVAL 1 HOUR
          FROM
          (
              SELECT created
              FROM calls_inserts
              WHERE consumer_group = {consumer_group:String}
              ORDER BY created DESC
              LIMIT {latest:UInt32}
          )
      )
)
ORDER BY created DESC
