"""Hard budget caps: reservation under concurrency at the ingress, and the whole loop
(spend counted by the stream -> state -> ingress refuses -> budget alert webhook)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from anthropic import AsyncAnthropic
from anthropic import BadRequestError as AnthropicBadRequestError
from anthropic import RateLimitError as AnthropicRateLimitError
from openai import AsyncOpenAI, BadRequestError, RateLimitError
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionMessageParam
from standardwebhooks import Webhook

from ingress.app import create_app
from ingress.forward import admission
from ingress.guards import reaping
from ingress.guards.book_topics import announce, hear_others
from ingress.guards.budgets import BudgetBook
from ingress.guards.keys import create_key
from ingress.guards.reaping import REAP_AFTER
from ingress.keys import BUDGETS
from ingress.publisher import EventPublisher
from llmtap import topics
from llmtap.batches import key_hash
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig, ProviderConfig
from llmtap.events import Alert, Attribution, Reservations, Usage, utcnow
from llmtap.kafka import Kafka
from llmtap.names import Names
from sinks.budget_seed import publish_states, rebuilt_state
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sql.budgets import RESERVATION_BOOK, budget_follower
from sql.store import Store
from stream.budgets import fresh
from stream.catalog import load_catalog
from stream.ledger import Ledger
from tests import sample as made
from tests.conftest import INGRESS_PROVIDER_KEY, FakeUpstream, run_llmtap, serve_ingress
from tests.fake_provider import FakeProvider, free_port, serve
from tests.prometheus import sample
from tests.test_ingress_ops import make_key

MAX_TOKENS = 1000
ADMIN_KEY = "admin-key-for-budget-cap-tests"
BODY = orjson.dumps(  # a streamed gpt-4o call
    {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
)
# gpt-4o: $2.50 in, $1.25 cached in, $10.00 out per million; every body byte may be a token.
WORST = (len(BODY) * Decimal("2.50") + MAX_TOKENS * Decimal("10.00")) / Decimal(1_000_000)


def cost_of_a_call(fake: FakeProvider) -> Decimal:
    """What one call to the fake provider costs at gpt-4o's price (its usage counts)."""
    return (
        (fake.prompt_tokens - fake.cached_tokens) * Decimal("2.50")
        + fake.cached_tokens * Decimal("1.25")
        + fake.completion_tokens * Decimal("10.00")
    ) / Decimal(1_000_000)


