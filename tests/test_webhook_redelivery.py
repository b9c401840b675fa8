"""Given-up webhook deliveries sent again (`llmtap alerts redeliver`), and a receiver
answering 410 Gone disabling its endpoint: on Tansu, chDB and receivers here (whose
every request's signature is verified, as in test_webhooks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaProducer, TopicPartition

from ingress.guards.keys import create_key, hash_key
from llmtap import topics
from llmtap.config import ADMIN_KEY_ENV, Settings
from llmtap.events import Alert
from sinks.app import DISPATCHER, REDELIVER_ADMIN_ONLY, create_app
from sinks.webhooks import records, redeliver
from sinks.webhooks.dispatcher import WebhookDispatcher
from sinks.webhooks.worker import EndpointWorker, Owned
from sql import analytics
from sql.migrate import migrate
from sql.params import BadParameter
from sql.store import Store
from tests.conftest import Broker
from tests.prometheus import sample
from tests.test_webhooks import (
    Behaviour,
    attempts,
    dispatching,
    endpoint,
    finished,
    make_alert,
    publish,
    receiver,
    scrape,
    until,
)

ADMIN_SECRET = "lta_redelivery-tests-admin-key"


async def publish_on(settings: Settings, alerts: list[Alert]) -> None:
    """Publish alerts on the settings' namespace's alerts topic, as the stream does."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for alert in alerts:
            alerts_topic = settings.kafka.names.alerts
            value, key = alert.model_dump_json().encode(), topics.alert_key(alert)
            await producer.send_and_wait(alerts_topic, value, key=key)
    finally:
        await producer.stop()


def delivery_rows(store: Store, alert_id: uuid.UUID) -> list[tuple[int, int, str]]:
    rows = store.rows(
        "SELECT redelivery, attempt, outcome FROM webhook_deliveries"
        " WHERE alert_id = {id:UUID} ORDER BY redelivery, attempt, ts",
        {"id": alert_id},
    )
    return [(r["redelivery"], r["attempt"], r["outcome"]) for r in rows]


async def test_llmtap_alerts_redeliver_sends_a_dead_lettered_delivery_again_once(
    broker: Broker,
    tmp_path: Path,
    cli: Callable[[list[str]], int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The store process runs (its API, writer and dispatcher, in this process); a
    delivery is dead-lettered (500s, max_attempts 2); the receiver is fixed; the command
    is run twice at once: one of them makes it due again, and it is delivered once,
    with the alert id as webhook-id, as new rows of a redelivery."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    async with receiver({"dead": Behaviour(always=500)}) as rec:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            kafka_namespace=f"redeliver{uuid.uuid4().hex[:8]}",
            data_dir=tmp_path,
            sink_decode_processes=0,
            admin_key_hashes=[hash_key(ADMIN_SECRET)],
            webhook_allow_private=True,
            webhooks=[endpoint("dead", f"{rec.base_url}/dead", rules=[rule], max_attempts=2)],
        )
        await topics.ensure_topics(settings.kafka, settings.topic_partitions, 1)
        migrating = Store(settings.store_dsn)  # as `llmtap store` does before its app
        migrate(migrating)
        migrating.close()
        virtual, _ = create_key(settings.key_file, tenant="acme")
        app = create_app(settings)
        async with TestServer(app, host="127.0.0.1") as server:
            store = app[analytics.STORE]
            worker = app[DISPATCHER].workers["dead"]
            await publish_on(settings, [alert])
            await until(finished(store, [alert.event_id], pairs=1))
            assert len(rec.requests("dead")) == 2

            rec.behaviours["dead"] = Behaviour()  # fixed
            monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_SECRET)
            argv = ["alerts", "redeliver", "--endpoint", "dead"]
            argv += ["--url", str(server.make_url("/api/v1"))]
            capsys.readouterr()
            statuses = list(
                await asyncio.gather(asyncio.to_thread(cli, argv), asyncio.to_thread(cli, argv))
            )
            said = capsys.readouterr().out
            assert statuses == [0, 0], said
            counts = sorted(int(n) for n in re.findall(r"^(\d+) given-up deliveries", said, re.M))
            assert counts == [0, 1], said  # the second found it pending, not given up

            await until(lambda: len(rec.accepted) == 1)
            await until(lambda: worker.idle)
            # Run again once delivered: nothing given up, nothing sent.
            assert await asyncio.to_thread(cli, argv) == 0
            assert capsys.readouterr().out.startswith("0 given-up deliveries")
            await until(lambda: worker.idle)
            rows = await asyncio.to_thread(delivery_rows, store, alert.event_id)

            # An admin key only (a virtual key: 403), and an endpoint that exists, by name.
            monkeypatch.setenv(ADMIN_KEY_ENV, "lta_not-a-key")
            assert await asyncio.to_thread(cli, argv) == 2
            assert "unknown or revoked key" in capsys.readouterr().err
            route = server.make_url("/api/v1/webhooks/dead/redeliver")
            async with (
                aiohttp.ClientSession() as http,
                http.post(route, headers={"Authorization": f"Bearer {virtual}"}) as refused,
            ):
                assert refused.status == 403
                assert (await refused.json())["error"]["message"] == REDELIVER_ADMIN_ONLY
            monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN_SECRET)
            unknown = ["alerts", "redeliver", "--endpoint", "nope", *argv[4:]]
            assert await asyncio.to_thread(cli, unknown) == 2
            assert "no webhook endpoint named 'nope' (endpoints: dead)" in capsys.readouterr().err
            await asyncio.to_thread(answers_as_documented, str(server.make_url("")), virtual)

    assert rec.bad_signatures == 0
    assert [a.webhook_id for a in rec.accepted] == [str(alert.event_id)]
    assert len(rec.requests("dead")) == 3
    assert rows == [
        (0, 0, "pending"),
        (0, 1, "retrying"),
        (0, 2, "dead_lettered"),
        (1, 0, "pending"),  # a fresh schedule: its attempts count from 0 again
        (1, 1, "delivered"),
    ]


