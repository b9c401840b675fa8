"""`llmtap alerts test`: one signed sample alert to one endpoint, so an operator can
check a receiver (its URL, its secret, its template) without waiting for a real alert.

One attempt, no retries, the same guard, template, signature and no-redirect rule as
real deliveries. The sample gets a fresh id each time, so a receiver that drops
duplicates still shows it. It is an alert as the stream raises one (a spike rule's
firing alert, a budget's threshold alert: made by the same code), of the spike rule or
budget the endpoint's ``rules`` name first where one is configured, else of a sample
one; its dimension, value and tenant are taken from the endpoint's filters where it
has them, so it looks like what the endpoint would receive.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import get_args

from llmtap.config_sections import BudgetConfig, SpikeRule, WebhookEndpoint
from llmtap.events import Alert, BudgetScope, utcnow
from sinks.webhooks import deliver, render
from stream import spikes
from stream.baselines import robust
from stream.budgets import spend

SAMPLE = "llmtap-test"  # the rule's or budget's name when the endpoint names none
# A series' usual level in each metric's unit (USD, calls, tokens, a 0..1 rate, ms).
USUAL = {
    "cost": Decimal("3.10"),
    "requests": Decimal(120),
    "tokens": Decimal(45_000),
    "error_rate": Decimal("0.02"),
    "p95_latency": Decimal(1_800),
}
CENT = Decimal("0.01")
# An error rate's window: its calls (at least the rule's min_requests, in hundreds, so a
# rate in cents is one of them) set its sampling noise, which floors the scale.
SAMPLE_CALLS = 200
SPREAD = tuple(Decimal(f) for f in ("0.9", "1.05", "1", "0.95", "1.1"))


def sample_alert(
    endpoint: WebhookEndpoint,
    *,
    spike_rules: Iterable[SpikeRule] = (),
    budgets: Iterable[BudgetConfig] = (),
) -> Alert:
    """The alert ``llmtap alerts test`` sends ``endpoint``: a budget's when the endpoint
    takes budget alerts only, else a spike rule's."""
    now = utcnow().replace(microsecond=0)
    name = endpoint.rules[0] if endpoint.rules else SAMPLE
    if endpoint.alert_types == ("budget",):
        alert = _budget_sample(endpoint, name, {b.name: b for b in budgets}, now)
    else:
        alert = _spike_sample(endpoint, name, {r.name: r for r in spike_rules}, now)
    return alert.model_copy(
        update={
            "event_id": uuid.uuid4(),
            "message": f"Test alert from `llmtap alerts test` for endpoint {endpoint.name}; "
            f"not real: {alert.message}",
        }
    )


def _spike_sample(
    endpoint: WebhookEndpoint, name: str, rules: dict[str, SpikeRule], now: datetime
) -> Alert:
    """The firing alert ``rule`` raises on its last closed window, its series having
    been at its usual level before (an error rate's of a window of ``SAMPLE_CALLS``
    calls or more): judged by :func:`stream.spikes.observe`."""
    rule = rules.get(name) or SpikeRule(
        name=SAMPLE,
        dimension=endpoint.dimensions[0] if endpoint.dimensions else "team",
        metric="cost",
    ).model_copy(update={"name": name})
    value = endpoint.values[0] if endpoint.values else "example"
    if rule.dimension == "tenant":
        tenant = value
    elif rule.dimension in ("model", "provider"):  # every tenant's calls
        tenant = ""
    else:
        tenant = endpoint.tenants[0] if endpoint.tenants else "example"
    seconds = int(now.timestamp()) // rule.window_s * rule.window_s
    end = datetime.fromtimestamp(seconds, UTC)
    start = end - timedelta(seconds=rule.window_s)
    usual = USUAL[rule.metric]
    history = tuple(usual * SPREAD[i % len(SPREAD)] for i in range(max(rule.min_history, 5)))
    before = spikes.SeriesState(history=history, last_window=start - (end - start))
    calls = None
    if rule.metric == "error_rate":
        calls = -(-max(SAMPLE_CALLS, rule.min_requests) // 100) * 100
    # As observe judges it: no profile yet.
    baseline = spikes.noise_floored(robust(history, rule.min_relative_scale), calls)
    level = spikes.alert_level(rule, baseline)
    observed = (level + (level - baseline.center) / 2).quantize(CENT, ROUND_CEILING)
    if calls:  # a rate: at most every call failed (at a level of 1 or less, it fires)
        observed = min(observed, max(level, Decimal(1)))
    _, alerts = spikes.observe(
        rule, value, before, start, end, observed, tenant=tenant, calls=calls
    )
    [alert] = alerts
    return alert


def _budget_sample(
    endpoint: WebhookEndpoint, name: str, configured: dict[str, BudgetConfig], now: datetime
) -> Alert:
    """The alert ``budget`` raises passing 80% of its limit (or its highest threshold,
    when 80 is none of them) this period: counted by :func:`stream.budgets.spend`."""
    budget = configured.get(name)
    if budget is None:
        scopes = get_args(BudgetScope)
        scope = next((d for d in endpoint.dimensions if d in scopes), "team")
        value = endpoint.values[0] if endpoint.values else "example"
        budget = BudgetConfig(
            name=SAMPLE,
            scope=scope,
            value=value,
            tenant="" if scope == "tenant" else next(iter(endpoint.tenants), "example"),
            limit_usd=Decimal(100),
        ).model_copy(update={"name": name})
    if not budget.thresholds:  # it raises none of its own: a sample at 80%
        budget = budget.model_copy(update={"thresholds": (80,)})
    threshold = 80 if 80 in budget.thresholds else max(budget.thresholds)
    spent = budget.limit_usd * (threshold + 5) / 100
    _, alerts = spend(budget, None, spent, now, now)
    return next(alert for alert in alerts if alert.threshold == threshold)


async def probe(
    endpoint: WebhookEndpoint,
    *,
    allow_private: bool,
    spike_rules: Iterable[SpikeRule] = (),
    budgets: Iterable[BudgetConfig] = (),
) -> tuple[Alert, deliver.Response]:
    """Send the sample once. Raises guard.Refused if the target is refused (nothing sent)."""
    alert = sample_alert(endpoint, spike_rules=spike_rules, budgets=budgets)
    body = render.render(render.load(endpoint.template), alert)
    async with deliver.client_session(allow_private=allow_private) as session:
        response = await deliver.send(
            session, endpoint, str(alert.event_id), body, allow_private=allow_private
        )
    return alert, response
