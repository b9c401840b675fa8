-- The SQL endpoint's session: its database, and every database it can see (its own
-- among them). A query through the endpoint may name tables of its own only.
SELECT currentDatabase() AS current, name
FROM system.databases