def answers_as_documented(base_url: str, virtual_key: str) -> None:
    """The store process's OpenAPI document has the route, and its answers (200, 400,
    403, 404) are the ones it documents (schemathesis validates each)."""
    document = requests.get(f"{base_url}/api/v1/openapi.json", timeout=10).json()
    route = "/api/v1/webhooks/{endpoint}/redeliver"
    operation = schemathesis.openapi.from_dict(document)[route]["POST"]
    admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    asked: list[tuple[str, dict[str, str], dict[str, Any], int]] = [
        ("dead", admin, {"since": "2026-01-01T00:00:00Z"}, 200),
        ("dead", admin, {"alert_ids": ["not-a-uuid"]}, 400),
        ("dead", {"Authorization": f"Bearer {virtual_key}"}, {}, 403),
        ("nope", admin, {}, 404),
    ]
    for name, headers, body, status in asked:
        url = f"{base_url}/api/v1/webhooks/{name}/redeliver"
        answer = requests.post(url, json=body, headers=headers, timeout=30)
        assert answer.status_code == status, answer.text
        operation.validate_response(answer)


async def test_redeliver_selects_by_alert_id_and_by_when_given_up(
    broker: Broker, store: Store
) -> None:
    rule = f"rule-{uuid.uuid4()}"
    first, second = make_alert(rule), make_alert(rule, value="ads")
    async with receiver({"dead": Behaviour(always=500)}) as rec:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[endpoint("dead", f"{rec.base_url}/dead", rules=[rule], max_attempts=1)],
        )
        await publish(broker.bootstrap, [first, second])
        async with dispatching(settings, store) as dispatcher:
            ids = [first.event_id, second.event_id]
            await until(finished(store, ids, pairs=2))
            later = max(
                r["ts"]
                for r in store.rows(
                    "SELECT ts FROM webhook_deliveries WHERE alert_id IN {ids:Array(UUID)}",
                    {"ids": ids},
                )
            )
            rec.behaviours["dead"] = Behaviour()
            since = redeliver.parse("dead", b'{"since": "2999-01-01T00:00:00Z"}')
            assert await redeliver.redeliver(store, dispatcher, since) == 0
            assert not redeliver.parse("dead", b"{}").alert_ids
            only = redeliver.Selection("dead", (second.event_id,), later.replace(year=2000))
            assert await redeliver.redeliver(store, dispatcher, only) == 1
            await until(lambda: len(rec.accepted) == 1)
    assert [a.webhook_id for a in rec.accepted] == [str(second.event_id)]
    assert attempts(store, [first.event_id])["dead", str(first.event_id)][-1][2] == (
        "dead_lettered"
    )


