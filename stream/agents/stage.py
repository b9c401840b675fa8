"""What the worker's two stages share (stream/agents/costs.py, spikes.py): a consumer in
the stage's group, a producer, a loop that hands over whole fetched batches, offsets
committed every second for what was done and delivered, and handovers at rebalances.

The stages read with aiokafka's ``getmany`` instead of Faust's per-event stream, which
costs ~70 µs an event before any work (bench/stream_floor.py). A stage is a mode
service the Faust worker runs beside its app.

**Batches and rebalances.** A batch is handled and committed under a lock; a stage
giving partitions up first commits what it handled (the group's callback waits for
the lock). A batch fetched before a rebalance but not started when it came is dropped
(``_generation``): the partitions' owners, this stage included, read it again from the
committed offsets (the cost stage: from its checkpoints). A stage whose loop or
handover fails stops the worker (aiokafka would log a failed callback and go on), and
`llmtap up` with it: a stage that cannot go on must not look alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, ClassVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import CommitFailedError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition
from mode import Service

from llmtap.config import Settings
from llmtap.heartbeats import heartbeat_meanwhile
from llmtap.names import Names

log = logging.getLogger(__name__)

BATCH = 2000  # records per fetched batch, at most (the stream_batch_records default)
POLL_MS = 50  # how long a fetch waits for records before the loop looks around
# Handled offsets are committed at most this often (and at every rebalance and stop):
# a worker killed in between does that work again, which every stage downstream of it
# takes once (derived ids, budget states' offsets, alert ids).
COMMIT_EVERY_S = 1.0
STOP_TIMEOUT_S = 30.0
REBALANCE_TIMEOUT_MS = 300_000  # Kafka's Java client's default (max.poll.interval.ms)

Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


def group_consumer(
    settings: Settings,
    group_id: str,
    client: str,
    assignors: Sequence[type[AbstractPartitionAssignor]] = (RoundRobinPartitionAssignor,),
) -> AIOKafkaConsumer:
    """A consumer in ``group_id`` that commits only when told, starts a group with no
    offsets at the beginning, and joins and leaves as fast as the worker's settings say
    (Tansu and a small Kafka answer fast); the group shares partitions by the first of
    ``assignors`` every member offers."""
    session_ms = int(settings.stream_session_timeout_s * 1000)
    return AIOKafkaConsumer(
        **settings.kafka.consumer_options(client),
        group_id=group_id,
        partition_assignment_strategy=tuple(assignors),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        # How long a rebalance waits for a live member to rejoin: one taking partitions
        # over cannot before its callback returns, and one not back by then is expelled
        # (real Kafka; Tansu waits). Dead members go at the session timeout regardless.
        rebalance_timeout_ms=max(session_ms, REBALANCE_TIMEOUT_MS),
        # aiokafka's heartbeat leaves the group after this long without a fetch (a
        # takeover holding the stage's lock does not fetch).
        max_poll_interval_ms=max(session_ms, REBALANCE_TIMEOUT_MS),
        heartbeat_interval_ms=int(settings.stream_heartbeat_interval_s * 1000),
    )


class GroupStage(Service):
    """A stage reading a topic in a group (:meth:`reads`: the deployment's names for
    them); subclasses handle each batch (:meth:`handle`) and may add to what a commit, a
    handover or a takeover does. ``client`` is its Kafka clients' name."""

    client: ClassVar[str]
    redone = "their records are read again"  # said when a commit fails

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self.names = settings.kafka.names
        self.topic, self.group = self.reads(self.names)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._busy = asyncio.Lock()  # held while a batch is handled and committed
        self._generation = 0  # moves at every rebalance: batches fetched before are void
        self._done: dict[TopicPartition, int] = {}  # next offsets, handled, not committed
        self._commit_at = 0.0
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        # Read at each scrape of the worker's /metrics (stream/metrics.py):
        self.skipped = 0  # records that could not be decoded, passed over
        self.last_batch_at = 0.0  # unix time a batch of records was last handled
        self.last_poll_at = 0.0  # unix time the loop last went round (records or none)

    @staticmethod
    def reads(names: Names) -> tuple[str, str]:
        """The topic the stage reads and its consumer group."""
        raise NotImplementedError

    async def _start_producer(self, **options: Any) -> AIOKafkaProducer:
        """The stage's producer, every write acknowledged by all replicas."""
        producer = self._producer = AIOKafkaProducer(
            **self._settings.kafka.producer_options(self.client), acks="all", **options
        )
        await producer.start()
        return producer

    async def _start_consuming(self) -> None:
        """Join the group and start the loop (once the subclass is ready for batches)."""
        consumer = self._consumer = group_consumer(
            self._settings, self.group, self.client, self.assignors()
        )
        consumer.subscribe([self.topic], listener=_Listener(self))
        await consumer.start()
        self._loop_task = asyncio.create_task(self._consume())

    async def end_loop(self) -> None:
        """Stop fetching: the batch in hand is finished and committed; a loop stuck in a
        fetch that waits for a rebalance that never ends is cancelled (nothing to
        commit)."""
        self._stopping = True
        task = self._loop_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    def assignors(self) -> Sequence[type[AbstractPartitionAssignor]]:
        """How the stage's group shares its topic's partitions: evenly, by default."""
        return (RoundRobinPartitionAssignor,)

    async def on_stop(self) -> None:
        await self.end_loop()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def handle(self, fetched: Fetched) -> None:
        """Do a batch's work (called under the lock; ``fetched`` is empty when nothing
        came within POLL_MS, or the batch was fetched before a rebalance), and say in
        ``_done`` what may be committed."""
        raise NotImplementedError

    async def revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._busy:  # the batch in hand is committed before partitions go
            try:
                await self._commit()
            finally:
                self.gave_up(revoked)
                # Last, with no wait after it: a batch fetched before now is dropped,
                # even one handed over while this ran.
                self._generation += 1

    def gave_up(self, revoked: Iterable[TopicPartition]) -> None:
        """What else giving partitions up takes (called under the lock)."""

    async def take_over(self, assigned: list[TopicPartition]) -> None:
        """What taking partitions over takes: nothing, when a partition is read from the
        group's committed offset."""

    def heartbeat_meanwhile(self) -> None:
        """Keep the group's heartbeats going while partitions are taken over (the
        windows step reads an hour of windows back, more on a busy deployment):
        llmtap/heartbeats.py."""
        heartbeat_meanwhile(self._consumer, self.group)

    async def _commit(self) -> None:
        """Commit what was handled since the last commit."""
        if self._done and self._consumer is not None:
            done, self._done = self._done, {}
            try:
                await self._consumer.commit(
                    {tp: OffsetAndMetadata(offset, "") for tp, offset in done.items()}
                )
            except CommitFailedError as exc:
                # The group moved on without this member: the partitions' new owner
                # handles these records again (each stage's output is idempotent).
                # (Never IllegalStateError, a partition not held, as the writer can
                # meet: revoked() commits ``_done`` under the lock before the group
                # changes the assignment, and batches fetched before are dropped.)
                log.warning("%s: offsets not committed (%s); %s", self.group, exc, self.redone)
        self._commit_at = time.monotonic() + COMMIT_EVERY_S

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping:
                fetched: Fetched = await consumer.getmany(
                    timeout_ms=POLL_MS, max_records=self._settings.stream_batch_records
                )
                # Read once the records are in hand: a fetch that waited out a rebalance
                # returns records of the new assignment, which are this stage's to handle.
                generation = self._generation
                async with self._busy:
                    handled = fetched if generation == self._generation else {}
                    await self.handle(handled)
                    if time.monotonic() >= self._commit_at:
                        await self._commit()
                self.last_poll_at = time.time()
                if handled:
                    self.last_batch_at = self.last_poll_at
            async with self._busy:
                await self._commit()
        except Exception as exc:
            log.exception("%s: stage failed", self.group)
            await self.crash(exc)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """The stage's handovers; if one raises, the stage crashes (aiokafka would log and
    swallow it)."""

    def __init__(self, stage: GroupStage) -> None:
        self._stage = stage

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._guarded(self._stage.revoked(revoked), "giving partitions up")

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._stage.heartbeat_meanwhile()
        await self._guarded(self._stage.take_over(assigned), "taking partitions over")

    async def _guarded(self, handover: Awaitable[None], what: str) -> None:
        try:
            await handover
        except Exception as exc:
            log.exception("%s failed", what)
            await self._stage.crash(exc)
