-- Which of a batch's event ids are stored already (the writer's duplicate check).
SELECT event_id
FROM calls
WHERE ts_end BETWEEN {ts_from:DateTime64(3, 'UTC')} AND {ts_to:DateTime64(3, 'UTC')}
  AND event_id IN {event_ids:Array(UUID)}
