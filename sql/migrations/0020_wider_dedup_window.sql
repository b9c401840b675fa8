-- The tables that drop a repeated insert into `calls` (0009, 0017) remember the last
-- 10,000 tokens, not 1,000. A writer given a crashed writer's partitions repeats its
-- insert cut short a session later (tens of seconds, a rebalance's wait more), every
-- other writer of the group inserting meanwhile: eight writers a few batches a second
-- each made 1,000 inserts in under a minute, and a repeat past them was stored twice.
-- sinks/clickhouse/replay.py reads the group's 9,000 newest records, within it.
{% for table in [
    "calls",
    "analytics_by_model_hourly",
    "analytics_by_model_daily",
    "analytics_by_team_daily",
    "analytics_by_user_daily",
    "analytics_by_property_daily",
    "analytics_by_provider_hourly",
    "analytics_by_tenant_hourly",
    "analytics_by_user_provider_daily",
    "analytics_by_key_daily",
] %}
ALTER TABLE {{ table }} MODIFY SETTING non_replicated_deduplication_window = 10000;
{% endfor %}
