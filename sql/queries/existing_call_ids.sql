-- Which of a batch's event ids may be stored already (the writer's duplicate check).
-- The ids are bound by their first 8 hex digits, as one comma-separated String: the
-- client escapes a bound string character by character in Python, so binding the whole
-- ids cost ~2.5 us a row (a quarter of the writer's time), their prefixes a quarter of
-- that. A prefix can match another event's id: the writer compares the whole ids this
-- returns, so a match by prefix alone drops nothing.
SELECT event_id
FROM calls
WHERE ts_end BETWEEN {ts_from:DateTime64(3, 'UTC')} AND {ts_to:DateTime64(3, 'UTC')}
  AND substring(toString(event_id), 1, 8) IN splitByChar(',', {id_prefixes:String})
