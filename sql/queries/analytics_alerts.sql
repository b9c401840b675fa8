-- Alert history, spike and budget: alerts first seen in the range (or the window,
-- before its end when `bounded`), newest first, with
-- the optional filters (`alert_filters` names those that apply; values bound). FINAL
-- collapses the rare duplicate a dispatcher rebalance can leave (0002_alerts.sql).
-- A virtual key (`scoped`) sees only the alerts that are its own, as the dashboard shows
-- them: budget alerts of the budgets it may see ({budgets}, from the configuration:
-- (name, scope, value), so an alert raised while a name was another owner's is not this
-- one's) and, by `spikes_of` (sql/analytics.py, alert_scope), spike alerts on its
-- tenant's series: all of them (a key bound to no team or user), or its team's or its
-- user's. Spikes on a model or provider count every tenant's calls: admin keys only.
-- An alert stored before alerts had a tenant (0013) has tenant '': a budget alert is
-- matched on its budget alone (as is one raised while its budget counted every
-- tenant: '' says both), a spike only on a tenant series. A key of no tenant ('') sees
-- no spike on any other series: those of tenant '' count every tenant-less caller's
-- calls, and those stored before 0013 every tenant's.
-- `period` (a budget alert's) and `resolution` (a resolved spike alert's): '' on the
-- others, and on alerts raised before alerts carried them (0018).
SELECT
    event_id,
    first_seen,
    alert_type,
    state,
    severity,
    rule,
    dimension,
    value,
    tenant,
    metric,
    observed,
    baseline,
    threshold,
    window_start,
    window_end,
    message,
    period,
    resolution
FROM alerts FINAL
WHERE first_seen >= {since:DateTime64(3, 'UTC')}
{% if bounded | default(false) %}
  AND first_seen < {end:DateTime64(3, 'UTC')}
{% endif %}
{% if 'alert_type' in alert_filters %}
  AND alert_type = {alert_type:String}
{% endif %}
{% if 'state' in alert_filters %}
  AND state = {state:String}
{% endif %}
{% if 'severity' in alert_filters %}
  AND severity = {severity:String}
{% endif %}
{% if 'rule' in alert_filters %}
  AND rule = {rule:String}
{% endif %}
{% if scoped %}
  AND (
    (
      alert_type = 'budget'
      AND has({budgets:Array(Tuple(String, String, String))}, (rule, dimension, value))
      AND tenant IN ({tenant:String}, '')
    )
{% if spikes_of == 'tenant' %}
    OR (
      alert_type = 'spike'
      AND (
        (tenant = {tenant:String} AND tenant != '' AND dimension NOT IN ('model', 'provider'))
        OR (tenant = '' AND dimension = 'tenant' AND value = {tenant:String})
      )
    )
{% elif spikes_of %}
    OR (
      alert_type = 'spike'
      AND tenant = {tenant:String}
      AND tenant != ''
      AND dimension = {spikes_dimension:String}
      AND value = {spikes_value:String}
    )
{% endif %}
  )
{% endif %}
ORDER BY first_seen DESC, event_id
LIMIT {limit:UInt16} OFFSET {offset:UInt32}
