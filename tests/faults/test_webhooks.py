"""A webhook receiver down, then up: each alert is delivered, and accepted, exactly once.

Real alerts: a tiny budget (no hard cap, so no call is refused) whose thresholds the
load crosses; the stream raises one budget alert per threshold, with an id derived
from the budget, the period, its limit and the threshold. The receiver's port is closed at first,
so every delivery fails (connection refused) and is retried; once the store has
recorded a failed attempt for every alert, the receiver starts, verifying each request
with the Standard Webhooks library as a user's receiver would.

What this cannot show: a receiver that accepted a delivery whose answer was lost
(llmtap then delivers it again, by design: at least once, same ``webhook-id``).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

from llmtap.config_sections import BudgetConfig
from llmtap.events import utcnow
from stream.budgets import period_bounds, threshold_alert_id
from tests.fake_provider import free_port, serve
from tests.faults.conftest import MakeCluster
from tests.faults.harness import Cluster, until
from tests.faults.load import Load, compare

pytestmark = pytest.mark.faults

FEATURE = "webhooks"
SECRET = "whsec_" + base64.b64encode(b"llmtap-fault-suite-webhook-secret").decode()
CALLS = 12  # 4 of each kind: $0.00016768 at the fake's usage (see test_worker.COST)
LIMIT = Decimal("0.00016")
THRESHOLDS = (25, 50, 75, 100)


class Receiver:
    """Accepts (204) every request whose signature verifies; refuses (401) the rest."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.bodies: dict[str, dict[str, Any]] = {}
        self.unverified: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            alert = Webhook(SECRET).verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            self.unverified.append(repr(exc))
            return web.Response(status=401)
        webhook_id = request.headers["webhook-id"]
        self.accepted.append(webhook_id)
        self.bodies[webhook_id] = alert
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app


async def deliveries(cluster: Cluster) -> dict[str, Counter[str]]:
    """Per alert id, how many delivery steps of each outcome the store recorded."""
    rows = await cluster.sql(
        "SELECT toString(alert_id) AS id, outcome, count() AS n FROM webhook_deliveries "
        "WHERE endpoint = 'receiver' GROUP BY id, outcome"
    )
    found: dict[str, Counter[str]] = {}
    for row in rows:
        found.setdefault(row["id"], Counter())[row["outcome"]] += int(row["n"])
    return found


async def test_alerts_reach_a_receiver_that_was_down_exactly_once(
    make_cluster: MakeCluster,
) -> None:
    port = free_port()  # nothing listens here yet
    budget = {
        "name": FEATURE,
        "scope": "feature",
        "value": FEATURE,
        "period": "month",
        "limit_usd": str(LIMIT),
        "thresholds": list(THRESHOLDS),
        "hard_cap": False,
    }
    hook = {
        "name": "receiver",
        "url": f"http://127.0.0.1:{port}/hook",
        "secret": SECRET,
        "alert_types": ["budget"],
        "backoff_s": 0.2,
        "max_attempts": 12,  # ~100 s of retries at most: never dead-lettered here
    }
    cluster = await make_cluster(
        {
            "LLMTAP_BUDGETS": json.dumps([budget]),
            "LLMTAP_WEBHOOKS": json.dumps([hook]),
            "LLMTAP_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on loopback
        }
    )
    period_start, _ = period_bounds("month", utcnow())
    config = BudgetConfig.model_validate(budget)
    expected = {str(threshold_alert_id(config, period_start, t)) for t in THRESHOLDS}
    await cluster.start_all()
    load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
    receiver = Receiver()
    runner: web.AppRunner | None = None
    try:
        await load.run(CALLS, concurrency=1)  # one at a time: one threshold per call or so
        assert load.failures == []

        seen: dict[str, Any] = {}

        async def failing() -> bool:
            """Every alert recorded for delivery, and attempts failing (one delivery at a
            time per endpoint, in order: the others wait behind the first)."""
            found = seen["deliveries"] = await deliveries(cluster)
            retries = sum(c["retrying"] for c in found.values())
            return set(found) == expected and retries >= 3

        await until(
            failing,
            "every alert pending, three failed attempts",
            60,
            context=lambda: f"expected {sorted(expected)}, recorded {seen}",
        )
        assert receiver.accepted == []

        runner = await serve(receiver.app(), port)  # the receiver comes up

        async def all_delivered() -> bool:
            found = await deliveries(cluster)
            return set(found) == expected and all(c["delivered"] == 1 for c in found.values())

        await until(all_delivered, "every alert delivered", 60)
        await cluster.quiet()
        assert Counter(receiver.accepted) == dict.fromkeys(expected, 1)
        assert receiver.unverified == []
        thresholds = sorted(int(Decimal(str(a["threshold"]))) for a in receiver.bodies.values())
        assert thresholds == list(THRESHOLDS)
        assert {a["rule"] for a in receiver.bodies.values()} == {FEATURE}
        assert {a["event_id"] for a in receiver.bodies.values()} == expected
        final = await deliveries(cluster)
        assert {i: c["delivered"] + c["dead_lettered"] for i, c in final.items()} == dict.fromkeys(
            expected, 1
        )
        stored = await cluster.sql(
            "SELECT toString(event_id) AS id, count() AS n FROM alerts "
            f"WHERE rule = '{FEATURE}' GROUP BY id"
        )
        assert {r["id"]: r["n"] for r in stored} == dict.fromkeys(expected, 1)
        assert compare(load.sent, await cluster.calls_by_request(FEATURE)) == []
        assert cluster.dead() == []
    finally:
        await load.close()
        if runner is not None:
            await runner.cleanup()
