"""Several ClickHouse writers in one consumer group, partitions moving between them
while a batch is being written. Real broker (Tansu), real store (chDB)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from prometheus_client import generate_latest

from llmtap.config import Settings
from llmtap.kafka import Kafka
from llmtap.names import Names
from sinks.clickhouse import replay
from sinks.clickhouse.decode import decode_batch
from sinks.clickhouse.write import calls_insert, insert_calls
from sinks.clickhouse.writer import ClickHouseWriter
from sinks.consumer import sink_consumer
from sinks.metrics import store_registry
from sql.store import Store, render
from tests import prometheus
from tests.conftest import Broker, start_broker
from tests.test_replay import call, calls, rollup_requests, running, until

HELD_S = 30.0  # the longest a store step is held back (a test that waits this long fails)
HELD_UNTIL_S = 5.0  # the longest a store step waits for what it is held until


def distinct_calls(store: Store) -> int:
    return int(store.command("SELECT uniqExact(event_id) FROM calls"))


async def produce(
    bootstrap: str, count: int, partitions: tuple[int, ...] = ()
) -> dict[TopicPartition, int]:
    """``count`` costed calls (one property each: every rollup counts each once) to
    ``partitions`` in turn, or keyed at random; return each partition's next offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    try:
        sent = [
            await producer.send(
                Names().costed,
                call().model_dump_json().encode(),
                key=uuid.uuid4().bytes,
                partition=partitions[i % len(partitions)] if partitions else None,
            )
            for i in range(count)
        ]
        for meta in await asyncio.gather(*sent):
            tp = TopicPartition(meta.topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


async def committed(bootstrap: str, group: str, ends: dict[TopicPartition, int]) -> bool:
    """Whether the group has committed every partition up to ``ends``."""
    found = await replay.committed_offsets(Kafka(bootstrap), group, ends)
    return all(found.get(tp, -1) >= end for tp, end in ends.items())


async def until_committed(bootstrap: str, group: str, ends: dict[TopicPartition, int]) -> None:
    async with asyncio.timeout(60):
        while not await committed(bootstrap, group, ends):
            await asyncio.sleep(0.1)


async def within(predicate: Callable[[], bool]) -> bool:
    """Whether ``predicate`` holds within 30 s (polled)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while not predicate():
                await asyncio.sleep(0.05)
            return True
    return False


def held_first_time(real: Callable[..., Any], release: threading.Event) -> Callable[..., Any]:
    """``real``, whose first call (a store step, in a thread) returns only once
    ``release`` is set: a slow store (a big table, a busy server) holding the first
    writer's batch after the step itself was done."""
    calls_made = []

    def held(*args: Any) -> Any:
        calls_made.append(args)
        done = real(*args)
        if len(calls_made) == 1:
            release.wait(HELD_S)
        return done

    return held


def held_until(real: Callable[..., Any], ready: Callable[[], bool]) -> Callable[..., Any]:
    """``real`` (a store step, in a thread), made once ``ready()`` holds or after
    HELD_UNTIL_S: a slow store."""

    def held(*args: Any) -> Any:
        deadline = time.monotonic() + HELD_UNTIL_S
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*args)

    return held


