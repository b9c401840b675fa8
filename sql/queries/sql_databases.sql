-- The SQL endpoint's session: its database, every database it can see (its own among
-- them), and its database's tables. One row, whatever the session may see. A query
-- through the endpoint may name tables of its own database only, and those by name:
-- chDB's default database also reads the files of the process's directory as tables.
SELECT
    currentDatabase() AS current,
    groupArray(name) AS names,
    (SELECT groupArray(name) FROM system.tables WHERE database = currentDatabase()) AS tables
FROM system.databases
