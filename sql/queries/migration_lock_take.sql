-- Takes the migration lock (sql/migration_lock.py): made by one process at a time, with
-- no IF NOT EXISTS, so of several making it at once exactly one succeeds and the others
-- get TABLE_ALREADY_EXISTS (57). Its one row, inserted next, names the holder.
CREATE TABLE schema_migrations_lock
(
    holder String,
    process String,
    started_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY tuple()
