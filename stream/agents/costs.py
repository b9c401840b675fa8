"""The cost stage: response events in, costed events out; and every costed event handed,
in the same pass, to the accounting steps (windows, budgets) the worker runs.

One read and one decode per call for the whole chain: pricing, windows and budgets
each read the same decoded event (bench/stream_throughput.py measured what re-reading
``llmtap.costed`` per stage cost). A step sees each event with its position on
``llmtap.responses`` (partition, offset), and its ``flush`` runs after every batch
and, without traffic, at every poll (the windows step closes windows there).

**Below Faust's per-event stream.** This is the worker's one high-volume stage, and
Faust's stream costs ~70 µs of CPU an event before any work is done: a do-nothing
``take_events`` agent peaks at ~15,000 events/s on this machine, where aiokafka's
``getmany`` hands over the same records for ~5 µs each (bench/stream_floor.py). So the
stage is a service the Faust worker runs beside its app, consuming whole fetched
batches with an aiokafka consumer in the stream's group. It commits offsets itself,
every second, and only those of batches whose costed events were delivered and whose
steps flushed (budget states delivered). Events are read and written as the
contract's msgspec structs (``llmtap.wire``), and the costed events of a batch go out
as whole Kafka batches (``llmtap.batches``).

**Checkpoints.** Before each commit the stage writes each partition's checkpoint
(stream/checkpoints.py): where the windows step's open windows start (``hold``), the
committed offset to be, and how far the partition's windows were published. A worker
given a partition starts from its latest checkpoint: from memory if it wrote it and
still has the partition's windows, else from ``hold``, passing over what was counted.

**Rebalances.** A worker giving up partitions first finishes the batch in hand, and
checkpoints and commits what it processed (the listener waits for it). A batch
fetched before the rebalance but not started when it came is dropped: the partitions'
owners, this worker included, read it again from their checkpoints. So windows and
budgets count each call once across a rebalance or a crash
(tests/test_stream_scale.py, tests/faults/test_worker.py). A batch whose
costed events the broker keeps refusing holds the rebalance until its resends give up
(~9 s plus the producer's request timeouts), and then the worker stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition
from mode import Service

from llmtap import topics, wire
from llmtap.batches import Batches
from llmtap.config import Settings
from llmtap.events import utcnow
from stream import checkpoints
from stream.agents.consumer import Listener, group_consumer
from stream.pricing import Catalog, price_wire

log = logging.getLogger(__name__)

BATCH = 2000  # records per fetched batch, at most
POLL_MS = 50  # how long a fetch waits for records before the loop looks around
RESEND_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
# Processed offsets are committed at most this often (and at every rebalance and stop),
# as Faust commits: a worker killed in between does that work again, which every stage
# downstream of it takes once (derived ids, budget states' offsets).
COMMIT_EVERY_S = 1.0
STOP_TIMEOUT_S = 30.0

Position = tuple[int, int]  # (partition, offset) on llmtap.responses
Record = tuple[bytes, bytes, int | None]  # a costed event's key, value and partition
Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class Step(Protocol):
    """One accounting stage fed with costed events (stream/agents/windows.py, budgets.py)."""

    async def start(self, producer: AIOKafkaProducer) -> None:
        """The stage's producer, started: for a step's own high-volume output."""
        ...

    def add(self, event: wire.CostedEvent, position: Position, now: datetime) -> None: ...

    async def flush(self) -> None: ...


class CostStage(Service):
    """Prices ``llmtap.responses`` into ``llmtap.costed`` and feeds ``steps``."""

    def __init__(self, settings: Settings, catalog: Catalog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self._catalog = catalog
        self.steps: list[Step] = []
        self.positions = checkpoints.Positions(settings.kafka_bootstrap)
        self.assigned = asyncio.Event()  # set once the group gave this worker partitions
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._costed: Batches | None = None
        self._same_partitions = False
        self._busy = asyncio.Lock()  # held while a batch is processed and committed
        self._generation = 0  # moves at every rebalance: batches fetched before are void
        self._done: dict[TopicPartition, int] = {}  # next offsets, processed, not committed
        self._checkpoints: Batches | None = None
        self._commit_at = 0.0
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._warned: set[str] = set()  # models already logged as unpriced

    async def on_start(self) -> None:
        settings = self._settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            acks="all",
            max_batch_size=1 << 20,
            linger_ms=0,
        )
        await self._producer.start()
        self._costed = await Batches.of(self._producer, topics.COSTED)
        self._checkpoints = await Batches.of(self._producer, topics.CHECKPOINTS)
        for step in self.steps:
            await step.start(self._producer)
        # Both topics keyed by request id: with as many partitions on each, a costed
        # event's key hashes to the partition its response came from.
        responses = await self._producer.partitions_for(topics.RESPONSES)
        self._same_partitions = len(responses) == self._costed.partitions
        if self._checkpoints.partitions < len(responses):
            raise RuntimeError(
                f"{topics.CHECKPOINTS} has {self._checkpoints.partitions} partitions and "
                f"{topics.RESPONSES} {len(responses)}: it needs at least as many (one per "
                "responses partition)"
            )
        self._consumer = group_consumer(settings, topics.STREAM_GROUP)
        self._consumer.subscribe(
            [topics.RESPONSES], listener=Listener(self.revoked, self._assigned, self.crash)
        )
        await self._consumer.start()
        self._loop_task = asyncio.create_task(self._consume())

    async def on_stop(self) -> None:
        self._stopping = True
        if self._loop_task is not None:
            # The batch in hand is finished and committed; a loop stuck in a fetch that
            # waits for a rebalance that never ends is cancelled (nothing to commit).
            _, pending = await asyncio.wait({self._loop_task}, timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._busy:  # the batch in hand is committed before partitions go
            try:
                await self._commit()
            finally:
                self.positions.give_up(tp.partition for tp in revoked)
                # Last, with no wait after it: a batch fetched before now is dropped,
                # even one handed over while this ran (from positions given up).
                self._generation += 1

    async def _assigned(self, assigned: list[TopicPartition]) -> None:
        await self.take_over(assigned)
        self.assigned.set()

    async def take_over(self, assigned: Iterable[TopicPartition]) -> None:
        """Start on the partitions the group gave this worker, each where its latest
        checkpoint says (stream/checkpoints.py)."""
        consumer = self._consumer
        assert consumer is not None
        tps = {tp.partition: tp for tp in assigned}
        async with self._busy:
            starts = await self.positions.take_over(tps)
            for partition, tp in tps.items():
                if partition not in starts:  # no checkpoint: from the committed offset
                    starts[partition] = await consumer.committed(tp) or 0
            # Every partition sought, those without a checkpoint too: the group assigned
            # them before this ran, and records fetched meanwhile are dropped below.
            for partition, offset in starts.items():
                consumer.seek(tps[partition], offset)
            # Last, with no wait after it: a batch handed over while this ran was fetched
            # from the committed offsets, not from where the partitions were sought.
            self._generation += 1

    async def _commit(self) -> None:
        """Checkpoint, then commit what was processed (priced, counted, delivered) since
        the last commit."""
        if self._consumer is not None and self._checkpoints is not None:
            await self.positions.write(self._checkpoints)
        if self._done and self._consumer is not None:
            done, self._done = self._done, {}
            try:
                await self._consumer.commit(
                    {tp: OffsetAndMetadata(offset, "") for tp, offset in done.items()}
                )
            except CommitFailedError as exc:
                # The group moved on without this member: the partitions' new owner
                # reads these events again (pricing and budgets take them once).
                log.warning("offsets not committed (%s); their events are read again", exc)
        self._commit_at = time.monotonic() + COMMIT_EVERY_S

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping:
                fetched: Fetched = await consumer.getmany(timeout_ms=POLL_MS, max_records=BATCH)
                # Read once the records are in hand: a fetch that waited out a rebalance
                # returns records of the new assignment, which are this worker's to count.
                generation = self._generation
                async with self._busy:
                    # A batch fetched before a rebalance is dropped: its partitions' new
                    # owners read it again from the committed offsets.
                    if fetched and generation == self._generation:
                        await self._process(fetched)
                        for tp, records in fetched.items():
                            following = records[-1].offset + 1
                            self._done[tp] = self.positions.processed(tp.partition, following)
                    else:
                        for step in self.steps:  # windows close without traffic
                            await step.flush()
                    if time.monotonic() >= self._commit_at:
                        await self._commit()
            async with self._busy:
                await self._commit()
        except Exception as exc:
            # The worker stops (and `llmtap up` with it): a stage that cannot go on
            # must not leave a worker that looks alive and counts nothing.
            log.exception("cost stage failed")
            await self.crash(exc)

    async def _process(self, fetched: Fetched) -> None:
        now = utcnow()
        steps = self.steps
        same = self._same_partitions
        records: list[Record] = []
        for tp, batch in fetched.items():
            partition = tp.partition if same else None
            # Read again after a takeover: the old owner delivered its costed events.
            below = self.positions.counted_below(tp.partition)
            for message in batch:
                try:
                    event = wire.decode_response(message.value or b"")
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    log.error("undecodable response event skipped: %s", exc)
                    continue
                out = price_wire(event, self._catalog)
                if out.unpriced and event.model not in self._warned:
                    self._warned.add(event.model)
                    log.warning("no price for model %r (provider %s)", event.model, event.provider)
                if message.offset >= below:
                    key = topics.partition_key(event.request_id)
                    records.append((key, wire.encode(out), partition))
                position = (tp.partition, message.offset)
                for step in steps:
                    step.add(out, position, now)
        sent = await self._send(records)
        for step in steps:
            await step.flush()
        # Delivered, not just queued, before the batch's offsets are committed: a
        # worker killed after the commit must not take costed events with it.
        await self._delivered(records, sent)

    async def _send(self, records: Sequence[Record]) -> list[asyncio.Future[Any]]:
        costed = self._costed
        assert costed is not None
        for key, value, partition in records:
            try:
                costed.add(key, value, partition)
            except ValueError as exc:  # too large for Kafka: no retry can send it
                log.error("costed event not sent, %s (its response is counted)", exc)
        return await costed.send()

    async def _delivered(self, records: Sequence[Record], sent: list[asyncio.Future[Any]]) -> None:
        """Wait for ``sent``; while the broker refuses, send ``records`` again (the
        costed ids are derived, so a record delivered twice is one event downstream)."""
        for backoff in (*RESEND_BACKOFF_S, None):
            try:
                await asyncio.gather(*sent)
                return
            except KafkaError as exc:
                if backoff is None or self._stopping:
                    raise
                log.warning("costed events not delivered (%s); again in %ss", exc, backoff)
                await asyncio.sleep(backoff)
                sent = await self._send(records)
