-- Two narrower rollups for the analytics API (read through sql/queries/rollup_parts.sql),
-- with 0005's macros, for what reads neither a model nor (the first) a provider:
--   analytics_by_tenant_hourly        tenant only: hourly timeseries and performance over
--                                     long ranges merge a fifth of the t-digest states of
--                                     analytics_by_provider_hourly (merging states is
--                                     what those queries cost);
--   analytics_by_user_provider_daily  tenant, provider, team, user, with what the users
--                                     endpoint needs and the set of models each used: a
--                                     tenth of analytics_by_user_daily's rows (which keeps
--                                     the model, for usage per model of one user).
-- Backfilled from `calls` like 0005 (TRUNCATE first; run with writers stopped, as
-- `llmtap store` does).
{% from "0005_analytics_rollups.sql" import rollup_table, rollup_select %}
{% set user_dims = ["tenant", "provider", "team", "user"] %}
{% for table, start_of, dims, by_user in [
    ("analytics_by_tenant_hourly", "toStartOfHour", ["tenant"], false),
    ("analytics_by_user_provider_daily", "toStartOfDay", user_dims, true),
] %}
{{ rollup_table(table, dims, by_user, with_models=by_user,
                order_by="(tenant, bucket)" if dims == ["tenant"] else none) }}
TRUNCATE TABLE {{ table }};

CREATE MATERIALIZED VIEW IF NOT EXISTS {{ table }}_mv TO {{ table }} AS
{{ rollup_select(start_of, dims, by_user, with_models=by_user) }};

INSERT INTO {{ table }}
{{ rollup_select(start_of, dims, by_user, with_models=by_user) }};
{% endfor %}
