-- Merge every part of the analytics rollups now: what their min_age_to_force_merge_seconds
-- (0005_analytics_rollups.sql) does an hour after the calls arrived. One statement a line.
OPTIMIZE TABLE analytics_by_model_hourly FINAL;
OPTIMIZE TABLE analytics_by_model_daily FINAL;
OPTIMIZE TABLE analytics_by_team_daily FINAL;
OPTIMIZE TABLE analytics_by_user_daily FINAL;
OPTIMIZE TABLE analytics_by_property_daily FINAL;
OPTIMIZE TABLE analytics_by_provider_hourly FINAL;
OPTIMIZE TABLE analytics_by_tenant_hourly FINAL;
OPTIMIZE TABLE analytics_by_user_provider_daily FINAL;
OPTIMIZE TABLE analytics_by_key_daily FINAL;
