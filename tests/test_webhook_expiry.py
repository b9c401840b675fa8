"""Unfinished webhook deliveries too old to send (an endpoint's ``max_age_s``), and those
of endpoints no longer configured: on chDB, Tansu and a receiver here (whose every
request's signature is verified, as in test_webhooks.py). Old deliveries are rows an
earlier store process recorded, with their old timestamps: no clock is faked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import TopicPartition
from pydantic import ValidationError

from llmtap.config import Settings
from llmtap.config_sections import WebhookEndpoint
from llmtap.events import Alert
from llmtap.names import Names
from sinks.webhooks import records, redeliver
from sinks.webhooks.dispatcher import WebhookDispatcher
from sinks.webhooks.records import Attempt
from sinks.webhooks.worker import EndpointWorker, Owned
from sql.store import Store
from tests.conftest import Broker
from tests.prometheus import sample
from tests.test_webhooks import (
    SECRET,
    attempts,
    dispatching,
    endpoint,
    finished,
    make_alert,
    receiver,
    scrape,
    until,
)

DAYS_AGO = datetime.now(UTC) - timedelta(days=3)


def recorded_earlier(store: Store, alert: Alert, name: str, *steps: Attempt) -> None:
    """The alert stored, and its delivery's rows as an earlier store process left them."""
    records.store_batch(store, [alert], [], [], {alert.event_id: 0})  # the alert only
    pending = Attempt(alert.event_id, name, 0, DAYS_AGO, None, "", "pending", 0)
    records.record(store, [pending, *steps])


def rows(store: Store, alert_id: uuid.UUID) -> list[tuple[int, int, str, str]]:
    found = store.rows(
        "SELECT redelivery, attempt, outcome, error FROM webhook_deliveries"
        " WHERE alert_id = {id:UUID} ORDER BY redelivery, ts, attempt",
        {"id": alert_id},
    )
    return [(r["redelivery"], r["attempt"], r["outcome"], r["error"]) for r in found]


def test_max_age_s_outlasts_the_retry_schedule() -> None:
    def hook(**changes: Any) -> WebhookEndpoint:
        return WebhookEndpoint(
            name="x", url="https://hooks.example.com/x", secret=SECRET, **changes
        )

    default = hook()
    assert 5_000 < default.retry_schedule_s() < 9_000  # 33 attempts: about 2 hours at most
    assert default.max_age() == timedelta(days=1)
    week = hook(max_attempts=2_000)  # retries outlasting the default
    assert week.max_age() == timedelta(seconds=2 * week.retry_schedule_s()) > timedelta(days=7)
    assert hook(max_age_s=3_600, max_attempts=3).max_age() == timedelta(hours=1)
    with pytest.raises(ValidationError, match=r"max_age_s \(3600\) must exceed the \d+ s"):
        hook(max_age_s=3_600)  # the default 33 attempts
    with pytest.raises(ValidationError, match="max_age_s"):
        hook(max_age_s=0)