async def test_a_refused_delivery_is_redelivered_once_the_guard_lets_it_through(
    broker: Broker, store: Store
) -> None:
    """A delivery the SSRF guard refused (a private receiver before
    `webhook_allow_private` was set, or a DNS answer with a private address for a
    while) is given up as much as a dead-lettered one: once the configuration lets the
    receiver through, `llmtap alerts redeliver` sends it (it found nothing to send)."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    async with receiver({"inside": Behaviour()}) as rec:
        hook = endpoint("inside", f"{rec.base_url}/inside", rules=[rule])
        refusing = Settings(kafka_bootstrap=broker.bootstrap, webhooks=[hook])
        await publish(broker.bootstrap, [alert])
        async with dispatching(refusing, store):
            await until(finished(store, [alert.event_id], pairs=1))
        assert rec.requests("inside") == []
        allowing = refusing.model_copy(update={"webhook_allow_private": True})
        async with dispatching(allowing, store) as dispatcher:
            again = redeliver.Selection("inside")
            assert await redeliver.redeliver(store, dispatcher, again) == 1
            await until(lambda: len(rec.accepted) == 1)
            await until(lambda: dispatcher.workers["inside"].idle)
        rows = await asyncio.to_thread(delivery_rows, store, alert.event_id)
    assert [a.webhook_id for a in rec.accepted] == [str(alert.event_id)]
    assert rows == [(0, 0, "pending"), (0, 1, "refused"), (1, 0, "pending"), (1, 1, "delivered")]


async def test_a_template_error_is_refused_unsent_and_redelivered_once_fixed(
    broker: Broker, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A template that fails for an alert (it prints a budget's `period`, which a spike
    alert has none of) sends nothing: the delivery is given up at once, recorded
    `refused` with the template's error (logged as an ERROR too), no HTTP attempt
    counted. Once the configuration names a fixed template, `llmtap alerts redeliver`
    sends it."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)  # a spike alert: no period
    broken = tmp_path / "broken.j2"
    broken.write_text('{"text": "{{ alert.rule }} this {{ alert.period }}"}')
    fixed = tmp_path / "fixed.j2"
    fixed.write_text('{"text": {{ alert.rule | tojson }}}')
    async with receiver({"tmpl": Behaviour()}) as rec:
        hook = endpoint("tmpl", f"{rec.base_url}/tmpl", rules=[rule], template=str(broken))
        failing = Settings(kafka_bootstrap=broker.bootstrap, webhook_allow_private=True)
        failing = failing.model_copy(update={"webhooks": [hook]})
        await publish(broker.bootstrap, [alert])
        with caplog.at_level(logging.ERROR, logger="sinks.webhooks"):
            async with dispatching(failing, store) as dispatcher:
                await until(finished(store, [alert.event_id], pairs=1))
                await until(lambda: dispatcher.workers["tmpl"].idle)
                metrics = scrape(dispatcher)
        [(status, outcome, error)] = [
            (r["status_code"], r["outcome"], r["error"])
            for r in store.rows(
                "SELECT status_code, outcome, error FROM webhook_deliveries"
                " WHERE alert_id = {id:UUID} AND outcome != 'pending'",
                {"id": alert.event_id},
            )
        ]
        assert rec.arrivals == []  # nothing sent
        assert (status, outcome) == (None, "refused")
        assert str(broken) in error and "period" in error, error
        assert sample(metrics, "llmtap_webhook_attempts_total", endpoint="tmpl") == 0
        assert sample(metrics, "llmtap_webhook_deliveries_total", endpoint="tmpl") == 1
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("webhook tmpl" in m and str(broken) in m for m in said), said

        hook = hook.model_copy(update={"template": str(fixed)})
        repaired = failing.model_copy(update={"webhooks": [hook]})
        async with dispatching(repaired, store) as dispatcher:
            assert await redeliver.redeliver(store, dispatcher, redeliver.Selection("tmpl")) == 1
            await until(lambda: len(rec.accepted) == 1)
            await until(lambda: dispatcher.workers["tmpl"].idle)
        rows = await asyncio.to_thread(delivery_rows, store, alert.event_id)
    assert [a.webhook_id for a in rec.accepted] == [str(alert.event_id)]
    assert rows == [(0, 0, "pending"), (0, 0, "refused"), (1, 0, "pending"), (1, 1, "delivered")]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"alert_ids": ["x"]}', "alert_ids.0"),
        (b'{"since": "2026-01-01T00:00:00"}', "since"),  # no offset: refused, not guessed
        (b'{"alert": []}', "alert"),
    ],
)
def test_a_bad_redelivery_request_names_its_parameter(body: bytes, param: str) -> None:
    with pytest.raises(BadParameter) as raised:
        redeliver.parse("dead", body)
    assert raised.value.param == param


async def test_a_410_disables_the_endpoint_until_redeliver_enables_it(
    broker: Broker, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst of alerts to a receiver answering 410: one request reaches it; every
    delivery is recorded `gone`, saying why; one ERROR names the endpoint; the gauge says
    it is disabled. Redeliver enables it: each alert is then sent once."""
    rule = f"rule-{uuid.uuid4()}"
    burst = [make_alert(rule, value=f"v{n}") for n in range(5)]
    ids = [a.event_id for a in burst]
    async with receiver({"gone": Behaviour(always=410)}) as rec:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[endpoint("gone", f"{rec.base_url}/gone", rules=[rule])],
        )
        await publish(broker.bootstrap, burst)
        async with dispatching(settings, store) as dispatcher:
            with caplog.at_level(logging.ERROR, logger="sinks.webhooks"):
                await until(finished(store, ids, pairs=len(burst)))
            metrics = scrape(dispatcher)
            steps = attempts(store, ids)
            # Later alerts are closed out as they come, unsent.
            late = make_alert(rule, value="late")
            await publish(broker.bootstrap, [late])
            await until(finished(store, [late.event_id], pairs=1))
            assert len(rec.requests("gone")) == 1

            rec.behaviours["gone"] = Behaviour()  # the receiver is back
            again = redeliver.Selection("gone")
            assert await redeliver.redeliver(store, dispatcher, again) == len(burst) + 1
            assert sample(scrape(dispatcher), "llmtap_webhook_endpoint_disabled") == 0
            await until(lambda: len(rec.accepted) == len(burst) + 1)
            await until(lambda: dispatcher.workers["gone"].idle)

    assert sample(metrics, "llmtap_webhook_endpoint_disabled", endpoint="gone") == 1
    assert sample(metrics, "llmtap_webhook_deliveries_total", outcome="gone") == len(burst)
    [(_, asked)] = [(a.seq, a.webhook_id) for a in rec.arrivals if a.status == 410]
    final = {i: s[-1] for (_, i), s in steps.items()}
    assert final.pop(asked)[1:3] == (410, "gone")
    for status, outcome, error in (step[1:] for step in final.values()):
        assert (status, outcome) == (None, "gone")
        assert error == (
            f"not sent: endpoint gone disabled: its receiver answered 410 Gone to alert {asked}"
        )
    # One ERROR about the endpoint (the shared topic may hold other tests' records,
    # which the dispatcher reports as undecodable: not this test's).
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    about = [message for message in said if "endpoint gone" in message]
    assert len(about) == 1 and "webhook gone: endpoint gone disabled" in about[0], said
    assert sorted(a.webhook_id for a in rec.accepted) == sorted(
        str(i) for i in [*ids, late.event_id]
    )


