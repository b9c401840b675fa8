-- The mutations that build or drop a projection and are not done: a migration's (0005,
-- 0007) left on disk by a run killed while it waited for it, and resumed by ClickHouse.
SELECT mutation_id, table, command, latest_fail_reason
FROM system.mutations
WHERE database = currentDatabase() AND NOT is_done AND command LIKE '%PROJECTION%'
