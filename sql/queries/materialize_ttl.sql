-- Brings a table's stored parts to its TTL: a mutation that rewrites each part, deleting
-- the rows the TTL has expired and recording the new expiry of the rest. It runs in the
-- background (mutations_sync = 0: chDB's default is 1, a server's 0) and is kept on disk
-- until done, so a restart resumes it; system.mutations shows its progress.
ALTER TABLE {{ table }} MATERIALIZE TTL
    SETTINGS mutations_sync = 0
