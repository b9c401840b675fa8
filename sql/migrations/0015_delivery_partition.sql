-- The alerts-topic partition each delivery's alert was read from. The store process
-- that owns that partition (consumer group llmtap-webhooks) is the one that delivers
-- it, and resumes it after a restart or a rebalance: with two store processes, each
-- resumed every unfinished delivery, and sent it, and recorded its outcome, twice.
-- -1: recorded before this; the owner of partition 0 takes those.
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS alert_partition Int32 DEFAULT -1;
