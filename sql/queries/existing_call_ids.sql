-- Which of a batch's event ids are stored already (the writer's duplicate check), the
-- ids bound as one comma-separated String: binding an Array(UUID) formats every id in
-- Python, this costs one join (ClickHouse splits it; the bloom filter index still applies).
SELECT event_id
FROM calls
WHERE ts_end BETWEEN {ts_from:DateTime64(3, 'UTC')} AND {ts_to:DateTime64(3, 'UTC')}
  AND event_id IN splitByChar(',', {event_ids:String})