async def test_a_410_one_store_process_got_disables_the_endpoint_in_the_others(
    store: Store,
) -> None:
    """Two store processes' workers for one endpoint, each owning a partition: once one
    got a 410 (its `gone` row in ClickHouse), the other sends its next delivery to the
    endpoint no more: it records it `gone`, unsent, naming the alert that got the 410,
    and is disabled too."""
    rule = f"rule-{uuid.uuid4()}"
    name = f"gone-{uuid.uuid4().hex[:8]}"
    first, second = make_alert(rule), make_alert(rule, value="ads")
    async with receiver({name: Behaviour(always=410)}) as rec:
        hook = endpoint(name, f"{rec.base_url}/{name}", rules=[rule])
        one = EndpointWorker(hook, store, allow_private=True, owned=Owned(frozenset({0})))
        other = EndpointWorker(hook, store, allow_private=True, owned=Owned(frozenset({1})))
        running = [asyncio.create_task(w.run()) for w in (one, other)]
        try:
            records.store_batch(store, [first], [(name, first)], [], {first.event_id: 0})
            one.offer(records.Job(first, partition=0))
            await until(finished(store, [first.event_id], pairs=1))
            assert one.disabled and not other.disabled
            records.store_batch(store, [second], [(name, second)], [], {second.event_id: 1})
            other.offer(records.Job(second, partition=1))
            await until(finished(store, [second.event_id], pairs=1))
            await until(lambda: other.idle)
        finally:
            for task in running:
                task.cancel()
            for task in running:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert [a.webhook_id for a in rec.arrivals] == [str(first.event_id)]
    assert other.disabled
    [*_, (_, status, outcome, error)] = attempts(store, [second.event_id])[
        name, str(second.event_id)
    ]
    assert (status, outcome) == (None, "gone")
    assert error == (
        f"not sent: endpoint {name} disabled: its receiver answered 410 Gone to alert "
        f"{first.event_id}"
    )


