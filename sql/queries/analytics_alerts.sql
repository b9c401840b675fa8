-- Alert history, spike and budget: alerts first seen in the range, newest first, with
-- the optional filters (`alert_filters` names those that apply; values bound). FINAL
-- collapses the rare duplicate a dispatcher rebalance can leave (0002_alerts.sql).
-- Alerts carry no tenant, so a virtual key (`scoped`) sees only the alerts that are
-- its own, as the dashboard shows them: budget alerts of the budgets it may see
-- ({budgets}, from the configuration: (name, scope, value), so an alert raised while a
-- name was another owner's is not this one's), and (`tenant_spikes`: a key bound to no
-- team or user) spike alerts on its tenant. Spikes on a team, user, key, model, provider or
-- feature count every tenant's calls: admin keys only.
SELECT
    event_id,
    first_seen,
    alert_type,
    state,
    severity,
    rule,
    dimension,
    value,
    metric,
    observed,
    baseline,
    threshold,
    window_start,
    window_end,
    message
FROM alerts FINAL
WHERE first_seen >= {since:DateTime64(3, 'UTC')}
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
    )
{% if tenant_spikes %}
    OR (alert_type = 'spike' AND dimension = 'tenant' AND value = {tenant:String})
{% endif %}
  )
{% endif %}
ORDER BY first_seen DESC, event_id
LIMIT {limit:UInt16}