async def test_64_concurrent_calls_against_a_budget_for_10_admit_exactly_10(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(
        name="acme-cap", scope="tenant", value="acme", period="day", limit_usd=WORST * 10
    )
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    await unspent(settings, budget)
    server = await serve_ingress(settings)
    base = str(server.make_url("")).rstrip("/")
    upstream.provider.chunk_delay_s = 0.05  # every admitted call stays in flight a while
    try:
        secret = await make_key(base, settings.key_file)  # one admitted call (non-stream)

        async def call() -> tuple[int, str, tuple[str | None, str | None]]:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{base}/v1/chat/completions",
                    data=BODY,
                    headers={
                        "Authorization": f"Bearer {secret}",
                        "Content-Type": "application/json",
                    },
                ) as response,
            ):
                retry = (
                    response.headers.get("retry-after"),
                    response.headers.get("x-should-retry"),
                )
                return response.status, (await response.text()), retry

        results = await asyncio.gather(*(call() for _ in range(64)))
    finally:
        upstream.provider.chunk_delay_s = 0.0
        await server.close()
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    # make_key's probe call already spent its real cost, which stays counted until a
    # budget state includes it (no stream runs here): 10 worst cases minus that.
    probe = cost_of_a_call(upstream.provider)
    assert len(admitted) == int((budget.limit_usd - probe) // WORST) == 9
    assert len(admitted) + len(refused) == 64
    error = json.loads(refused[0][1])["error"]
    assert error["code"] == "budget_exceeded"
    assert error["type"] == "requests"  # held back, not spent: retried, not a lasting quota
    assert "budget 'acme-cap'" in error["message"] and "resets at" in error["message"]
    # Refused for what calls in flight hold, not for the spend: worth a retry in a second,
    # not at the reset (nor never, as a spent budget's x-should-retry: false says).
    assert {r[2] for r in refused} == {("1", None)}


async def test_spend_reaches_the_cap_and_the_alert_arrives_signed(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, base64
    received: list[dict[str, object]] = []

    async def receiver(request: web.Request) -> web.Response:
        body = await request.read()
        received.append(Webhook(secret).verify(body, dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receiver)
    hook_port = free_port()
    runner = await serve(app, hook_port)
    # gpt-4o at the fake's usage (12 in, 4 cached, 5 out) costs $0.000075 a call: 18.75%
    # of the limit, so the first call crosses 10% and the second 20%.
    env = {
        "LLMTAP_BUDGETS": json.dumps(
            [
                {
                    "name": "acme-daily",
                    "scope": "tenant",
                    "value": "acme",
                    "period": "day",
                    "limit_usd": "0.0004",
                    "thresholds": [10, 20],
                }
            ]
        ),
        "LLMTAP_WEBHOOKS": json.dumps(
            [
                {
                    "name": "ops",
                    "url": f"http://127.0.0.1:{hook_port}/hook",
                    "secret": secret,
                    "alert_types": ["budget"],
                    "backoff_s": 0.1,
                }
            ]
        ),
        "LLMTAP_WEBHOOK_ALLOW_PRIVATE": "true",
        "LLMTAP_ADMIN_KEY_HASHES": json.dumps([hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]),
    }
    try:
        async with run_llmtap(tmp_path, upstream, env) as running, running.openai() as client:
            outcomes = []
            async with asyncio.timeout(60):
                while True:  # spend until the stream's state makes the ingress refuse
                    try:
                        await client.chat.completions.create(
                            model="gpt-4o",
                            messages=[{"role": "user", "content": "hi"}],
                            max_tokens=1,
                        )
                        outcomes.append(200)
                    except RateLimitError as exc:
                        message = exc.message
                        break
                    await asyncio.sleep(0.2)
                # The thresholds' alerts, and the cap's own: its first refusal.
                while {a["threshold"] for a in received} != {"10", "20", None}:
                    await asyncio.sleep(0.1)
                # The ingress holds each admitted call's cost until a budget state has
                # counted that call's own event (its partition's offset passed it): then
                # it holds nothing, and what it announces says so.
                row = await budget_row(running.api_url, ADMIN_KEY, "acme-daily")
                while row["reserved_usd"] != "0":
                    await asyncio.sleep(0.1)
                    row = await budget_row(running.api_url, ADMIN_KEY, "acme-daily")
                assert Decimal(row["spent_usd"]) == len(outcomes) * Decimal("0.000075")
    finally:
        await runner.cleanup()
    # Each call really costs $0.000075, but is admitted only if its worst case (every
    # body byte an input token, plus one output token) still fits: the cap is never
    # passed, and calls are refused before the last dollars are spent.
    per_call = Decimal("0.000075")
    assert len(outcomes) >= 2
    assert len(outcomes) * per_call <= Decimal("0.0004")
    assert "budget 'acme-daily'" in message
    [capped] = [a for a in received if a["threshold"] is None]
    budget_alerts = sorted(
        (a for a in received if a["threshold"] is not None), key=lambda a: int(str(a["threshold"]))
    )
    assert [(a["alert_type"], a["threshold"]) for a in budget_alerts] == [
        ("budget", "10"),
        ("budget", "20"),
    ]
    assert [Decimal(str(a["observed"])) for a in budget_alerts] == [per_call, 2 * per_call]
    # Refused before 100%: only the cap's own alert says the calls are refused now.
    # The spend published when it was refused: the last call's may not be counted yet.
    observed = Decimal(str(capped["observed"]))
    assert 0 < observed <= len(outcomes) * per_call
    severity = "critical" if observed * 100 >= Decimal("0.0004") * 80 else "warning"
    assert (capped["alert_type"], capped["severity"]) == ("budget", severity)
    assert "hard cap refused a call" in str(capped["message"])


# A test on a budget's state needs its period to last past the test, and one told to
# retry at the reset a reset more than a minute away (admission.SDK_RETRY_WAIT_S): one
# starting in a month's last minutes waits for the next month.
PERIOD_MARGIN_S = 180


async def new_budget(prefix: str) -> tuple[BudgetConfig, datetime]:
    """A $1 monthly budget of tenant acme, new (named ``prefix``-...), and now: a time
    at least PERIOD_MARGIN_S before its period ends."""
    budget = BudgetConfig(
        name=f"{prefix}-{uuid.uuid4().hex[:8]}", scope="tenant", value="acme", limit_usd=Decimal(1)
    )
    now = utcnow()
    left_s = (fresh(budget, now, now).period_end - now).total_seconds()
    if left_s < PERIOD_MARGIN_S:  # the period would turn mid-test, its spend with it
        await asyncio.sleep(left_s + 1)  # a wait on the clock itself: into the next one
        now = utcnow()
    return budget, now


async def unspent(settings: Settings, budget: BudgetConfig) -> None:
    """The state the store publishes as it starts of a budget with no call in its
    period: nothing spent (a hard cap judges no call before it has its budget's state)."""
    now = utcnow()
    assert await publish_states(settings.kafka, [fresh(budget, now, now)])


async def all_but_spent(settings: Settings, prefix: str) -> BudgetConfig:
    """A $1 budget of tenant acme, new (named ``prefix``-...), whose state on the budgets
    topic says $0.999 of it is spent this period."""
    budget, now = await new_budget(prefix)
    spent = fresh(budget, now, now).model_copy(update={"spent_usd": Decimal("0.999")})
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            Names().budgets, spent.model_dump_json().encode(), key=budget.name.encode()
        )
    finally:
        await producer.stop()
    return budget


async def test_a_call_no_period_could_cover_gets_a_400_not_a_429_to_retry(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call whose worst case fits the limit but not what is left of it is told to
    retry at the reset (429, retry-after). One whose worst case is more than the whole
    limit would not fit then either: a 400 saying to ask for less, with no retry-after
    (the SDKs retry a 429), still recorded as refused by the budget."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = await all_but_spent(ingress_settings, "whole")
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    # gpt-4o writes at $10 a million: 200,000 tokens may cost $2, past the whole $1.
    larger = orjson.dumps({**orjson.loads(BODY), "max_tokens": 200_000})
    asked = len(upstream.provider.received)
    answers = []
    async with (
        TestServer(create_app(settings), host="127.0.0.1") as server,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as session,
    ):
        for body in (larger, BODY):  # BODY's worst case is $0.0103: not the $0.001 left
            async with session.post(server.make_url("/v1/chat/completions"), data=body) as answer:
                answers.append(
                    (answer.status, answer.headers.get("retry-after"), await answer.read())
                )
        async with session.get(server.make_url("/metrics")) as answer:
            metrics = await answer.text()
    (never, never_retry, never_body), (later, later_retry, later_body) = answers
    assert (never, never_retry, later) == (400, None, 429)
    assert later_retry is not None and int(later_retry) >= 1
    never_error, later_error = orjson.loads(never_body)["error"], orjson.loads(later_body)["error"]
    assert never_error["code"] == later_error["code"] == "budget_exceeded"
    assert "cannot cover this call in any month" in never_error["message"]
    assert "more than its whole limit of $1" in never_error["message"]
    assert "$0.999 of $1 spent" in later_error["message"]
    assert len(upstream.provider.received) == asked
    assert sample(metrics, "llmtap_requests_total", status="budget_exceeded") == 2
    # refused before reaching the provider: rejections, not calls the histograms time
    assert sample(metrics, "llmtap_rejections_total", reason="budget_exceeded") == 2
    assert sample(metrics, "llmtap_request_duration_seconds_count") == 0


async def budget_row(api_url: str, key: str, name: str) -> dict[str, Any]:
    """The budgets endpoint's row of budget ``name``, as ``key`` sees it."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.get(f"{api_url}/analytics/budgets") as response,
    ):
        assert response.status == 200, await response.text()
        body: dict[str, list[dict[str, Any]]] = await response.json()
    rows = [row for row in body["data"] if row["budget"] == name]
    assert len(rows) == 1
    return rows[0]


async def reservations_of(
    bootstrap: str, budget: str, until: Callable[[list[Reservations]], bool]
) -> list[Reservations]:
    """The announcements on the reservations topic that name ``budget`` (or empty ones
    from the same ingress), read from the beginning until ``until`` holds of them."""
    consumer = AIOKafkaConsumer(
        Names().reservations,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # no group: every partition, from its beginning
        metadata_max_age_ms=500,  # the topic may appear after we start
    )
    await consumer.start()
    try:
        seen: list[Reservations] = []
        mine: set[str] = set()
        async with asyncio.timeout(30):
            while not until(seen):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        if record.value is None:
                            continue  # a stopped ingress's tombstone
                        event = Reservations.model_validate_json(record.value)
                        if budget in event.held:
                            mine.add(event.ingress_id)
                        if event.ingress_id in mine:
                            seen.append(event)
        return seen
    finally:
        await consumer.stop()


async def test_the_ingress_announces_what_it_holds_against_a_cap(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call in flight holds its worst case; once it ended, its real cost (no stream
    runs here to count it); a stopped ingress announces that it holds nothing."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    name = f"held-{uuid.uuid4().hex[:8]}"
    budget = BudgetConfig(name=name, scope="tenant", value="acme", limit_usd=Decimal(100))
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    bootstrap = settings.kafka_bootstrap
    await unspent(settings, budget)
    server = await serve_ingress(settings)
    base = str(server.make_url("")).rstrip("/")
    upstream.provider.chunk_delay_s = 0.3  # the call stays in flight for a second or more
    closed = False
    try:
        secret = await make_key(base, settings.key_file)  # a first call, ended: its cost
        one_call = cost_of_a_call(upstream.provider)

        in_flight = asyncio.create_task(post_once(base, secret))
        # The probe call's cost, and the call in flight's worst case: of the body as
        # forwarded, which asks for usage (stream_options: a few dozen bytes more).
        slack = Decimal(64) * Decimal("2.50") / Decimal(1_000_000)

        def holding(event: Reservations) -> bool:
            return WORST <= event.held.get(name, Decimal(0)) - one_call <= WORST + slack

        await reservations_of(bootstrap, name, lambda seen: any(holding(e) for e in seen))
        assert (await in_flight)[0] == 200
        upstream.provider.chunk_delay_s = 0.0
        held = await reservations_of(
            bootstrap, name, lambda seen: seen[-1:] != [] and seen[-1].held[name] == 2 * one_call
        )
        await server.close()
        closed = True
        ingress_id = held[-1].ingress_id
        held = await reservations_of(
            bootstrap, name, lambda seen: seen[-1:] != [] and seen[-1].held == {}
        )
        assert {e.ingress_id for e in held} == {ingress_id}
    finally:
        upstream.provider.chunk_delay_s = 0.0
        if not closed:
            await server.close()


async def records_of(
    bootstrap: str,
    key: bytes,
    until: Callable[[list[bytes | None]], bool],
    partition: int | None = None,
) -> list[bytes | None]:
    """The values of the records keyed ``key`` on the reservations topic (of
    ``partition``, or any; None: a tombstone), read from the beginning until ``until``
    holds of them."""
    consumer = AIOKafkaConsumer(
        Names().reservations,
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
    )
    await consumer.start()
    try:
        seen: list[bytes | None] = []
        async with asyncio.timeout(30):
            while not until(seen):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen += [
                        record.value
                        for record in records
                        if record.key == key and partition in (None, record.partition)
                    ]
        return seen
    finally:
        await consumer.stop()


async def test_a_stopped_ingress_deletes_its_entry_from_the_reservations_topic(
    ingress_settings: Settings,
) -> None:
    """Each start announces under a new id, and the compacted topic kept every one for
    good (each ingress and the store read them all at start): a stopping ingress now
    says it holds nothing, then deletes its key (a tombstone), for compaction to remove."""
    budget = BudgetConfig(
        name=f"gone-{uuid.uuid4().hex[:8]}", scope="tenant", value="acme", limit_usd=Decimal(100)
    )
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    server = await serve_ingress(settings)
    try:
        key = server.app[BUDGETS].ingress_id.encode()
        await records_of(settings.kafka_bootstrap, key, lambda seen: bool(seen))
    finally:
        await server.close()
    seen = await records_of(settings.kafka_bootstrap, key, lambda seen: None in seen)
    assert seen[-1] is None  # the last: the tombstone
    last = seen[-2]
    assert last is not None and Reservations.model_validate_json(last).held == {}


async def test_a_tombstone_on_the_reservations_topic_is_a_process_gone(
    ingress_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader of the topic takes a tombstone for its process gone, with no error: the
    ingress's book (its caps count the others' holds) and the store's (the budgets
    endpoint's reserved_usd) forget it, also with no empty announcement before it (one
    compaction removed while the reader was behind)."""
    budget = BudgetConfig(
        name=f"gone-{uuid.uuid4().hex[:8]}", scope="tenant", value="acme", limit_usd=Decimal(100)
    )
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    topic = Names().reservations
    gone = f"ingress-{uuid.uuid4()}"
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        # A live one read after the tombstone, on its partition: once it is heard, so was that.
        partitions = sorted(await producer.partitions_for(topic))
        where = partitions[key_hash(gone.encode()) % len(partitions)]
        marker = next(
            m
            for m in (f"ingress-{uuid.uuid4()}" for _ in range(1000))
            if partitions[key_hash(m.encode()) % len(partitions)] == where
        )
        held = Reservations(
            ingress_id=gone, at=utcnow(), interval_s=10, held={budget.name: Decimal(1)}
        )
        await producer.send_and_wait(topic, held.model_dump_json().encode(), key=gone.encode())
        await producer.send_and_wait(topic, None, key=gone.encode())
        live = Reservations(
            ingress_id=marker, at=utcnow(), interval_s=600, held={budget.name: Decimal(2)}
        )
        await producer.send_and_wait(topic, live.model_dump_json().encode(), key=marker.encode())
    finally:
        await producer.stop()

    caplog.set_level(logging.INFO, logger="llmtap.following")
    book = BudgetBook(settings.budgets, load_catalog(settings.pricing_file), 1000)
    app = web.Application()
    store = budget_follower(settings)(app)
    heard = asyncio.create_task(hear_others(book, settings.kafka, "test-tombstone"))
    await anext(store)
    try:
        async with asyncio.timeout(30):
            while (
                marker not in book.held_by_others.others
                or marker not in app[RESERVATION_BOOK].latest
            ):
                await asyncio.sleep(0.05)
    finally:
        heard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heard
        with contextlib.suppress(StopAsyncIteration):
            await anext(store)
    assert gone not in book.held_by_others.others
    assert gone not in app[RESERVATION_BOOK].latest
    errors = [
        r for r in caplog.records if r.name == "llmtap.following" and r.levelno >= logging.ERROR
    ]
    assert not errors, caplog.text  # was: "unreadable llmtap.reservations event skipped"


async def test_an_ingress_deletes_the_entries_processes_killed_left_on_the_topic(
    ingress_settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed never deletes its key: its last announcement stayed on the
    compacted topic for good, read by every ingress and the store at each start. An
    ingress deletes the entries silent for an hour once it has read the topic to its
    end; not one whose process announced since (its older announcement read first)."""
    budget = BudgetConfig(
        name=f"reap-{uuid.uuid4().hex[:8]}", scope="tenant", value="acme", limit_usd=Decimal(100)
    )
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    topic = Names().reservations
    killed, live = f"ingress-{uuid.uuid4()}", f"ingress-{uuid.uuid4()}"
    long_ago = utcnow() - REAP_AFTER - timedelta(minutes=5)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for ingress_id, at in ((killed, long_ago), (live, long_ago), (live, utcnow())):
            event = Reservations(
                ingress_id=ingress_id, at=at, interval_s=600, held={budget.name: Decimal(1)}
            )
            await producer.send_and_wait(
                topic, event.model_dump_json().encode(), key=ingress_id.encode()
            )
    finally:
        await producer.stop()

    caplog.set_level(logging.INFO, logger="ingress.guards.reaping")
    monkeypatch.setattr(reaping, "REAP_EVERY_S", 0.2)  # two looks, a minute apart
    server = await serve_ingress(settings)
    try:
        seen = await records_of(settings.kafka_bootstrap, killed.encode(), lambda s: None in s)
    finally:
        await server.close()
    assert seen[-1] is None and len(seen) == 2  # its entry, then its deletion
    assert killed in caplog.text
    assert live not in caplog.text  # judged in the same pass, and kept


async def elsewhere(bootstrap: str, key: bytes) -> tuple[int, int]:
    """A partition of the reservations topic ``key`` does not hash to now (the one it
    hashed to before partitions were added to the topic), and the one it does."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(Names().reservations))
    finally:
        await producer.stop()
    hashed = partitions[key_hash(key) % len(partitions)]
    return next(p for p in partitions if p != hashed), hashed


async def test_a_killed_process_s_entry_is_deleted_where_it_lives_after_the_topic_grew(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Partitions added to the reservations topic (Kafka grows a topic, never shrinks
    it) move a key's partition (murmur2 % n): a killed process's entry, written before,
    is on a partition its key no longer hashes to. Its tombstone went to the key's
    partition now, deleting nothing there: the entry stayed for good, read at every
    start (and deleted again by every process, at every start). It goes where the
    entry was read. (Tansu cannot add partitions: the entry is written where the key
    does not hash to now.)"""
    budget = BudgetConfig(
        name=f"grown-{uuid.uuid4().hex[:8]}", scope="tenant", value="acme", limit_usd=Decimal(100)
    )
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    killed = f"ingress-{uuid.uuid4()}"
    lives, _ = await elsewhere(settings.kafka_bootstrap, killed.encode())
    event = Reservations(
        ingress_id=killed,
        at=utcnow() - REAP_AFTER - timedelta(minutes=5),
        interval_s=600,
        held={budget.name: Decimal(1)},
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            Names().reservations,
            event.model_dump_json().encode(),
            key=killed.encode(),
            partition=lives,
        )
    finally:
        await producer.stop()
    monkeypatch.setattr(reaping, "REAP_EVERY_S", 0.2)
    server = await serve_ingress(settings)
    try:
        seen = await records_of(
            settings.kafka_bootstrap, killed.encode(), lambda s: None in s, partition=lives
        )
    finally:
        await server.close()
    assert seen[-1] is None and len(seen) == 2  # was: a timeout, the tombstone elsewhere


async def test_a_process_writes_on_where_its_entry_lives_and_deletes_it_there(
    ingress_settings: Settings, tmp_path: Path
) -> None:
    """Its first announcement went to a partition its key does not hash to now (the
    partitions were fewer then): each later one goes there too, and so do its empty
    announcement and its tombstone as it stops. Sent by the key, the tombstone deleted
    nothing there, and the entry stayed for good (and the readers started before the
    topic grew read no partition added since)."""
    budget = BudgetConfig(
        name=f"grown-{uuid.uuid4().hex[:8]}", scope="tenant", value="acme", limit_usd=Decimal(100)
    )
    topic = Names().reservations
    ingress_id = f"ingress-{uuid.uuid4()}"
    key = ingress_id.encode()
    lives, hashed = await elsewhere(ingress_settings.kafka_bootstrap, key)
    publisher = EventPublisher(
        Kafka(ingress_settings.kafka_bootstrap),
        queue_size=1000,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=0,
    )
    await publisher.start()
    told = asyncio.Event()
    after: list[bytes | None] = []  # published once the first was told where it went

    def publish(
        topic: str,
        key: bytes,
        value: bytes | None,
        delivered: Callable[[int, int], None] | None = None,
        partition: int | None = None,
    ) -> None:
        if not told.is_set() and delivered is not None:
            inner = delivered

            def delivered(partition: int, offset: int) -> None:
                inner(partition, offset)
                told.set()

            partition = lives  # as the key hashed when the topic had fewer partitions
        elif told.is_set():
            after.append(value)
        publisher.publish(topic, key, value, delivered, partition)

    book = BudgetBook([budget], load_catalog(ingress_settings.pricing_file), 1000)
    announcing = asyncio.create_task(announce(book, publish, topic, ingress_id, 0.2))
    try:
        async with asyncio.timeout(30):
            await told.wait()
            while len(after) < 2:  # announced again since
                await asyncio.sleep(0.05)
    finally:
        announcing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcing
        marker = f"marker-{uuid.uuid4()}".encode()
        publisher.publish(topic, marker, b"{}", None, hashed)
        await publisher.stop()
    seen = await records_of(ingress_settings.kafka_bootstrap, key, lambda s: None in s, lives)
    assert seen[-1] is None  # was: a timeout, every one but the first on the key's partition
    assert len(seen) >= 4 and Reservations.model_validate_json(seen[-2] or b"").held == {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ingress_settings.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, hashed)])
        keys: list[bytes | None] = []
        async with asyncio.timeout(30):
            while marker not in keys:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    keys += [record.key for record in records]
    finally:
        await consumer.stop()
    assert key not in keys


async def post_once(base: str, secret: str) -> tuple[int, dict[str, Any], str]:
    """BODY posted with ``secret``: the status, the error (none on a 200), retry-after."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/v1/chat/completions",
            data=BODY,
            headers={"Authorization": f"Bearer {secret}"},
        ) as response,
    ):
        text = await response.text()
        answer = json.loads(text) if response.status != 200 else {}
        return response.status, answer, response.headers.get("retry-after", "")


async def test_a_starting_ingress_judges_a_cap_on_the_spend_already_counted(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budgets topic says the cap is all but spent: the very first call of an
    ingress just started is refused, not judged against nothing spent (the state was
    not read yet, and read as a fresh period's)."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = await all_but_spent(ingress_settings, "spent")
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read at start
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    asked = len(upstream.provider.received)
    async with TestServer(create_app(settings), host="127.0.0.1") as server:  # called at once
        status, body, _ = await post_once(str(server.make_url("")).rstrip("/"), secret)
    assert (status, body["error"]["code"]) == (429, "budget_exceeded"), body
    assert "$0.999 of $1 spent" in body["error"]["message"]
    # Spent: typed as OpenAI's own spend limit answers, a lasting quota.
    assert body["error"]["type"] == "insufficient_quota"
    assert len(upstream.provider.received) == asked


async def test_a_budget_refusal_long_before_its_reset_is_not_retried_by_the_sdk(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDKs retry a 429, twice by default: Anthropic's waited the whole retry-after
    (days, until the budget's reset), OpenAI's asked again at once, in vain, each
    refusal recorded. ``x-should-retry: false`` makes them fail at once."""
    monkeypatch.setenv("LLMTAP_TEST_ANTHROPIC_KEY", INGRESS_PROVIDER_KEY)
    budget = await all_but_spent(ingress_settings, "retry")
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    async with TestServer(create_app(settings), host="127.0.0.1") as server:
        base = str(server.make_url("")).rstrip("/")
        secret = await make_key(base, settings.key_file)
        async with AsyncAnthropic(base_url=base, api_key=secret) as client:  # retries: 2
            with pytest.raises(AnthropicRateLimitError) as refused:
                async with asyncio.timeout(30):  # it slept retry-after: days
                    await client.messages.create(
                        model="claude-3-5-haiku",
                        max_tokens=1_000,  # up to $0.004: fits $1, not the $0.001 left
                        messages=[{"role": "user", "content": "hi"}],
                    )
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as answer:
            metrics = await answer.text()
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert int(refused.value.response.headers["retry-after"]) > 60
    assert sample(metrics, "llmtap_requests_total", status="budget_exceeded") == 1


async def test_a_model_with_no_price_under_a_hard_cap_is_refused_unless_admitted(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model the catalog has no price for gives no worst case to reserve: under a hard
    cap it is refused with a 400 naming the model, recorded as a bad request of error
    class model_not_priced, not as the budget spent (it was admitted with nothing
    reserved, and nothing counted: the cap did not hold at all). budget_unpriced: admit
    lets it through, as does unpriced: admit on its provider (a local server's models);
    a priced model goes as before."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = await all_but_spent(ingress_settings, "unpriced")
    free_provider = ProviderConfig(
        kind="openai",
        base_url=upstream.base_url,
        api_key_env="LLMTAP_TEST_OPENAI_KEY",
        unpriced="admit",
    )
    unpriced = "acme-finetune-with-no-price"
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    outcomes: dict[str, tuple[str, float]] = {}
    for policy in ("refuse", "admit", "provider admits"):
        settings = ingress_settings.model_copy(
            update={
                "budgets": [budget],
                "budget_unpriced": "admit" if policy == "admit" else "refuse",
                "providers": {"openai": free_provider} if policy == "provider admits" else {},
            }
        )
        async with TestServer(create_app(settings), host="127.0.0.1") as server:
            base = str(server.make_url("")).rstrip("/")
            secret = await make_key(base, settings.key_file)
            unpriced_before, spent_before = await refusals_by_budget(base)
            asked = len(upstream.provider.received)
            async with AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as client:
                try:
                    await client.chat.completions.create(model=unpriced, messages=hi)
                    outcome = "answered"
                except BadRequestError as exc:
                    assert isinstance(exc.body, dict)
                    outcome = exc.body["code"]
                    assert exc.body["param"] == "model"
                    assert unpriced in exc.body["message"] and budget.name in exc.body["message"]
                    assert "pricing_file" in exc.body["message"]
                    assert "unpriced: admit on the provider" in exc.body["message"]
                cheap = await client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=10, messages=hi
                )
                assert cheap.choices
            unpriced_after, spent_after = await refusals_by_budget(base)
            outcomes[policy] = (outcome, unpriced_after - unpriced_before)
            assert spent_after == spent_before
            sent = [r.body["model"] for r in upstream.provider.received[asked:]]
            assert sent == ([unpriced] if policy != "refuse" else []) + ["gpt-4o-mini"]
    assert outcomes == {
        "refuse": ("model_not_priced", 1),
        "admit": ("answered", 0),
        "provider admits": ("answered", 0),
    }


async def refusals_by_budget(base: str) -> tuple[float, float]:
    """The calls an ingress has refused so far (its /metrics) for a model with no price,
    and for a budget's spend."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as answer:
        metrics = await answer.text()
    return (
        sample(metrics, "llmtap_rejections_total", reason="model_not_priced"),
        sample(metrics, "llmtap_requests_total", status="budget_exceeded"),
    )


async def alerts_of(bootstrap: str, rule: str) -> list[Alert]:
    """Every alert of ``rule`` the alerts topic holds."""
    alerts = map(Alert.model_validate_json, await topics.read_all(Kafka(bootstrap), Names().alerts))
    return [alert for alert in alerts if alert.rule == rule]


async def test_a_hard_cap_s_first_refusal_in_a_period_raises_an_alert_once(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cap refuses a call once its worst case no longer fits what is left, so the
    spend may never reach 100%: the team was locked out for the rest of the period and
    no alert said so (the last was 80%'s). The first refusal raises one, critical; the
    next refusals none (and every replica gives it the same id: stored and sent once)."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = await all_but_spent(ingress_settings, "capped")
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    async with TestServer(create_app(settings), host="127.0.0.1") as server:
        base = str(server.make_url("")).rstrip("/")
        secret = await make_key(base, settings.key_file)
        for _ in range(3):
            status, body, _ = await post_once(base, secret)
            assert (status, body["error"]["code"]) == (429, "budget_exceeded")
    [alert] = await alerts_of(settings.kafka_bootstrap, budget.name)
    state = fresh(budget, utcnow(), utcnow())
    assert (alert.alert_type, alert.state, alert.severity, alert.threshold) == (
        "budget",
        "firing",
        "critical",
        None,
    )
    assert (alert.observed, alert.baseline, alert.window_end) == (
        Decimal("0.999"),
        Decimal(1),
        state.period_end,
    )
    assert f"budget {budget.name!r} (tenant 'acme') hard cap refused a call" in alert.message
    assert "is more than the $0.001 left of $1 ($0.999 spent this month, 99.9%)" in alert.message


async def until_announced(settings: Settings, ingress_id: str, budget: str) -> None:
    """Until the reservations topic holds ingress ``ingress_id``'s announcement that it
    holds something against ``budget``, read as another ingress reads it."""
    observer = BudgetBook(settings.budgets, load_catalog(settings.pricing_file), 1000)
    heard = asyncio.create_task(hear_others(observer, settings.kafka, "test-observer"))
    try:
        while not (
            (r := observer.held_by_others.others.get(ingress_id)) is not None and r.held.get(budget)
        ):
            await asyncio.sleep(0.05)
    finally:
        heard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heard


@pytest.mark.parametrize("b_starts", ["beside A", "once A holds the call"])
async def test_a_cap_counts_what_the_other_ingress_replicas_hold(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    b_starts: str,
) -> None:
    """Two replicas each judged a cap against its own calls in flight only: each
    admitted what was left (a $0.01 cap ended at $0.019 over two). One now counts what
    the others announce they hold: a call that fits the cap alone, held in flight at
    replica A, leaves no room at replica B; also at B's very first call, B started
    while A held it (a replica added in a burst), which waits until B has read them."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    body = orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    )
    worst = (len(body) * Decimal("2.50") + 1000 * Decimal("10.00")) / Decimal(1_000_000)
    budget = BudgetConfig(
        name=f"replicas-{uuid.uuid4().hex[:8]}",
        scope="tenant",
        value="acme",
        period="day",
        limit_usd=worst * 3 / 2,  # room for one call's worst case, not two
    )
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    await unspent(settings, budget)
    secret, _ = create_key(settings.key_file, tenant="acme")  # read as they start
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    upstream.provider.answer_held = asyncio.Event()  # A's call stays in flight
    # Each replica its own data dir (its own spool), as two hosts; the same key file.
    b_settings = settings.model_copy(
        update={"data_dir": settings.data_dir / "b", "keys_file": settings.key_file}
    )
    a_app, b_app = create_app(settings), create_app(b_settings)
    try:
        async with (
            TestServer(a_app, host="127.0.0.1") as a,
            aiohttp.ClientSession() as session,
            contextlib.AsyncExitStack() as stack,
        ):
            if b_starts == "beside A":
                b = await stack.enter_async_context(TestServer(b_app, host="127.0.0.1"))
            held = asyncio.create_task(
                session.post(a.make_url("/v1/chat/completions"), data=body, headers=headers)
            )
            a_book = a_app[BUDGETS]
            async with asyncio.timeout(20):
                if b_starts == "beside A":  # until B has heard what A holds
                    while not any(
                        r.ingress_id == a_book.ingress_id and r.held.get(budget.name)
                        for r in b_app[BUDGETS].held_by_others.others.values()
                    ):
                        await asyncio.sleep(0.05)
                else:  # until the topic holds A's announcement (read there, as B will)
                    await until_announced(settings, a_book.ingress_id, budget.name)
                    b = await stack.enter_async_context(TestServer(b_app, host="127.0.0.1"))
            async with (
                asyncio.timeout(10),  # admitted, it would wait on the held answer
                session.post(
                    b.make_url("/v1/chat/completions"), data=body, headers=headers
                ) as refused,
            ):
                answer = await refused.json()
                assert refused.status == 429, answer
                assert answer["error"]["code"] == "budget_exceeded"
                assert refused.headers["retry-after"] == "1"  # A's call settles in seconds
            upstream.provider.answer_held.set()
            async with await held as admitted:
                assert admitted.status == 200
    finally:
        upstream.provider.answer_held.set()
        upstream.provider.answer_held = None


@asynccontextmanager
async def spend_never_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, wait_s: float
) -> AsyncIterator[str]:
    """An ingress capping tenant acme whose broker is unreachable, so its budgets'
    spend is never read; a capped call waits ``wait_s`` for it. Yields its base URL."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    monkeypatch.setattr(admission, "BUDGET_STATES_WAIT_S", wait_s)
    held = socket.socket()  # bound, never listening: connections to it are refused
    held.bind(("127.0.0.1", 0))
    budget = BudgetConfig(name="acme-cap", scope="tenant", value="acme", limit_usd=Decimal(100))
    unreachable = settings.model_copy(
        update={"budgets": [budget], "kafka_bootstrap": f"127.0.0.1:{held.getsockname()[1]}"}
    )
    try:
        async with TestServer(create_app(unreachable), host="127.0.0.1") as server:
            yield str(server.make_url("")).rstrip("/")
    finally:
        held.close()


async def test_a_cap_is_not_judged_before_its_spend_is_read(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started with the broker unreachable, an ingress cannot read what its capped
    budgets have spent: their calls get a 503 saying so (to retry), and reach no
    provider; the calls no cap counts go on."""
    capped, _ = create_key(ingress_settings.key_file, tenant="acme")
    free, _ = create_key(ingress_settings.key_file, tenant="globex")
    asked = len(upstream.provider.received)
    async with spend_never_read(ingress_settings, monkeypatch, wait_s=0.3) as base:
        status, body, retry_after = await post_once(base, capped)
        assert (status, body["error"]["code"], retry_after) == (
            503,
            "budget_state_unavailable",
            "1",
        ), body
        assert "has not read its budgets' spend yet" in body["error"]["message"]
        assert len(upstream.provider.received) == asked
        assert (await post_once(base, free))[0] == 200


async def test_a_call_cut_while_it_waits_for_the_spend_gives_back_its_rate_limit(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capped call whose client leaves while the ingress still reads its budgets'
    spend (its handler cancelled): it kept its key's request of the minute, so the
    key's next call was refused as rate limited; nor was it recorded."""
    once, _ = create_key(ingress_settings.key_file, tenant="acme", rpm=1)
    async with spend_never_read(ingress_settings, monkeypatch, wait_s=2.0) as base:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):  # gone, mid-wait
                await post_once(base, once)
        status, body, _ = await post_once(base, once)
        assert (status, body["error"]["code"]) == (503, "budget_state_unavailable"), body


@asynccontextmanager
async def capped_client(settings: Settings, budget: BudgetConfig) -> AsyncIterator[AsyncOpenAI]:
    """The official SDK on an ingress with ``budget`` alone, through a key of tenant acme."""
    await unspent(settings, budget)
    server = await serve_ingress(settings.model_copy(update={"budgets": [budget]}))
    base = str(server.make_url("")).rstrip("/")
    try:
        secret = await make_key(base, settings.key_file)
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as client:
            yield client
    finally:
        await server.close()


def refusal_of(
    refused: pytest.ExceptionInfo[BadRequestError], upstream: FakeUpstream, asked: int
) -> str:
    """The message of a budget refusal of a call more than the whole limit (a 400),
    checked to be one, with the provider not asked past the ``asked`` calls it had before."""
    assert len(upstream.provider.received) == asked
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "budget_exceeded"
    return str(error["message"])


async def test_a_call_whose_body_does_not_hold_its_input_reserves_a_whole_context(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Responses call that continues a stored conversation (previous_response_id) may
    read far more than its bytes: its worst case is budget_default_context_tokens of
    input. Under a $0.30 cap, the same call without it goes through; with it, refused
    (1,000,000 tokens at gpt-4o's $2.50 a million), the provider never asked."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-1", scope="tenant", value="acme", limit_usd=Decimal("0.30"))
    async with capped_client(ingress_settings, budget) as client:
        first = await client.responses.create(model="gpt-4o", input="hi", max_output_tokens=100)
        asked = len(upstream.provider.received)
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(
                model="gpt-4o",
                input="and then?",
                max_output_tokens=100,
                previous_response_id=first.id,
            )
    message = refusal_of(refused, upstream, asked)
    assert "budget 'acme-1'" in message and "worst case of this call $2.501 " in message


GIF = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


async def test_images_reserve_their_most_tokens_not_their_bytes(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty 1x1 GIFs (5 kB of body) are 113,000 input tokens on gpt-4o-mini: a provider
    counts an image's pixels, not its bytes. Each image is reserved as
    budget_image_tokens, so a $0.002 cap refuses the call the bytes alone would admit."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-1", scope="tenant", value="acme", limit_usd=Decimal("0.002"))
    image: ChatCompletionContentPartParam = {
        "type": "image_url",
        "image_url": {"url": GIF, "detail": "low"},
    }
    text: ChatCompletionContentPartParam = {"type": "text", "text": "?"}
    async with capped_client(ingress_settings, budget) as client:
        asked = len(upstream.provider.received)
        with pytest.raises(BadRequestError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": [text, *[image] * 40]}],
                max_tokens=1,
            )
    message = refusal_of(refused, upstream, asked)
    # the prompt: 40 x 50,000 tokens, at most gpt-4o-mini's 128,000-token window
    assert "budget 'acme-1'" in message and "worst case of this call $0.0192006" in message


async def test_each_prompt_of_a_completions_list_may_spend_max_tokens(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completions API answers each prompt of a list apart: eight prompts at
    max_tokens 200 may write 1,600 tokens ($0.016 at gpt-4o's $10 a million), past a
    $0.01 cap that one prompt fits."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-c", scope="tenant", value="acme", limit_usd=Decimal("0.01"))
    async with capped_client(ingress_settings, budget) as client:
        await client.completions.create(model="gpt-4o", prompt=["hi"], max_tokens=200)
        asked = len(upstream.provider.received)
        with pytest.raises(BadRequestError) as refused:
            await client.completions.create(model="gpt-4o", prompt=["hi"] * 8, max_tokens=200)
    refusal_of(refused, upstream, asked)


async def test_a_call_that_may_search_reserves_the_fee_of_its_searches(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Responses call with the web_search tool reads back what it finds (a whole
    default context of input, $2.50 at gpt-4o's rate) and pays $10 a thousand searches:
    under a $2.51 cap, max_tool_calls=0 fits ($2.501 with 100 output tokens), while
    max_tool_calls=2 adds $0.02 and is refused, the provider never asked."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-s", scope="tenant", value="acme", limit_usd=Decimal("2.51"))
    search: Any = [{"type": "web_search"}]
    async with capped_client(ingress_settings, budget) as client:
        await client.responses.create(
            model="gpt-4o", input="news?", max_output_tokens=100, tools=search, max_tool_calls=0
        )
        asked = len(upstream.provider.received)
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(
                model="gpt-4o", input="news?", max_output_tokens=100, tools=search, max_tool_calls=2
            )
    assert "worst case of this call $2.52" in refusal_of(refused, upstream, asked)


async def test_searches_by_the_preview_tool_reserve_its_fee(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On gpt-4o the older web_search_preview tool costs $25 a thousand searches, not
    web_search's $10: under a $2.52 cap ($2.501 of tokens, as above), a call that may
    search once with web_search fits ($2.511), with web_search_preview it is refused
    ($2.526), the provider never asked."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-p", scope="tenant", value="acme", limit_usd=Decimal("2.52"))
    async with capped_client(ingress_settings, budget) as client:
        for tool in ("web_search", "web_search_preview"):
            search: Any = [{"type": tool}]
            asked = len(upstream.provider.received)
            try:
                await client.responses.create(
                    model="gpt-4o", input="news?", max_output_tokens=100, tools=search,
                    max_tool_calls=1,
                )  # fmt: skip
            except BadRequestError as error:
                assert tool == "web_search_preview"
                assert len(upstream.provider.received) == asked
                assert "worst case of this call $2.526" in str(error)
            else:
                assert tool == "web_search"


async def test_anthropic_tools_reserve_the_tokens_anthropic_adds_for_them(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Messages call with tools is billed a tool-use system prompt (496 tokens on
    Claude Haiku 4.5 with tool_choice auto) and, for the bash tool, 325 tokens of its
    definition, none of them in the body. Under a $0.001 cap, the call's bytes and
    max_tokens alone would fit; with the 821 tokens Anthropic adds, at Haiku 4.5's
    dearest input rate ($2.00 a million: 1-hour cache writes), it is refused before
    the provider is asked. The same call without tools goes through."""
    monkeypatch.setenv("LLMTAP_TEST_ANTHROPIC_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-t", scope="tenant", value="acme", limit_usd=Decimal("0.001"))
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    plain = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "list the files here"}],
    }
    with_bash = orjson.dumps({**plain, "tools": [{"type": "bash_20250124", "name": "bash"}]})

    def worst(prompt_tokens: int) -> Decimal:  # input at $2.00, output at $5.00 a million
        return (prompt_tokens * Decimal("2.00") + 10 * Decimal("5.00")) / Decimal(1_000_000)

    assert worst(len(with_bash)) < budget.limit_usd < worst(len(with_bash) + 496 + 325)
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    await unspent(settings, budget)
    async with (
        TestServer(create_app(settings), host="127.0.0.1") as server,
        aiohttp.ClientSession(headers={"x-api-key": secret}) as session,
    ):
        async with asyncio.timeout(10):  # the key is loaded, the budgets' spend read
            while True:
                async with session.post(server.make_url("/v1/messages"), json=plain) as answer:
                    if answer.status != 401:
                        assert answer.status == 200, await answer.text()
                        break
                await asyncio.sleep(0.1)
        asked = len(upstream.provider.received)
        async with session.post(server.make_url("/v1/messages"), data=with_bash) as answer:
            status, body = answer.status, await answer.json()
    assert status == 400, body
    error = body["error"]
    assert error["type"] == "invalid_request_error", error
    assert "budget 'acme-t'" in error["message"]
    reserved = error["message"].split("worst case of this call $")[1].split()[0]
    assert Decimal(reserved) == worst(len(with_bash) + 496 + 325)
    assert len(upstream.provider.received) == asked


async def test_a_call_asking_for_fast_mode_reserves_at_the_fast_rates(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claude Opus 5 in fast mode bills every token at twice its standard rates: with
    8,000 output tokens asked, its worst case is ~$0.20 ($25 a million) at standard
    speed and ~$0.40 in fast mode. Under a $0.30 cap the standard call goes through, the
    same call asking speed "fast" is refused, the provider never asked."""
    monkeypatch.setenv("LLMTAP_TEST_ANTHROPIC_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-f", scope="tenant", value="acme", limit_usd=Decimal("0.30"))
    await unspent(ingress_settings, budget)
    server = await serve_ingress(ingress_settings.model_copy(update={"budgets": [budget]}))
    base = str(server.make_url("")).rstrip("/")
    ask: Any = {
        "model": "claude-opus-5",
        "max_tokens": 8_000,
        "messages": [{"role": "user", "content": "hi"}],
        "betas": ["fast-mode-2026-02-01"],
        "inference_geo": "global",  # run anywhere: the standard rates, fast mode's apart
    }
    try:
        secret = await make_key(base, ingress_settings.key_file)
        async with AsyncAnthropic(base_url=base, api_key=secret, max_retries=0) as client:
            await client.beta.messages.create(**ask, speed="standard")
            asked = len(upstream.provider.received)
            with pytest.raises(AnthropicBadRequestError) as refused:
                await client.beta.messages.create(**ask, speed="fast")
    finally:
        await server.close()
    assert len(upstream.provider.received) == asked
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["error"]["type"] == "invalid_request_error"
    worst = Decimal(error["error"]["message"].split("worst case of this call $")[1].split()[0])
    assert Decimal("0.40") < worst < Decimal("0.41")  # 8,000 at $50 a million, and the body


async def test_a_call_that_may_run_in_the_us_reserves_at_1_1x(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claude Opus 5 run in the US bills every token at 1.1x: with 8,000 output tokens
    asked, its worst case is ~$0.20 ($25 a million) run "global" and ~$0.22 in the US.
    Under a $0.21 cap the call asking "global" goes through; the same call asking "us"
    is refused, and so is one asking none (its workspace's default may be "us"), the
    provider never asked."""
    monkeypatch.setenv("LLMTAP_TEST_ANTHROPIC_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-g", scope="tenant", value="acme", limit_usd=Decimal("0.21"))
    await unspent(ingress_settings, budget)
    server = await serve_ingress(ingress_settings.model_copy(update={"budgets": [budget]}))
    base = str(server.make_url("")).rstrip("/")
    ask: Any = {
        "model": "claude-opus-5",
        "max_tokens": 8_000,
        "messages": [{"role": "user", "content": "hi"}],
    }
    refusals = []
    try:
        secret = await make_key(base, ingress_settings.key_file)
        async with AsyncAnthropic(base_url=base, api_key=secret, max_retries=0) as client:
            await client.messages.create(**ask, inference_geo="global")
            asked = len(upstream.provider.received)
            geos: list[Any] = [{"inference_geo": "us"}, {}]
            for geo in geos:
                with pytest.raises(AnthropicBadRequestError) as refused:
                    await client.messages.create(**ask, **geo)
                refusals.append(refused.value.body)
    finally:
        await server.close()
    assert len(upstream.provider.received) == asked
    for error in refusals:
        assert isinstance(error, dict)
        assert error["error"]["type"] == "invalid_request_error"
        message = error["error"]["message"]
        worst = Decimal(message.split("worst case of this call $")[1].split()[0])
        # 8,000 at $27.50 a million, and the body's bytes at $11 (1-hour writes, 1.1x)
        assert Decimal("0.22") < worst < Decimal("0.222")


async def test_a_call_openai_may_serve_at_priority_reserves_at_the_priority_rates(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPT-4.1 at OpenAI's priority tier bills $14 a million output tokens, not $8: with
    8,000 asked, its worst case is ~$0.064 at the standard tier and ~$0.112 at priority.
    Under a $0.09 cap the call asking for priority is refused, the provider never asked,
    and the same call asking for the flex tier goes through (flex can only cost less);
    and so is one naming no tier (or "auto") refused on a provider whose project's own
    tier is priority (default_service_tier), which llmtap cannot see in the call, where
    one asking for the default tier goes through."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget = BudgetConfig(name="acme-p", scope="tenant", value="acme", limit_usd=Decimal("0.09"))
    ask: Any = {
        "model": "gpt-4.1",
        "max_tokens": 8_000,
        "messages": [{"role": "user", "content": "hi"}],
    }

    def reserved(refused: pytest.ExceptionInfo[BadRequestError], asked: int) -> Decimal:
        message = refusal_of(refused, upstream, asked)
        return Decimal(message.split("worst case of this call $")[1].split()[0])

    async with capped_client(ingress_settings, budget) as client:
        asked = len(upstream.provider.received)
        with pytest.raises(BadRequestError) as refused:
            await client.chat.completions.create(**ask, service_tier="priority")
        assert Decimal("0.112") < reserved(refused, asked) < Decimal("0.113")  # and the body
        flex = await client.chat.completions.create(**ask, service_tier="flex")
        assert flex.service_tier == "flex"

    priority_project = ProviderConfig(
        kind="openai",
        base_url=upstream.base_url,
        api_key_env="LLMTAP_TEST_OPENAI_KEY",
        default_service_tier="priority",
    )
    settings = ingress_settings.model_copy(update={"providers": {"openai": priority_project}})
    async with capped_client(settings, budget) as client:
        asked = len(upstream.provider.received)
        with pytest.raises(BadRequestError) as refused:
            await client.chat.completions.create(**ask)
        assert Decimal("0.112") < reserved(refused, asked) < Decimal("0.113")
        with pytest.raises(BadRequestError) as refused:
            await client.chat.completions.create(**ask, service_tier="auto")
        assert Decimal("0.112") < reserved(refused, asked) < Decimal("0.113")
        await client.chat.completions.create(**ask, service_tier="default")


async def test_a_budget_made_monthly_is_capped_by_the_month_s_spend(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator turns a daily $1 budget into a monthly one mid-month. The budgets
    topic holds its daily state from before (today's spend), then its monthly one
    ($0.999 this month). An ingress started with the monthly budget kept the daily state
    (its period starts later than the month's), took it for another period's, and judged
    the cap against a fresh month: $0 spent, the call admitted. (On the 1st both periods
    start together: the larger, the month's, was kept anyway.)"""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    now = utcnow()
    daily = BudgetConfig(
        name=f"made-monthly-{uuid.uuid4().hex[:8]}",
        scope="tenant",
        value="acme",
        period="day",
        limit_usd=Decimal(1),
    )
    monthly = daily.model_copy(update={"period": "month"})
    today = fresh(daily, now, now).model_copy(update={"spent_usd": Decimal("0.2")})
    month = fresh(monthly, now, now).model_copy(update={"spent_usd": Decimal("0.999")})
    assert await publish_states(Kafka(ingress_settings.kafka_bootstrap), [today, month])
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    settings = ingress_settings.model_copy(update={"budgets": [monthly]})
    asked = len(upstream.provider.received)
    async with TestServer(create_app(settings), host="127.0.0.1") as server:
        status, body, _ = await post_once(str(server.make_url("")).rstrip("/"), secret)
    assert (status, body.get("error", {}).get("code")) == (429, "budget_exceeded"), body
    assert "$0.999 of $1 spent this month" in body["error"]["message"]
    assert len(upstream.provider.received) == asked


async def until_read(app: web.Application, budget: BudgetConfig) -> None:
    """Until the ingress app ``app`` has read a state of ``budget`` off the topic."""
    async with asyncio.timeout(20):
        while budget.name not in app[BUDGETS].states:
            await asyncio.sleep(0.05)


async def test_a_budget_new_to_the_config_is_judged_on_the_spend_the_store_rebuilds(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    store: Store,
) -> None:
    """A hard-capped budget added mid-period: ClickHouse holds $0.999 of its $1 already
    spent (calls made before it was configured), and the budgets topic has no state of
    it (the store rebuilds it from ClickHouse as it starts: after the ingress, or not
    while it is down). The ingress judged it unspent and admitted its calls against a
    spent cap. Now they wait for a state holding the period's spend: with none (the
    store down) a 503 naming the budget, also with only a state a stream worker counted
    from its own start (it has none of the spend before); the store's rebuild, arriving
    while a call waits, refuses it as spent."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    monkeypatch.setattr(admission, "BUDGET_STATES_WAIT_S", 0.5)
    budget, now = await new_budget("added")
    before = made.response(
        now, usage=Usage(input_tokens=10, output_tokens=1), attribution=Attribution(tenant="acme")
    )
    write_batch(store, Batch(events=[made.costed(before, made.cost("0.999"))]))
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    asked = len(upstream.provider.received)
    app = create_app(settings)
    async with TestServer(app, host="127.0.0.1") as server:
        base = str(server.make_url("")).rstrip("/")
        status, body, retry_after = await post_once(base, secret)
        assert (status, body.get("error", {}).get("code"), retry_after) == (
            503,
            "budget_state_unavailable",
            "1",
        ), body
        assert f"budget {budget.name!r} (tenant 'acme') has no spend" in body["error"]["message"]
        # A worker started with the budget before the store rebuilt it: from $0.
        (counted,), _ = Ledger([budget]).roll(utcnow())
        assert await publish_states(settings.kafka, [counted])
        await until_read(app, budget)
        status, body, _ = await post_once(base, secret)
        assert (status, body["error"]["code"]) == (503, "budget_state_unavailable"), body
        monkeypatch.setattr(admission, "BUDGET_STATES_WAIT_S", 30.0)
        waiting = asyncio.create_task(post_once(base, secret))
        assert await publish_states(settings.kafka, [rebuilt_state(store, budget, utcnow())])
        status, body, _ = await waiting
        assert (status, body["error"]["code"]) == (429, "budget_exceeded"), body
        assert "$0.999 of $1 spent" in body["error"]["message"]
    assert len(upstream.provider.received) == asked


async def test_a_fresh_install_s_cap_admits_once_the_store_says_nothing_is_spent(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    store: Store,
) -> None:
    """No call ever made: the store still publishes each budget's state ($0), so a
    capped call is judged (admitted), not kept waiting for a spend that never comes."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    budget, _ = await new_budget("fresh")
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    settings = ingress_settings.model_copy(update={"budgets": [budget]})
    async with TestServer(create_app(settings), host="127.0.0.1") as server:
        waiting = asyncio.create_task(post_once(str(server.make_url("")).rstrip("/"), secret))
        assert await publish_states(settings.kafka, [rebuilt_state(store, budget, utcnow())])
        status, body, _ = await waiting
    assert status == 200, body
