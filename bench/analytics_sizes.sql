-- Rows, active parts and bytes on disk of the tables bench/analytics.py reports.
SELECT table, sum(rows) AS rows, count() AS parts, sum(bytes_on_disk) AS bytes
FROM system.parts
WHERE active AND database = currentDatabase() AND has({tables:Array(String)}, table)
GROUP BY table
ORDER BY rows DESC
