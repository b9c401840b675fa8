-- Releases the migration lock (or clears one its holder left).
DROP TABLE IF EXISTS schema_migrations_lock