async def test_a_delivery_begun_longer_ago_than_max_age_is_dead_lettered_unsent(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint configured again days after it was removed (or a store process down
    for days): its deliveries left unfinished then are dead-lettered, not sent, and one
    WARNING says how many; a fresh one is delivered; `llmtap alerts redeliver` sends an
    expired one deliberately, its clock restarted."""
    rule = f"rule-{uuid.uuid4()}"
    pending, retrying, fresh = (make_alert(rule, value=v) for v in ("a", "b", "c"))
    async with receiver({}) as rec:
        hook = endpoint("aging", f"{rec.base_url}/aging", rules=[rule])  # max_age_s: a day
        recorded_earlier(store, pending, "aging")
        failed = Attempt(  # tried at once: its sending began 3 days ago too
            retrying.event_id, "aging", 1, DAYS_AGO, 503, "HTTP 503",
            "retrying", 0, retry_at=DAYS_AGO + timedelta(seconds=1),
        )  # fmt: skip
        recorded_earlier(store, retrying, "aging", failed)
        records.store_batch(store, [fresh], [("aging", fresh)], [], {fresh.event_id: 0})
        dispatcher = WebhookDispatcher(Settings(webhook_allow_private=True, webhooks=[hook]), store)
        worker = dispatcher.workers["aging"]
        running = asyncio.create_task(worker.run())
        ids = [pending.event_id, retrying.event_id, fresh.event_id]
        try:
            with caplog.at_level(logging.WARNING, logger="sinks.webhooks"):
                await dispatcher.handover.on_partitions_assigned(
                    [TopicPartition(Names().alerts, 0)]
                )
                await until(finished(store, ids, pairs=3))
                await until(lambda: worker.idle)
            assert [a.webhook_id for a in rec.accepted] == [str(fresh.event_id)]
            assert len(rec.arrivals) == 1  # nothing else was even tried
            metrics = scrape(dispatcher)

            selection = redeliver.Selection("aging", (pending.event_id,))
            assert await redeliver.redeliver(store, dispatcher, selection) == 1
            await until(lambda: len(rec.accepted) == 2)
            await until(lambda: worker.idle)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    steps = attempts(store, ids)
    assert [s[2] for s in steps["aging", str(fresh.event_id)]] == ["pending", "delivered"]
    (*_, expired) = steps["aging", str(retrying.event_id)]
    assert expired[:3] == (1, None, "dead_lettered")  # the attempts made, counted
    assert expired[3].startswith("expired: not sent, its sending began 3 days, ")
    assert "max_age_s 86400" in expired[3]
    first, dead, again, delivered = rows(store, pending.event_id)
    assert (first[:3], dead[:3]) == ((0, 0, "pending"), (0, 0, "dead_lettered"))
    assert dead[3].startswith("expired: not sent, its sending began 3 days, ")
    assert (again[:3], delivered[:3]) == ((1, 0, "pending"), (1, 1, "delivered"))
    assert [a.webhook_id for a in rec.accepted] == [str(fresh.event_id), str(pending.event_id)]

    labels: dict[str, Any] = {"endpoint": "aging"}
    finals = "llmtap_webhook_deliveries_total"
    assert sample(metrics, finals, **labels, outcome="dead_lettered") == 2
    assert sample(metrics, finals, **labels, outcome="delivered") == 1
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in said if "expired" in m]) == 1, said  # one line, not one each
    (line,) = [m for m in said if "expired" in m]
    assert line.startswith("webhook aging: 2 unfinished deliveries expired")
    assert "llmtap alerts redeliver --endpoint aging" in line


async def test_a_rescan_that_only_expired_deliveries_goes_on_to_the_younger_ones(
    store: Store,
) -> None:
    """A store process back after days: the oldest unfinished deliveries a rescan reads
    (as many as its queue holds) are all expired. It dead-letters them and reads on:
    the younger ones behind them are sent at once, not left until some new alert, or a
    rebalance, wakes the worker (by then they may have expired too)."""
    rule = f"rule-{uuid.uuid4()}"
    old = [make_alert(rule, value=f"old-{n}") for n in range(2)]
    fresh = make_alert(rule, value="fresh")
    async with receiver({}) as rec:
        hook = endpoint("behind", f"{rec.base_url}/behind", rules=[rule])
        for alert in old:
            recorded_earlier(store, alert, "behind")
        records.store_batch(store, [fresh], [("behind", fresh)], [], {fresh.event_id: 0})
        owned = Owned(frozenset({0}))
        worker = EndpointWorker(hook, store, allow_private=True, owned=owned, queue_size=2)
        running = asyncio.create_task(worker.run())
        try:
            worker.reassigned()
            await until(finished(store, [*(a.event_id for a in old), fresh.event_id], pairs=3))
            await until(lambda: len(rec.accepted) == 1)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    assert [a.webhook_id for a in rec.accepted] == [str(fresh.event_id)]


async def test_unfinished_deliveries_of_an_endpoint_not_configured_are_said_at_start(
    broker: Broker, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint renamed: the deliveries left unfinished under its old name were
    never sent, and nothing said so."""
    old = [make_alert(value=f"old-{n}") for n in range(4)]
    for alert in old:
        recorded_earlier(store, alert, "oncall-old")
    done = Attempt(old[0].event_id, "oncall-old", 1, DAYS_AGO, 200, "", "delivered", 0)
    given_up = Attempt(old[1].event_id, "oncall-old", 1, DAYS_AGO, 500, "", "dead_lettered", 0)
    redelivered = Attempt(
        old[1].event_id, "oncall-old", 0, DAYS_AGO, None, "", "pending", 0, None, 1
    )
    records.record(store, [done, given_up, redelivered])  # old[1]: unfinished again
    finished_only = make_alert(value="finished")
    recorded_earlier(store, finished_only, "removed")
    closed = Attempt(finished_only.event_id, "removed", 1, DAYS_AGO, 200, "", "delivered", 0)
    records.record(store, [closed])
    current = make_alert(value="current")
    recorded_earlier(store, current, "oncall")

    hook = endpoint("oncall", "http://127.0.0.1:9/", rules=[f"rule-{uuid.uuid4()}"])
    settings = Settings(
        kafka_bootstrap=broker.bootstrap, webhook_allow_private=True, webhooks=[hook]
    )
    with caplog.at_level(logging.WARNING, logger="sinks.webhooks"):
        async with dispatching(settings, store):

            def orphaned() -> list[str]:
                warned = [r for r in caplog.records if r.name == "sinks.webhooks.dispatcher"]
                return [r.getMessage() for r in warned if r.levelno == logging.WARNING]

            await until(lambda: bool(orphaned()))
    (line,) = orphaned()  # "removed" has none unfinished; "oncall" is configured
    assert line.startswith("webhook oncall-old: not configured (renamed or removed), 3 unfinished")
    assert "configure it again under that name" in line


def test_time_queued_before_the_first_attempt_does_not_count_toward_expiry(store: Store) -> None:
    """A delivery pending three days (behind a backlog, or its endpoint's process down)
    whose first attempt was an hour ago is being retried: resumed, not expired. One
    never tried is judged from when it was recorded pending."""
    rule = f"rule-{uuid.uuid4()}"
    retried, untried = make_alert(rule, value="retried"), make_alert(rule, value="untried")
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    failed = Attempt(
        retried.event_id, "backlog", 1, hour_ago, 503, "HTTP 503", "retrying", 0,
        retry_at=hour_ago + timedelta(seconds=30),
    )  # fmt: skip
    recorded_earlier(store, retried, "backlog", failed)
    recorded_earlier(store, untried, "backlog")
    resumed = records.unfinished(store, "backlog", 10, [0], timedelta(days=1))
    assert [j.alert.event_id for j in resumed.jobs] == [retried.event_id]
    assert resumed.jobs[0].attempts == 1
    assert resumed.given_up == 1
    assert rows(store, retried.event_id)[-1][2] == "retrying"
    (*_, expired) = rows(store, untried.event_id)
    assert expired[2] == "dead_lettered"
    assert expired[3].startswith("expired: not sent, its sending began 3 days, ")
