-- When a failed attempt's retry is due: its backoff, or the receiver's retry-after,
-- from the moment it failed (NULL on rows that are not `retrying`). A delivery resumed
-- after a restart or a rebalance waits until then: it was sent at once, so a receiver
-- that asked for an hour's rest with 429 and retry-after was asked again straight away.
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS retry_at Nullable(DateTime64(3, 'UTC'));
