-- How long a table keeps rows. Existing parts are not rewritten now
-- (materialize_ttl_after_modify = 0): they expire as merges reach them.
ALTER TABLE {{ table }}
    MODIFY TTL toDateTime({{ column }}) + toIntervalDay({days:UInt32})
    SETTINGS materialize_ttl_after_modify = 0
