"""`llmtap alerts test`: one signed sample alert to one endpoint, so an operator can
check a receiver (its URL, its secret, its template) without waiting for a real alert.

One attempt, no retries, the same guard, template, signature and no-redirect rule as
real deliveries. The sample gets a fresh id each time, so a receiver that drops
duplicates still shows it; its rule, dimension, value and tenant are taken from the endpoint's
filters where it has them, so it looks like what the endpoint would receive.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

from llmtap.config import WebhookEndpoint
from llmtap.events import Alert, utcnow
from sinks.webhooks import deliver, render


def sample_alert(endpoint: WebhookEndpoint) -> Alert:
    now = utcnow().replace(microsecond=0)
    budget = endpoint.alert_types == ("budget",)
    every_tenant = bool(endpoint.dimensions) and endpoint.dimensions[0] in ("model", "provider")
    return Alert(
        event_id=uuid.uuid4(),
        alert_type="budget" if budget else "spike",
        state="firing",
        severity="info",
        rule=endpoint.rules[0] if endpoint.rules else "llmtap-test",
        dimension=endpoint.dimensions[0] if endpoint.dimensions else "team",
        value=endpoint.values[0] if endpoint.values else "example",
        tenant=endpoint.tenants[0] if endpoint.tenants else "" if every_tenant else "example",
        metric="spend" if budget else "cost",
        observed=Decimal("85.00") if budget else Decimal("12.50"),
        baseline=Decimal("100") if budget else Decimal("3.10"),
        threshold=Decimal("80") if budget else None,
        window_start=now - timedelta(minutes=5),
        window_end=now,
        first_seen=now,
        message=f"Test alert from `llmtap alerts test` for endpoint {endpoint.name}; not real.",
    )


async def probe(
    endpoint: WebhookEndpoint, *, allow_private: bool
) -> tuple[Alert, deliver.Response]:
    """Send the sample once. Raises guard.Refused if the target is refused (nothing sent)."""
    alert = sample_alert(endpoint)
    body = render.render(render.load(endpoint.template), alert)
    async with deliver.client_session(allow_private=allow_private) as session:
        response = await deliver.send(
            session, endpoint, str(alert.event_id), body, allow_private=allow_private
        )
    return alert, response
