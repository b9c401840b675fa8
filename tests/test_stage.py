"""What every stage of the worker shares (stream/agents/stage.py), on a real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from llmtap import topics
from llmtap.config import Settings
from llmtap.names import Names
from stream.agents.stage import Fetched, GroupStage, group_consumer
from tests.conftest import Broker

# Long enough that a loaded CI machine (2 shared cores, the whole suite in one
# process) does not miss it between two heartbeats: at 1 s it did, once.
SESSION_S = 3.0


class SlowTakeover(GroupStage):
    """A stage whose takeover outlasts its group session, as restoring a busy
    deployment's windows can (stream/agents/windows.py reads an hour of them back)."""

    client = "test-slow-takeover"

    def __init__(self, settings: Settings, group: str, slow_s: float, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.group = group
        self.slow_s = slow_s
        self.takeovers = 0
        self.taken = asyncio.Event()

    @staticmethod
    def reads(names: Names) -> tuple[str, str]:
        return names.responses, ""

    async def on_start(self) -> None:
        await self._start_consuming()

    async def take_over(self, assigned: Iterable[TopicPartition]) -> None:
        self.takeovers += 1
        await asyncio.sleep(self.slow_s)  # the work a takeover does, made long
        self.taken.set()

    def holds(self) -> set[TopicPartition]:
        assert self._consumer is not None
        return set(self._consumer.assignment())

    async def handle(self, fetched: Fetched) -> None:
        for tp, records in fetched.items():
            self._done[tp] = records[-1].offset + 1


async def test_a_takeover_longer_than_the_session_keeps_the_worker_in_its_group(
    broker: Broker,
) -> None:
    """The group's heartbeats go on while a worker takes partitions over: a worker
    whose takeover outlasted ``stream_session_timeout_s`` was expelled from the group
    when it finished, rejoined, was given the partitions again and started the same
    long takeover again, for ever, never committing a record."""
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        stream_session_timeout_s=SESSION_S,
        stream_heartbeat_interval_s=SESSION_S / 5,
    )
    group = f"slow-takeover-{uuid.uuid4().hex}"
    first = SlowTakeover(settings, group, slow_s=0)
    second = SlowTakeover(settings, group, slow_s=3 * SESSION_S)
    await first.start()
    try:
        await first.taken.wait()
        await second.start()  # the group rebalances: each takes one of two partitions
        try:
            await second.taken.wait()
            producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
            await producer.start()
            try:
                for n in range(8):  # keyed to both partitions
                    await producer.send_and_wait(first.topic, b"{}", key=b"%d" % n)
            finally:
                await producer.stop()
            async with asyncio.timeout(30):
                while await topics.lag(settings.kafka, group, first.topic) > 0:
                    await asyncio.sleep(0.2)
            # Without heartbeats meanwhile the group had expelled the second worker
            # before it finished, and given every partition to the first (a third
            # takeover).
            assert (first.takeovers, second.takeovers) == (2, 1)
            assert second.holds()
        finally:
            await second.stop()
    finally:
        await first.stop()


async def test_a_rebalance_waits_for_a_member_taking_partitions_over() -> None:
    """Kafka drops a live member that has not rejoined within the rebalance timeout, and
    one taking partitions over cannot rejoin before its callback returns: with the
    timeout at the 10 s session, a worker joining while another took over for longer
    got that one expelled, and the two could expel each other in turn (not seen on
    Tansu, which waits). aiokafka's heartbeat leaves the group after as long without a
    fetch, and a takeover does not fetch."""
    consumer = group_consumer(Settings(), "g", "test")
    try:
        assert consumer._rebalance_timeout_ms >= 300_000
        assert consumer._max_poll_interval_ms >= consumer._rebalance_timeout_ms
    finally:
        await consumer.stop()
