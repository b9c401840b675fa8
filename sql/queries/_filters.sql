{#- The WHERE clause every analytics query shares (included by each of them, and by
    each branch of rollup_parts), so each filter is written once. `filters` names the
    filters that apply (structure); every value is a bound parameter. An unset tenant
    means "all tenants". `when` is the time condition: calls that ended since {since}
    unless the includer sets another (rollup_parts: a branch's buckets or edges). #}
WHERE {{ when | default("ts_end >= {since:DateTime64(3, 'UTC')}") }}
{% if 'tenant' in filters %}
  AND tenant = {tenant:String}
{% endif %}
{% if 'provider' in filters %}
  AND provider = {provider:String}
{% endif %}
{% if 'team' in filters %}
  AND team = {team:String}
{% endif %}
{% if 'feature' in filters %}
  AND feature = {feature:String}
{% endif %}
{% if 'env' in filters %}
  AND env = {env:String}
{% endif %}
{% if 'model_id' in filters %}
  AND model = {model_id:String}
{% endif %}
{% if 'user_id' in filters %}
  AND user = {user_id:String}
{% endif %}
