-- The terms a call was billed on beyond its model and tokens, each the provider's own
-- word in its answer (the event contract's Usage): the speed that served it (`fast`:
-- Anthropic's fast mode), the OpenAI service tier (`flex`, `priority`) and where its
-- inference ran (`us`: Anthropic's US-only data residency). Each multiplies or replaces
-- the standard rates its cost columns were computed at, so a SQL reader can tell why
-- two calls of one model and size cost apart. Calls stored before this read the
-- standard terms, at whose rates they were priced.
ALTER TABLE calls ADD COLUMN IF NOT EXISTS speed LowCardinality(String) DEFAULT 'standard' AFTER web_search_requests;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String) DEFAULT 'standard' AFTER speed;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS inference_geo LowCardinality(String) DEFAULT 'global' AFTER service_tier;
