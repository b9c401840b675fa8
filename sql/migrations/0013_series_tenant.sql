-- The tenant of a window's series and of an alert (the event contract's
-- WindowEvent.tenant and Alert.tenant): teams, users, features and keys are counted
-- within their tenant, so two tenants' team "search" are two series, and a spike on
-- one says whose it is. "" for models and providers (every tenant's calls), and for
-- every window and alert stored before this.
ALTER TABLE windows ADD COLUMN IF NOT EXISTS tenant String DEFAULT '' AFTER value;
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS tenant String DEFAULT '' AFTER value;
