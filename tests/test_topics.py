"""Making llmtap's topics (llmtap/topics.py): as many copies as asked, and a refusal
said rather than waited on."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidReplicationFactorError,
    NotControllerError,
    PolicyViolationError,
    RequestTimedOutError,
    UnsupportedVersionError,
)
from aiokafka.structs import TopicPartition
from pydantic import ValidationError

from ingress.app import create_app
from ingress.keys import PUBLISHER
from llmtap import topics
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.kafka import Kafka
from llmtap.names import TOPICS, Names, kind
from llmtap.probes import broker_problem, listening
from llmtap.supervisor import broker_argv, embedded_broker
from tests.conftest import Broker, FakeUpstream, run_llmtap
from tests.fake_provider import SNAPSHOT, free_port
from tests.test_e2e import expected_cost, model_row
from tests.tls import tansu_behind_front


async def test_topics_are_made_with_the_replication_factor_asked() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    async with embedded_broker(bootstrap, 2, replicas=3):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics(list(Names().topics))
        finally:
            await admin.close()
    assert {t["topic"] for t in described} == set(Names().topics)
    replicas = {len(p["replicas"]) for t in described for p in t["partitions"]}
    assert replicas == {3}


def test_a_refusal_names_the_topic_and_why_and_a_topic_made_meanwhile_is_none() -> None:
    refused = topics.refusals(
        [
            ("llmtap.requests", InvalidReplicationFactorError.errno, "larger than brokers: 1"),
            ("llmtap.costed", 36, "Topic with this name already exists."),  # a race lost
            ("llmtap.alerts", 0, None),
            ("llmtap.windows", PolicyViolationError.errno),  # CreateTopics v0: no message
        ]
    )
    assert refused == [
        "llmtap.requests: InvalidReplicationFactorError (larger than brokers: 1)",
        "llmtap.windows: PolicyViolationError",
    ]


def test_an_error_that_may_pass_on_asking_again_is_not_a_refusal() -> None:
    """A controller moving (NOT_CONTROLLER), a request timing out, a quota throttling
    (THROTTLING_QUOTA_EXCEEDED, 89) are asked again, not a reason to stop for good."""
    errors = [
        ("llmtap.requests", NotControllerError.errno, "controller moved"),
        ("llmtap.costed", RequestTimedOutError.errno, None),
        ("llmtap.alerts", 89, "throttled"),
        ("llmtap.windows", PolicyViolationError.errno, "no"),
    ]
    assert topics.refusals(errors) == ["llmtap.windows: PolicyViolationError (no)"]
    assert topics.not_yet(errors) == [
        "llmtap.requests: NotControllerError (controller moved)",
        "llmtap.costed: RequestTimedOutError",
        "llmtap.alerts: ThrottlingQuotaExceeded (throttled)",
    ]


async def test_a_broker_that_cannot_make_the_topics_now_is_waited_for_not_refused() -> None:
    """The broker answers CreateTopics with NOT_CONTROLLER (its controller moving, as
    in a Kafka cluster's rolling restart): not ready, said, and asked again; then made.
    Before, every process that waits for the broker stopped at start, as refused."""
    async with tansu_behind_front(None, make_topics=False) as broker:
        kafka = Kafka(broker.front.bootstrap)
        broker.front.create_topics_errors.append(NotControllerError.errno)
        problem = await broker_problem(kafka, 2)
        assert "TopicsNotYet" in problem and "NotControllerError" in problem, problem
        assert not broker.front.create_topics_errors  # the front did answer it
        assert await broker_problem(kafka, 2) == ""  # asked again: made
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.front.bootstrap)
        await admin.start()
        try:
            assert set(kafka.names.topics) <= set(await admin.list_topics())
        finally:
            await admin.close()


def test_the_default_namespace_keeps_the_names_llmtap_always_used() -> None:
    """Upgrading an existing deployment keeps its topics and its groups' offsets."""
    names = Names()
    assert names.topics == (
        "llmtap.requests",
        "llmtap.responses",
        "llmtap.costed",
        "llmtap.windows",
        "llmtap.alerts",
        "llmtap.budgets",
        "llmtap.reservations",
        "llmtap.checkpoints",
    )
    assert names.compacted == {"llmtap.budgets", "llmtap.reservations", "llmtap.checkpoints"}
    groups = (names.stream_group, names.spikes_group, names.sink_group, names.webhook_group)
    assert groups == ("llmtap-stream", "llmtap-spikes", "llmtap-sink", "llmtap-webhooks")
    assert names.worker_app == "llmtap-worker"


def test_every_name_of_a_namespace_is_under_it_and_knows_its_kind() -> None:
    names = Names("acme.staging")
    assert all(topic.startswith("acme.staging.") for topic in names.topics)
    assert [kind(topic) for topic in names.topics] == list(TOPICS)
    assert names.sink_group == "acme.staging-sink"
    assert names.client_id("ingress") == "acme.staging-ingress"


@pytest.mark.parametrize("namespace", ["", "prod env", "prød", "a/b", "x" * 201])
def test_a_namespace_kafka_cannot_name_topics_with_is_refused_naming_the_setting(
    namespace: str,
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(kafka_namespace=namespace)
    assert refused.value.errors()[0]["loc"] == ("kafka_namespace",)


async def test_spans_are_read_whole_beside_an_empty_one_and_a_span_past_the_log_is_incomplete(
    broker: Broker,
) -> None:
    """A span with nothing to read (a partition with no windows since the warmup's
    horizon) is not a partition whose messages are gone: it ended every read at the
    first quiet poll, the others' records unread, and made the writer's every repeat
    of a range "lost". A span past what the broker has is incomplete at once, patient
    or not (the broker says so)."""
    topic = f"spans-{uuid.uuid4().hex}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for n in range(3):
            await producer.send_and_wait(topic, b"%d" % n, partition=1)
    finally:
        await producer.stop()
    empty, full = TopicPartition(topic, 0), TopicPartition(topic, 1)
    kafka = Kafka(broker.bootstrap)
    for patient in (False, True):
        found, complete = await topics.read_spans(
            kafka, {empty: (0, 0), full: (0, 3)}, patient=patient
        )
        assert ([r.value for r in found], complete) == ([b"0", b"1", b"2"], True)
        found, complete = await topics.read_spans(kafka, {full: (1, 10)}, patient=patient)
        assert ([r.value for r in found], complete) == ([b"1", b"2"], False)


async def test_an_ingress_started_before_the_worker_and_the_store_makes_llmtap_s_topics(
    tmp_path: Path,
) -> None:
    """Compose starts the ingress beside the worker and the store, on a broker without
    llmtap's topics. Its first events (a hard cap's reservations, announced at once)
    made their topics through the broker's auto-creation, with the broker's defaults:
    the compacted reservations topic not compacted, the broker's partitions and
    replication factor, not llmtap's settings. The ingress makes them itself first."""
    bootstrap = f"127.0.0.1:{free_port()}"
    tansu = await asyncio.create_subprocess_exec(
        *broker_argv(bootstrap),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    cap = BudgetConfig(name="cap", scope="tenant", value="acme", limit_usd=Decimal(1))
    settings = Settings(
        data_dir=tmp_path,
        kafka_bootstrap=bootstrap,
        embedded_broker=False,
        topic_partitions=3,
        budgets=[cap],
    )
    names = settings.kafka.names.topics
    try:
        async with asyncio.timeout(30):
            while not await listening(bootstrap):
                await asyncio.sleep(0.1)
            app = create_app(settings)
            async with TestServer(app, host="127.0.0.1"):
                while app[PUBLISHER].published < 1:  # the reservations' announcement
                    await asyncio.sleep(0.05)
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                existing = set(await admin.list_topics())
                made = await admin.describe_topics([n for n in names if n in existing])
            finally:
                await admin.close()
    finally:
        tansu.terminate()
        await tansu.wait()
    assert existing >= set(names)
    assert {t["topic"]: len(t["partitions"]) for t in made} == dict.fromkeys(names, 3)


async def test_an_ingress_a_broker_will_not_make_topics_for_still_publishes(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker (a Kafka-compatible service) that refuses CreateTopics as a whole, not
    topic by topic: topics are its operator's to make, and events go on to it. Taken
    for a broker not ready yet, the ingress never connected: every event went to the
    spool, and /readyz said the broker was unreachable."""

    async def refusing(*args: object, **kwargs: object) -> None:
        raise UnsupportedVersionError("CreateTopics")

    monkeypatch.setattr(topics, "ensure_topics", refusing)
    cap = BudgetConfig(name="cap", scope="tenant", value="acme", limit_usd=Decimal(1))
    settings = Settings(
        data_dir=tmp_path, kafka_bootstrap=broker.bootstrap, embedded_broker=False, budgets=[cap]
    )
    app = create_app(settings)
    async with TestServer(app, host="127.0.0.1"), asyncio.timeout(30):
        while app[PUBLISHER].published < 1:  # the reservations' announcement, sent
            await asyncio.sleep(0.05)
    assert app[PUBLISHER].spooled == 0


async def test_a_compacted_topic_found_made_without_compaction_is_said_not_used_silently(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """llmtap.budgets, .reservations and .checkpoints hold each key's latest value for
    as long as it is the latest: on a Kafka whose topic was made before llmtap made it
    (by an operator, an older ingress's events through the broker's auto-creation, a
    broker that refused llmtap's CreateTopics) with the broker's default policy,
    `delete`, a budget's state was deleted once older than retention.ms (7 days by
    default) and a restarted worker or ingress counted its period from nothing. The
    topic existing, llmtap went on with it, silently: now it says so at ERROR, with the
    command that mends it."""
    kafka = Kafka(broker.bootstrap, names=Names(f"pre{uuid.uuid4().hex[:8]}"))
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(kafka.names.budgets, 2, 1)])  # not compacted
    finally:
        await admin.close()
    with caplog.at_level("ERROR", logger="llmtap.topics"):
        await topics.ensure_topics(kafka, 2)
    [said] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert f"{kafka.names.budgets}: cleanup.policy delete" in said
    assert "cleanup.policy=compact" in said
    # The topics llmtap made itself are compacted and pass without a word.
    caplog.clear()
    other = Kafka(broker.bootstrap, names=Names(f"new{uuid.uuid4().hex[:8]}"))
    with caplog.at_level("ERROR", logger="llmtap.topics"):
        await topics.ensure_topics(other, 2)
        await topics.ensure_topics(other, 2)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_up_on_a_kafka_that_makes_no_topic_itself_makes_every_topic_it_uses(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """docker-compose.yml's Kafka makes no topic a client names
    (auto.create.topics.enable false: left on, a send or a consumer's metadata request
    naming a topic before llmtap had made it made it with the broker's defaults,
    cleanup.policy delete where llmtap needs compaction). So every topic llmtap uses
    must be one it made first: behind a front asking the broker to make no topic for
    any Metadata request, `llmtap up` (a hard-capped budget on: the budgets and
    reservations topics in use too) meters and costs a call, and the broker holds
    llmtap's topics, the compacted ones compacted, and no other."""
    async with tansu_behind_front(None, make_topics=False, auto_create=False) as broker:
        kafka = Kafka(broker.front.bootstrap)
        budget = {"name": "acme-daily", "scope": "tenant", "value": "acme", "limit_usd": "100"}
        env = {
            "LLMTAP_EMBEDDED_BROKER": "false",
            "LLMTAP_KAFKA_BOOTSTRAP": broker.front.bootstrap,
            "LLMTAP_BUDGETS": json.dumps([budget]),
        }
        async with run_llmtap(tmp_path, upstream, env) as running, running.openai() as sdk:
            await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "no auto-creation"}]
            )
            row = await model_row(running.api_url, "gpt-4o" + SNAPSHOT, lambda r: r["requests"])
            fake = upstream.provider
            cost = expected_cost(
                "gpt-4o", fake.prompt_tokens, fake.cached_tokens, fake.completion_tokens
            )
            assert Decimal(row["cost"]) == cost
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.front.bootstrap)
        await admin.start()
        try:
            await admin.describe_topics(["llmtap.named-never-made"])  # the front holds
            listed = {name for name in await admin.list_topics() if not name.startswith("__")}
            assert listed == set(kafka.names.topics)
            assert await topics._not_compacted(admin, sorted(kafka.names.compacted)) == []
        finally:
            await admin.close()
    assert broker.front.metadata_versions and max(broker.front.metadata_versions) < 8
