-- Web searches a provider ran for a call (a server-side tool: Anthropic's web search,
-- the Responses API's web_search) and their fee, billed per search on top of the
-- tokens: see the event contract's Usage.web_search_requests and Cost.web_search.
-- cost_total includes the fee. Calls stored before this ran none that were counted: a
-- priced one reads a fee of 0, an unpriced one null, as every cost column of its row.
-- The rollups keep summing cost_total; their token parts do not include the fee, so
-- the analytics API reports it as what the total holds beyond them.
ALTER TABLE calls ADD COLUMN IF NOT EXISTS web_search_requests UInt32 DEFAULT 0 AFTER output_tokens_counted;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS cost_web_search Nullable(Decimal(18, 9))
    DEFAULT if(cost_total IS NULL, NULL, toDecimal64(0, 9)) AFTER cost_reasoning;