def revocation_waits(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether a writer has said it waits, at a revocation, for the batch it writes."""
    return any("waiting up to" in r.getMessage() for r in caplog.records)


async def joined(second: ClickHouseWriter, caplog: pytest.LogCaptureFixture) -> None:
    """Until the second writer writes, or the first waits, at a revocation, for its batch."""
    await until(
        lambda: second.batches_written > 0 or revocation_waits(caplog),
        "the second writer writing",
    )


def consuming(caplog: pytest.LogCaptureFixture) -> int:
    """How many consumers the writers started."""
    return [r.getMessage() for r in caplog.records].count("ClickHouse writer consuming")


class Counting(ClickHouseWriter):
    """A writer that counts the batches it has read (each is decoded once)."""

    read = 0

    async def _decode(self, *args: Any) -> Any:
        self.read += 1
        return await super()._decode(*args)


class HeldChecks:
    """A writer's store whose duplicate checks (in a thread) return, each in turn,
    only once its event is set: a slow store (a big table, a busy server) holding the
    writer's batch after deciding what it inserts."""

    def __init__(self, store: Store, releases: list[threading.Event]) -> None:
        self._store = store
        self._releases = releases
        self._check = render("existing_call_ids")
        self.holding = threading.Event()  # a check is held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def rows(self, sql: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        found = self._store.rows(sql, *args, **kwargs)
        if sql == self._check and self._releases:
            self.holding.set()
            self._releases.pop(0).wait(HELD_S)
        return found


async def test_the_batches_read_are_the_runs_their_replay_reads(
    broker: Broker, store: Store
) -> None:
    """The writer's batches, read from two partitions and cut by its row limit (one
    partition's messages split between batches), are the runs a replay of their offset
    ranges reads back, in the same order (so the same rows, and the same token), and
    hold every message once."""
    settings = Settings(
        kafka_bootstrap=broker.bootstrap, sink_batch_rows=50, sink_batch_seconds=0.3
    )
    ends = {
        **await produce(broker.bootstrap, 60, (0,)),
        **await produce(broker.bootstrap, 45, (1,)),
    }
    writer = ClickHouseWriter(settings, store, group_id=f"runs-{uuid.uuid4().hex[:8]}")
    consumer = writer._consumer()
    await consumer.start()
    try:
        seen: dict[TopicPartition, list[int]] = {tp: [] for tp in ends}
        batches = 0
        async with asyncio.timeout(30):
            while sum(map(len, seen.values())) < sum(ends.values()):
                runs, spans, _ = await writer._read_batch(consumer)
                if not runs:
                    continue  # not assigned yet, or its partitions paused for the repeat
                batches += 1
                assert sum(map(len, runs)) <= 50
                back = await replay.read_ranges(settings.kafka, replay.costed_ranges(spans))
                assert back == runs
                for run in runs:
                    seen[TopicPartition(run.topic, run.partition)] += run.offsets
        assert batches >= 3  # 105 messages, at most 50 a batch
        assert seen == {tp: list(range(end)) for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def test_a_commit_leaves_out_the_partitions_taken_away(broker: Broker, store: Store) -> None:
    """A batch read before a rebalance spans partitions now another member's: the
    writer commits those it still holds and not the others (committing them was
    refused, and the consumer torn down)."""
    settings = Settings(kafka_bootstrap=broker.bootstrap)
    group = f"rebalance-{uuid.uuid4().hex[:8]}"
    names = settings.kafka.names
    writer = ClickHouseWriter(settings, store, group_id=group)
    mine = writer._consumer()
    other = sink_consumer([names.costed, names.windows], settings.kafka, group, "other")
    await mine.start()
    await other.start()
    try:
        partitions = {
            TopicPartition(topic, p) for topic in (names.costed, names.windows) for p in (0, 1)
        }
        async with asyncio.timeout(30):  # both in the group, the partitions shared
            while not (
                mine.assignment()
                and other.assignment()
                and mine.assignment() | other.assignment() == partitions
                and not mine.assignment() & other.assignment()
            ):
                await asyncio.sleep(0.05)
        ends = await mine.end_offsets(list(partitions))
        held = mine.assignment()
        assert await writer.commit(mine, ends) == {tp: ends[tp] for tp in held}
        found = await replay.committed_offsets(settings.kafka, group, partitions)
        assert {tp: found.get(tp, -1) for tp in partitions} == {
            tp: ends[tp] if tp in held else -1 for tp in partitions
        }
    finally:
        await other.stop()
        await mine.stop()


async def test_a_writer_whose_partitions_move_mid_write_goes_on(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second writer joins the group while the first one's insert is under way: the
    first commits what it still holds and reads on, with the same consumer (no
    teardown: no leaving the group, no rebalance more)."""
    caplog.set_level(logging.INFO)
    release = threading.Event()
    monkeypatch.setattr(
        "sinks.clickhouse.writer.insert_calls", held_first_time(insert_calls, release)
    )
    async with start_broker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.3)
        group = settings.kafka.names.sink_group
        ends = await produce(broker.bootstrap, 40)
        assert len(ends) == 2
        a = ClickHouseWriter(settings, store)
        async with running(a):
            await until(lambda: a.first_read_at is not None, "the first writer reading")
            b = ClickHouseWriter(settings, store)
            async with running(b):
                try:
                    await joined(b, caplog)
                finally:
                    release.set()
                await until_committed(broker.bootstrap, group, ends)
                await until(lambda: a.batches_written >= 1, "the first writer's batch written")
                await until(lambda: consuming(caplog) >= 2, "both writers consuming")
    assert calls(store) == distinct_calls(store) == 40
    assert a.batches_given_up == 0
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sinks.")]
    assert not [m for m in messages if "lost the broker" in m]
    assert consuming(caplog) == 2  # each writer's one consumer


async def test_two_writers_count_each_call_once_across_a_rebalance(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The first writer's duplicate checks are slow; a second writer joins while it
    writes one batch and holds the next, read already, and is given some of its
    partitions. The first finishes the batch it writes (its insert and its commit)
    before giving them up, and drops the one it held: its partitions' owners read it
    from the last commit. Every call is counted once, in calls and in every rollup.
    The second writer had read them from the last commit, checked them before the
    first one's inserts and written them too (50 calls as ~75 rows); without the
    batch held dropped, it and the first wrote some of those again."""
    caplog.set_level(logging.INFO)
    first, second = threading.Event(), threading.Event()
    held = HeldChecks(store, [first, second])
    async with start_broker() as broker:
        # A batch is 40 calls, or what came within 2 s of its first (time to send more).
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, sink_batch_seconds=2.0, sink_batch_rows=40
        )
        group = settings.kafka.names.sink_group
        ends = await produce(broker.bootstrap, 40, (0, 1))
        a = Counting(settings, cast(Store, held))
        async with running(a):
            await until(held.holding.is_set, "the first writer's first batch in its check")
            ends |= await produce(broker.bootstrap, 10, (0, 1))  # on the partitions of both
            await until(lambda: a.read == 2, "the first writer holding its next batch")
            b = ClickHouseWriter(settings, store)
            async with running(b):
                try:
                    await joined(b, caplog)
                    first.set()
                    await until(lambda: b.batches_written > 0, "the second writer writing")
                finally:
                    first.set()
                    second.set()
                await until_committed(broker.bootstrap, group, ends)
                settled = await within(lambda: not replay.latest(store, group))
    assert calls(store) == distinct_calls(store) == 50
    assert set(rollup_requests(store).values()) == {50}
    assert settled, "an insert recorded and never committed"
    assert a.rows_written >= 40 and a.batches_given_up == 0  # its batch finished


async def test_a_batch_outlasting_the_revocations_wait_is_given_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first writer's duplicate check outlasts what a revocation waits for it: the
    batch is given up, neither recorded nor inserted (its partitions' owners read it
    from the last commit), and the group goes on without it. Every call is counted
    once, and no insert is left recorded and never committed (one recorded after its
    partitions moved on would be repeated by a later owner, over rows stored since)."""
    monkeypatch.setattr("sinks.clickhouse.writer.REVOKE_WAIT_S", 1.0)
    release = threading.Event()
    async with start_broker() as broker:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.3, sink_batch_rows=40
        )
        group = settings.kafka.names.sink_group
        ends = await produce(broker.bootstrap, 50)
        held = HeldChecks(store, [release])
        a = Counting(settings, cast(Store, held))
        async with running(a):
            await until(held.holding.is_set, "the first writer's first batch in its check")
            await until(lambda: a.read == 2, "the first writer holding its next batch")
            b = ClickHouseWriter(settings, store)
            async with running(b):
                try:  # the second writer writes, the first's check still held
                    await until(lambda: b.rows_written > 0, "the second writer writing")
                finally:
                    release.set()
                await until_committed(broker.bootstrap, group, ends)
                settled = await within(lambda: not replay.latest(store, group))
    assert calls(store) == distinct_calls(store) == 50
    assert set(rollup_requests(store).values()) == {50}
    assert settled, "an insert recorded and never committed"
    metrics = generate_latest(store_registry(lambda: a, lambda: None)).decode()
    assert prometheus.sample(metrics, "llmtap_store_batches_given_up_total") == 1


async def test_a_writer_given_partitions_writes_nothing_before_their_repeat(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer recorded its insert of 40 calls and died before making it. Its successor,
    given the partitions, repeats it on a slow store (the repeat's insert held until the
    successor wrote a batch, or 5 s), and reads them only then: its batch finds those
    calls stored and leaves them out. Every call is stored once, each rollup counts it
    once. It read on meanwhile (aiokafka hands the partitions out before the callback
    that repeats returns): its batch found none stored and inserted all 65, and the
    repeat then inserted the 40 again (105 rows)."""
    async with start_broker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.3)
        group = settings.kafka.names.sink_group
        ends = await produce(broker.bootstrap, 40, (0, 1))
        ranges = replay.costed_ranges({tp: (0, end) for tp, end in ends.items()})
        runs = await replay.read_ranges(settings.kafka, ranges)
        assert runs is not None and sum(map(len, runs)) == 40
        replay.record(store, group, calls_insert(decode_batch(runs).calls, ()), ranges)
        ends = await produce(broker.bootstrap, 25, (0, 1))
        writer = ClickHouseWriter(settings, store)
        monkeypatch.setattr(
            "sinks.clickhouse.replay.insert_calls",
            held_until(insert_calls, lambda: writer.batches_written > 0),
        )
        async with running(writer):
            await until_committed(broker.bootstrap, group, ends)
            await until(lambda: writer.inserts_repeated == 1, "the insert repeated")
            assert (calls(store), distinct_calls(store)) == (65, 65)
            assert set(rollup_requests(store).values()) == {65}
            await until(lambda: not replay.latest(store, group), "every insert's commit recorded")
    assert writer.inserts_lost == 0


async def test_a_rebalance_waits_for_a_writer_repeating_inserts() -> None:
    """A writer repeating the inserts a crash cut short cannot rejoin before that is
    done: with the 10 s session as the limit, a store joining meanwhile got it expelled
    on Kafka, and it read on as owner of partitions given to the other (Tansu waits).
    It heartbeats meanwhile (llmtap/heartbeats.py), as the stream's stages do."""
    consumer = sink_consumer("t", Kafka("127.0.0.1:9"), "g", "store-writer")
    try:
        assert consumer._rebalance_timeout_ms >= 300_000
        assert consumer._max_poll_interval_ms >= consumer._rebalance_timeout_ms
    finally:
        await consumer.stop()
