-- Why an alert is what it is (the event contract's Alert.period and Alert.resolution):
--   period      a budget alert's budget period as configured: day, week or month
--   resolution  a resolved spike alert's why: normal (a window back within its level),
--               quiet (no calls for a while), unjudged (no window with a value for as
--               long as the rule looks back; `observed` 0 then, not measured)
-- '' where the alert has none (a spike's period, a firing or budget alert's resolution),
-- as `tenant` (0013) and the other text columns of `alerts`: no Nullable. An alert stored
-- before this reads them from its published JSON (`payload`), which has carried them
-- since the stream raised them; older alerts have neither and read ''.
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS period LowCardinality(String)
    DEFAULT JSONExtractString(payload, 'period') AFTER message;
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS resolution LowCardinality(String)
    DEFAULT JSONExtractString(payload, 'resolution') AFTER period;
