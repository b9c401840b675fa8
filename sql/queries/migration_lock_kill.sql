-- Stops the migration statements a stopped or failed holder left running on a ClickHouse
-- server (sql/migration_lock.py): those whose query_id starts with its process's prefix
-- (`prefix`: that prefix and %). Waits for them to end.
KILL QUERY WHERE query_id LIKE {prefix:String} SYNC
