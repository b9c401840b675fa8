-- The SQL endpoint's session: its database, and every database it can see (its own
-- among them). One row, whatever the session may see. A query through the endpoint
-- may name tables of its own database only.
SELECT currentDatabase() AS current, groupArray(name) AS names
FROM system.databases
