"""Budget alerts as a receiver relies on them: once per period and limit, across worker
restarts and period boundaries, with what a receiver needs in them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka.errors import KafkaTimeoutError
from standardwebhooks import Webhook, WebhookVerificationError

from llmtap import wire
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import Alert, BudgetState
from llmtap.kafka import Kafka
from sql.store import Store
from stream.agents.budgets import BudgetsStep
from stream.budgets import spend
from stream.ledger import Ledger
from tests.conftest import Broker
from tests.test_budgets import costed
from tests.test_webhooks import SECRET, attempts, dispatching, endpoint, finished, publish, until


def budget(**overrides: object) -> BudgetConfig:
    fields: dict[str, object] = {
        "name": "acme-daily",
        "scope": "tenant",
        "value": "acme",
        "period": "day",
        "limit_usd": Decimal("10"),
    }
    return BudgetConfig.model_validate({**fields, **overrides})


class _Topic:
    """What the budgets step sends on a topic, in the order sent: delivered, unless the
    topic is ``failing`` (its partition's leader unreachable, say)."""

    def __init__(self, name: str, sent: list[tuple[str, bytes]]) -> None:
        self._name = name
        self._sent = sent
        self.failing = False
        self.slow = False  # a send takes a round trip (the loop runs other tasks)

    async def send(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        if self.slow:
            await asyncio.sleep(0.01)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.failing:
            done.set_exception(KafkaTimeoutError())
        else:
            self._sent.append((self._name, value))
            done.set_result(None)
        return done


class _App:
    """What the budgets step asks of the Faust app: its two topics, and its timer."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.timers: list[Callable[[], Awaitable[None]]] = []
        self._names = iter(("budgets", "alerts"))

        self.topics: dict[str, _Topic] = {}

    def topic(self, *args: object, **kwargs: object) -> _Topic:
        name = next(self._names)
        self.topics[name] = _Topic(name, self.sent)
        return self.topics[name]

    def timer(self, seconds: float) -> Callable[[Any], Any]:
        def register(f: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
            self.timers.append(f)
            return f

        return register


class _Followed:
    async def caught_up(self) -> None:
        return None


async def test_a_period_rolled_mid_batch_publishes_no_offset_ahead_of_its_alerts(
    monkeypatch: Any,
) -> None:
    """A batch read just before midnight crosses 80% of the day. The step counts it, then
    awaits (the windows step flushing, the costed events sent) before it flushes; the
    roll timer runs meanwhile, midnight passed, and publishes the new day's state, which
    carries the batch's offsets. A worker killed before the batch's flush restarts from
    that state: it skips the batch's calls (counted, as the offsets say), so it raises
    their alerts never. The day's 50% and 80% alerts were lost for good."""
    b = budget()
    app = _App()
    step = BudgetsStep(app, Ledger([b]), Kafka("127.0.0.1:1"))  # type: ignore[arg-type]
    step._follower = _Followed()  # type: ignore[assignment]
    await step.taken({0})
    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    before = midnight - timedelta(seconds=1)
    call = costed("9", before - timedelta(seconds=1))
    step.add(wire.decode_costed(call.model_dump_json().encode()), (0, 0), before)
    # The roll timer, as it runs while the batch awaits, just past midnight.
    monkeypatch.setattr("stream.agents.budgets.utcnow", lambda: midnight + timedelta(seconds=0.5))
    (roll,) = app.timers
    await roll()
    # Killed here, before the batch's flush: what the broker has is all a restart sees.
    alerts = {Alert.model_validate_json(v).event_id for t, v in app.sent if t == "alerts"}
    states = [BudgetState.model_validate_json(v) for t, v in app.sent if t == "budgets"]
    restarted = Ledger([b])
    for state in states:
        restarted.seed(state)
    restarted.roll(midnight + timedelta(seconds=2))
    _, raised = restarted.record(call, midnight + timedelta(seconds=2), (0, 0))
    alerts |= {a.event_id for a in raised}
    _, expected = spend(b, None, Decimal(9), call.response.ts_end, before)
    assert {a.threshold for a in expected} == {50, 80}
    assert {a.event_id for a in expected} <= alerts


async def test_no_state_is_delivered_that_counted_a_call_whose_alert_was_not() -> None:
    """A call crosses 80%: its alerts and the budget's state are sent together, on two
    topics (two partition leaders on a cluster). The alerts' send fails, the state's
    succeeds: the stage stops (the batch's offsets uncommitted), and the worker restarted
    from the delivered state skips the call, counted as its offsets say. Its alerts were
    never raised again."""
    b = budget()
    app = _App()
    step = BudgetsStep(app, Ledger([b]), Kafka("127.0.0.1:1"))  # type: ignore[arg-type]
    step._follower = _Followed()  # type: ignore[assignment]
    await step.taken({0})
    now = datetime(2026, 3, 31, 12, tzinfo=UTC)
    call = costed("9", now)
    step.add(wire.decode_costed(call.model_dump_json().encode()), (0, 0), now)
    app.topics["alerts"].failing = True
    with pytest.raises(KafkaTimeoutError):
        await step.flush()
    restarted = Ledger([b])
    for t, value in app.sent:
        if t == "budgets":
            restarted.seed(BudgetState.model_validate_json(value))
    _, raised = restarted.record(call, now, (0, 0))
    assert {a.threshold for a in raised} == {50, 80}


def test_an_alert_is_first_seen_within_its_period() -> None:
    """A call stamped by an ingress whose clock runs 2 s fast ends at 00:00:01 by it: it
    counts in the day the worker is in (23:59:59), and the alert it raises is that day's
    (window_end midnight). Its first_seen was the stamp, after the window it is of: a
    receiver filing alerts by when they were seen put it in the next day."""
    b = budget()
    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    now = midnight - timedelta(seconds=1)
    _, alerts = spend(b, None, Decimal(9), midnight + timedelta(seconds=1), now)
    assert alerts
    for alert in alerts:
        assert alert.window_start <= alert.first_seen < alert.window_end


# -- a receiver's view, on real parts (Tansu, chDB, an aiohttp receiver) ---------------


async def test_a_receiver_verifies_budget_alerts_and_gets_what_it_needs(
    broker: Broker, store: Store
) -> None:
    """Budget alerts the stream raises at the end of February (28 days) and of March
    (31), delivered to an aiohttp receiver that verifies them with `standardwebhooks`
    (the README's receiver) and dedupes on webhook-id: a first attempt that times out is
    sent again with the same id, each alert is accepted once, every id is distinct, and
    the body says the budget, its owner, spend, limit and threshold as exact decimal
    strings, and its period (``month``) with its start and reset in UTC."""
    name = f"revc-{uuid.uuid4().hex[:12]}"
    b = budget(name=name, scope="team", value="search", tenant="acme", period="month")
    raised: list[Alert] = []
    for end in (
        datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC),
        datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC),
    ):
        _, alerts = spend(b, None, Decimal("8.000000001"), end, end)
        raised += alerts
    assert len(raised) == 4
    seen: dict[str, list[dict[str, Any]]] = {}
    hook = Webhook(SECRET)
    first = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            alert = hook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return web.Response(status=401)
        webhook_id = request.headers["webhook-id"]
        if not seen and not first.is_set():  # the very first attempt: too slow
            first.set()
            await asyncio.sleep(2)
        if webhook_id in seen:  # a redelivery: acknowledge, do nothing
            seen[webhook_id].append(alert)
            return web.Response(status=200)
        seen[webhook_id] = [alert]
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/hook"))
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[endpoint("revc", url, rules=[name], timeout_s=0.5)],
        )
        await publish(broker.bootstrap, raised)
        async with dispatching(settings, store):
            await until(finished(store, [a.event_id for a in raised], pairs=4))
    finally:
        await server.close()

    assert set(seen) == {str(a.event_id) for a in raised}  # distinct, each accepted
    steps = attempts(store, [a.event_id for a in raised])
    assert sorted(len([s for s in v if s[0] > 0]) for v in steps.values()) == [1, 1, 1, 2]
    for alert in raised:
        body = seen[str(alert.event_id)][0]
        period_end = (
            "2026-03-01T00:00:00Z" if alert.window_start.month == 2 else "2026-04-01T00:00:00Z"
        )
        assert body["rule"] == name
        assert (body["dimension"], body["value"], body["tenant"]) == ("team", "search", "acme")
        assert (body["observed"], body["baseline"]) == ("8.000000001", "10")
        assert body["threshold"] in ("50", "80")
        assert body["window_end"] == period_end
        assert body["window_start"].endswith("-01T00:00:00Z")
        assert body["period"] == "month"  # the kind of period, not only its bounds


