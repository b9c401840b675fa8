-- A budget's spend since its period started, rebuilt from the calls themselves (after
-- a restart, when the embedded broker kept nothing). The scope column is chosen from a
-- fixed list in sinks/budget_seed.py; the values are bound.
SELECT
    sum(cost_total) AS spent,
    max(ts_end) AS last_event_at
FROM calls
WHERE ts_end >= {period_start:DateTime64(3, 'UTC')}
  AND {{ column }} = {value:String}
{% if tenant %}
  AND tenant = {tenant:String}
{% endif %}
