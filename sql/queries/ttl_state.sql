-- A table's TTL (engine_full; sql/retention.py reads its days), how many of its parts
-- hold rows whose recorded expiry is not the one {days} days gives (written under
-- another TTL, or none), and whether a MATERIALIZE TTL of it is still running. The
-- expiry of a part's last row (delete_ttl_info_max) is that of its latest time
-- ({{ column }}, the time its rows expire by), in UTC as the columns are:
--   - of a table partitioned by toYYYYMM of that time (`partitioned`), the part's
--     max_time, which system.parts keeps (the partition key's min and max);
--   - of one that is not (retention.UNPARTITIONED: dead_letters, alerts, where max_time
--     is 1970, so every part would count at every start), read from its rows: only
--     the columns of that time, 8 bytes a row each. A part a merge replaced between
--     the two reads counts too, and costs one rewrite more at most.
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
{% if partitioned %}
            AND delete_ttl_info_max != toTimeZone(max_time, 'UTC') + toIntervalDay({days:UInt32})
{% else %}
            AND (name, delete_ttl_info_max) NOT IN
            (
                SELECT toString(_part), max(toDateTime({{ column }})) + toIntervalDay({days:UInt32})
                FROM {{ table }}
                GROUP BY _part
            )
{% endif %}
    ) AS stale_parts,
    (
        SELECT count()
        FROM system.mutations
        WHERE database = currentDatabase() AND table = {table:String} AND NOT is_done
            AND command LIKE '%MATERIALIZE TTL%'
    ) AS materializing