async def test_a_closing_period_s_state_is_not_published_after_its_budget_s_current(
    monkeypatch: Any,
) -> None:
    """A worker back after midnight with a backlog (its watermark before midnight): a
    call of today started the day; a call of yesterday, read after, crosses 100% of the
    closing day. The roll timer runs while that batch awaits before its flush, takes the
    closing state and the batch's alert, and awaits the alert's delivery; the flush ran
    meanwhile and published today's state, then the timer yesterday's, last: the
    compacted topic kept yesterday's (review R4)."""
    b = budget()
    app = _App()
    midnight = datetime(2026, 12, 1, tzinfo=UTC)
    takeover = midnight + timedelta(minutes=30)

    async def read_up_to() -> datetime:
        return midnight - timedelta(minutes=10)

    step = BudgetsStep(app, Ledger([b]), Kafka("127.0.0.1:1"), read_up_to)  # type: ignore[arg-type]
    step._follower = _Followed()  # type: ignore[assignment]
    await step.taken({0, 1})

    def add(usd: str, ended: datetime, position: tuple[int, int]) -> None:
        call = wire.decode_costed(costed(usd, ended).model_dump_json().encode())
        step.add(call, position, takeover)

    add("7", midnight - timedelta(hours=2), (1, 0))
    await step.flush()
    add("1", midnight + timedelta(minutes=1), (0, 0))  # today's, read first
    await step.flush()
    app.sent.clear()
    app.topics["alerts"].slow = True
    add("3", midnight - timedelta(minutes=5), (1, 1))  # yesterday's: 100%
    monkeypatch.setattr("stream.agents.budgets.utcnow", lambda: takeover)
    (roll,) = app.timers
    timer = asyncio.ensure_future(roll())
    await asyncio.sleep(0)  # the timer takes the closing state, awaits the alert
    await step.flush()
    await timer
    states = [BudgetState.model_validate_json(v) for t, v in app.sent if t == "budgets"]
    assert [(s.period_start, s.spent_usd) for s in states] == [
        (midnight - timedelta(days=1), Decimal(10)),
        (midnight, Decimal(1)),
    ]
    assert next(t for t, _ in app.sent) == "alerts"  # the alert before any state
