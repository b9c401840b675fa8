-- Drop migration 0003's calls_hourly / calls_daily and their materialized views.
-- Nothing in llmtap reads them since 0005 (its rollups keep priced-call counts, so an
-- unknown cost is never read as $0, and the cost parts, TTFT and throughput), yet their
-- views ran on every insert, grouping by nine dimensions down to the key: the costliest
-- views the writer fed. SQL users read 0005's rollups instead (README, Analytics API).
DROP VIEW IF EXISTS calls_hourly_mv;
DROP VIEW IF EXISTS calls_daily_mv;
DROP TABLE IF EXISTS calls_hourly;
DROP TABLE IF EXISTS calls_daily;
