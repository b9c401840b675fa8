-- How long a table keeps rows, from {{ column }} (the time its rows expire by: a column,
-- or an expression of its columns): the table's TTL only (materialize_ttl_after_modify = 0),
-- a change of metadata that returns at once. A part keeps the expiry it was written with
-- (a shorter one still deletes its rows early, a longer one keeps them past the new
-- TTL), so sql/retention.py follows it with materialize_ttl.sql, which recomputes them.
ALTER TABLE {{ table }}
    MODIFY TTL toDateTime({{ column }}) + toIntervalDay({days:UInt32})
    SETTINGS materialize_ttl_after_modify = 0
