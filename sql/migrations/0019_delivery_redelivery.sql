-- Which sending of a delivery a row belongs to: 0 the first; `llmtap alerts redeliver`
-- makes a delivery given up (`dead_lettered`, or `gone`: its receiver answered 410) due
-- again by recording a new `pending` row one higher, whose attempts count from 0 again.
-- A delivery's state is that of its highest redelivery's rows; the earlier stay as
-- they were (the log is append-only).
ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS redelivery UInt16 DEFAULT 0;
