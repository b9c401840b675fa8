"""Several ClickHouse writers in one consumer group, partitions moving between them
while a batch is being written. Real broker (Tansu), real store (chDB)."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from llmtap.config import Settings
from llmtap.kafka import Kafka
from llmtap.names import Names
from sinks.clickhouse import replay
from sinks.clickhouse.write import insert_calls
from sinks.clickhouse.writer import ClickHouseWriter
from sinks.consumer import sink_consumer
from sql.store import Store
from tests.conftest import Broker, start_broker
from tests.test_clickhouse_writer import costed
from tests.test_replay import calls, running, until

HELD_S = 30.0  # the longest a store step is held back (a test that waits this long fails)


async def produce(bootstrap: str, count: int) -> dict[TopicPartition, int]:
    """``count`` costed events, keyed at random (so on both partitions); return each
    partition's next offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    try:
        sent = [
            await producer.send(
                Names().costed, costed().model_dump_json().encode(), key=uuid.uuid4().bytes
            )
            for _ in range(count)
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


def held_first_time(real: Callable[..., Any], release: threading.Event) -> Callable[..., Any]:
    """``real``, whose first call (a store step, in a thread) waits for ``release``: a
    slow store (a big table, a busy server) holding the first writer's batch."""
    calls_made = []

    def held(*args: Any) -> Any:
        calls_made.append(args)
        if len(calls_made) == 1:
            release.wait(HELD_S)
        return real(*args)

    return held


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
                try:  # the second writer takes its share, the first's insert held
                    await until(lambda: b.batches_written > 0, "the second writer writing")
                finally:
                    release.set()
                await until_committed(broker.bootstrap, group, ends)
                await until(lambda: a.batches_written >= 1, "the first writer's batch written")
    assert calls(store) >= 40
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sinks.")]
    assert not [m for m in messages if "lost the broker" in m]
    assert messages.count("ClickHouse writer consuming") == 2  # each writer's one consumer
