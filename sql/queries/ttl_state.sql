-- A table's TTL (engine_full; sql/retention.py reads its days), how many of its parts
-- hold rows whose recorded expiry is not the one {days} days gives (written under
-- another TTL, or none), and whether a MATERIALIZE TTL of it is still running. The
-- expiry of a part's last row (delete_ttl_info_max) is that of its latest time
-- (max_time, of the partition key's column: every table with a TTL is partitioned by
-- toYYYYMM of the column its rows expire by), in UTC as the columns are.
SELECT
    (
        SELECT engine_full
        FROM system.tables
        WHERE database = currentDatabase() AND name = {table:String}
    ) AS engine_full,
    (
        SELECT count()
        FROM system.parts
        WHERE database = currentDatabase() AND table = {table:String} AND active AND rows > 0
            AND delete_ttl_info_max != toTimeZone(max_time, 'UTC') + toIntervalDay({days:UInt32})
    ) AS stale_parts,
    (
        SELECT count()
        FROM system.mutations
        WHERE database = currentDatabase() AND table = {table:String} AND NOT is_done
            AND command LIKE '%MATERIALIZE TTL%'
    ) AS materializing