async def test_a_redeliver_landing_while_a_410_is_recorded_is_not_undone(
    broker: Broker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin's request comes while the 410's `gone` row is being inserted: it
    enables the endpoint after the 410 disabled it, so its redelivery is sent, not
    closed out unsent by a worker disabling the endpoint only once the row is in."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    inserted, go = threading.Event(), threading.Event()
    real_record = records.record

    def record(into: Store, rows: list[records.Attempt]) -> None:
        real_record(into, rows)
        if any(r.status_code == 410 for r in rows) and not inserted.is_set():
            inserted.set()  # the 410's row is in; its insert has not returned yet
            go.wait(timeout=30)

    monkeypatch.setattr(records, "record", record)
    async with receiver({"gone": Behaviour(always=410)}) as rec:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[endpoint("gone", f"{rec.base_url}/gone", rules=[rule])],
        )
        async with dispatching(settings, store) as dispatcher:
            await publish(broker.bootstrap, [alert])
            await until(inserted.is_set)
            rec.behaviours["gone"] = Behaviour()  # the receiver is back
            asking = asyncio.create_task(
                redeliver.redeliver(store, dispatcher, redeliver.Selection("gone"))
            )
            asyncio.get_running_loop().call_soon(go.set)  # once the request has begun
            assert await asking == 1

            def redelivered() -> bool:
                return any(
                    r[0] == 1 and r[2] in records.FINAL
                    for r in delivery_rows(store, alert.event_id)
                )

            await until(lambda: asyncio.to_thread(redelivered))
            worker = dispatcher.workers["gone"]
            assert worker.disabled == ""
            rows = await asyncio.to_thread(delivery_rows, store, alert.event_id)

    assert rows == [(0, 0, "pending"), (0, 1, "gone"), (1, 0, "pending"), (1, 1, "delivered")]
    assert [a.webhook_id for a in rec.accepted] == [str(alert.event_id)]


async def test_a_handover_waits_for_a_close_out_being_recorded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disabled endpoint's worker is recording a delivery `gone` when its partition is
    taken: the rebalance goes on only once the row is in, so the next owner finds it
    finished, and does not send it (nor record a second outcome)."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    records.store_batch(store, [alert], [("gone", alert)], [], {alert.event_id: 1})
    settings = Settings(webhooks=[endpoint("gone", "http://127.0.0.1:9/", rules=[rule])])
    dispatcher = WebhookDispatcher(settings, store)
    worker = dispatcher.workers["gone"]
    worker.disabled = "endpoint gone disabled: its receiver answered 410 Gone"
    closing, go, inserted = threading.Event(), threading.Event(), threading.Event()
    real_record = records.record

    def record(into: Store, rows: list[records.Attempt]) -> None:
        closed_out = any(r.outcome == "gone" for r in rows)
        if closed_out:
            closing.set()
            go.wait(timeout=30)
        real_record(into, rows)
        if closed_out:
            inserted.set()

    monkeypatch.setattr(records, "record", record)
    alerts = settings.kafka.names.alerts
    running = asyncio.create_task(worker.run())
    try:
        await dispatcher.handover.on_partitions_assigned([TopicPartition(alerts, 1)])
        await until(closing.is_set)  # its close-out is being recorded

        async def hand_over() -> bool:
            await dispatcher.handover.on_partitions_revoked([TopicPartition(alerts, 1)])
            return inserted.is_set()

        handing_over = asyncio.create_task(hand_over())
        for _ in range(10):  # the handover's steps, none waiting on I/O
            await asyncio.sleep(0)
        go.set()
        assert await handing_over, "the partition was handed over before its row was in"
        nexts = await asyncio.to_thread(records.unfinished, store, "gone", 10, [1])
    finally:
        go.set()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert nexts.jobs == []  # the next owner has nothing to send
    assert delivery_rows(store, alert.event_id) == [(0, 0, "pending"), (0, 0, "gone")]
