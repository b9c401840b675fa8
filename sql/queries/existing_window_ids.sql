-- Which of a batch's window ids are stored already (the writer's duplicate check).
SELECT event_id
FROM windows
WHERE window_start BETWEEN {ts_from:DateTime64(3, 'UTC')} AND {ts_to:DateTime64(3, 'UTC')}
  AND event_id IN {event_ids:Array(UUID)}
