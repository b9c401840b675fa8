-- Whether a call's output_tokens is llmtap's count of the text streamed before the
-- stream broke off (or its client went away), not the provider's: see the event
-- contract's Usage.output_tokens_counted. Calls stored before this are false.
ALTER TABLE calls ADD COLUMN IF NOT EXISTS output_tokens_counted Bool DEFAULT false AFTER usage_missing;
