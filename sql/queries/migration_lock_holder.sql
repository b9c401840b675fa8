-- Who holds the migration lock: one row always; `named` false while its maker is between
-- making it and naming itself (or died there).
SELECT
    currentDatabase() AS database,
    count() > 0 AS named,
    any(holder) AS holder,
    any(process) AS process,
    any(started_at) AS started_at
FROM schema_migrations_lock
