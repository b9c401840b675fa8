"""The cost stage: response events in, costed events out; and every costed event handed,
in the same pass, to the accounting steps (windows, budgets) the worker runs.

One read and one decode per call for the whole chain: pricing, windows and budgets
each read the same decoded event (bench/stream_throughput.py measured what re-reading
``llmtap.costed`` per stage cost). A step sees each event with its position on
``llmtap.responses`` (partition, offset), and its ``flush`` runs after every batch
and, without traffic, at every poll (the windows step closes windows there).

**Below Faust's per-event stream** (stream/agents/stage.py: the loop, commits and
handovers it shares with the spikes stage). It commits offsets itself, every second,
and only those of batches whose costed events were delivered and whose steps flushed
(budget states delivered). Events are read and written as the
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
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from llmtap import logs, topics, wire
from llmtap.batches import Batches
from llmtap.config import Settings
from llmtap.events import derived_id, utcnow
from llmtap.names import Names
from stream import checkpoints
from stream.agents.assignment import one_holder
from stream.agents.stage import Fetched, GroupStage
from stream.catalog import Catalog
from stream.pricing import missing_price, price_wire
from stream.rolls import Watermark

log = logging.getLogger(__name__)

RESEND_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)

Position = tuple[int, int]  # (partition, offset) on llmtap.responses
Record = tuple[bytes, bytes, int | None]  # a costed event's key, value and partition


class Step(Protocol):
    """One accounting stage fed with costed events (stream/agents/windows.py, budgets.py)."""

    async def start(self, producer: AIOKafkaProducer) -> None:
        """The stage's producer, started: for a step's own high-volume output."""
        ...

    async def taken(self, held: set[int]) -> None:
        """The partitions the group gave the worker, before any of them is read."""
        ...

    def add(self, event: wire.CostedEvent, position: Position, now: datetime) -> None: ...

    async def flush(self) -> None: ...

    async def stop(self) -> None:
        """The stage stopped: nothing more is added."""
        ...


class CostStage(GroupStage):
    """Prices ``llmtap.responses`` into ``llmtap.costed`` and feeds ``steps``."""

    client = "worker-costs"
    redone = "their events are read again (pricing and budgets take them once)"

    @staticmethod
    def reads(names: Names) -> tuple[str, str]:
        return names.responses, names.stream_group

    def __init__(self, settings: Settings, catalog: Catalog, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._catalog = catalog
        self.steps: list[Step] = []
        self.positions = checkpoints.Positions(settings.kafka)
        self.assigned = asyncio.Event()  # set once the group gave this worker partitions
        self._costed: Batches | None = None
        self._same_partitions = False
        self._checkpoints: Batches | None = None
        self._warned = logs.Once()  # what had no price, and its provider: logged
        # Read at each scrape of the worker's /metrics: costed events sent (a call read
        # again after a takeover, whose costed event the old owner sent, is not), and of
        # those, the unpriced (no price known for the model).
        self.costed = 0
        self.unpriced = 0
        self._partitions = 0  # of the responses topic
        # Steps that count every call or none (budgets: a state is the whole spend):
        # then one worker of the group holds every partition.
        self.whole = False
        self._one_holder = one_holder()
        # The next offset of each partition held whose events the steps have been
        # handed, and how far that reaches in time (stream/rolls.py): the budgets step
        # rolls no period past calls still unread.
        self.read: dict[int, int] = {}
        self._watermark = Watermark()

    async def on_start(self) -> None:
        producer = await self._start_producer(max_batch_size=1 << 20, linger_ms=0)
        self._costed = await Batches.of(producer, self.names.costed)
        self._checkpoints = await Batches.of(producer, self.names.checkpoints)
        for step in self.steps:
            await step.start(producer)
        # Both topics keyed by request id: with as many partitions on each, a costed
        # event's key hashes to the partition its response came from.
        responses = await producer.partitions_for(self.topic)
        self._partitions = len(responses)
        self._same_partitions = len(responses) == self._costed.partitions
        if self._checkpoints.partitions < len(responses):
            raise RuntimeError(
                f"{self.names.checkpoints} has {self._checkpoints.partitions} partitions "
                f"and {self.topic} {len(responses)}: it needs at least as many (one per "
                "responses partition)"
            )
        await self._start_consuming()

    async def on_stop(self) -> None:
        await super().on_stop()
        for step in self.steps:
            await step.stop()

    def assignors(self) -> Sequence[type[AbstractPartitionAssignor]]:
        # Only that one with budgets: a worker that offers round robin (without budgets,
        # or of an earlier llmtap) fails to join at once instead of counting a share.
        # (aiokafka 0.14 would also send a join request per assignment offered.)
        return (self._one_holder,) if self.whole else super().assignors()

    def gave_up(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        self.positions.give_up(tp.partition for tp in revoked)
        for tp in revoked:
            self.read.pop(tp.partition, None)
        self._watermark = Watermark()

    async def read_up_to(self) -> datetime | None:
        """The time up to which every event appended to the partitions held has been
        handed to the steps (None: not known yet). A snapshot of their end offsets is
        fetched when none is waited for; the stage reaching it moves the time on."""
        consumer, mark = self._consumer, self._watermark
        if consumer is None or not self.read:
            return None
        if not mark.waiting:
            at = utcnow()  # before the fetch: what was appended before it is below
            tps = [TopicPartition(self.topic, partition) for partition in self.read]
            try:
                ends = await consumer.end_offsets(tps)
            except KafkaError as exc:  # the broker unreachable: periods wait for it
                log.debug("end offsets not fetched (%s)", exc)
                ends = None
            if mark is not self._watermark:  # the partitions changed hands meanwhile
                return None
            if ends is None:
                return mark.at
            mark.taken(at, {tp.partition: offset for tp, offset in ends.items()})
        # The fetch answers' high watermarks: on Tansu an end offset may be inside the
        # last record batch (stream/rolls.py).
        high = {p: consumer.highwater(TopicPartition(self.topic, p)) for p in self.read}
        return mark.reached(self.read, high)

    async def take_over(self, assigned: Iterable[TopicPartition]) -> None:
        """Start on the partitions the group gave this worker, each where its latest
        checkpoint says (stream/checkpoints.py)."""
        consumer = self._consumer
        assert consumer is not None
        tps = {tp.partition: tp for tp in assigned}
        missing = sorted(set(range(self._partitions)) - tps.keys())
        if self.whole and tps and missing:
            log.error(
                "budgets counted on a share of the calls: another stream worker holds "
                "partitions %s of %s, and a budget's spend is kept by one worker, so each "
                "publishes its share as the whole and hard caps admit past their limits. "
                "Give every worker of the group the same budgets.",
                missing,
                self.topic,
            )
        async with self._busy:
            for step in self.steps:
                await step.taken(set(tps))
            starts = await self.positions.take_over(tps)
            for partition, tp in tps.items():
                if partition not in starts:  # no checkpoint: from the committed offset
                    starts[partition] = await consumer.committed(tp) or 0
            # Every partition sought, those without a checkpoint too: the group assigned
            # them before this ran, and records fetched meanwhile are dropped below.
            for partition, offset in starts.items():
                consumer.seek(tps[partition], offset)
            self.read = dict(starts)
            self._watermark = Watermark()
            # Last, with no wait after it: a batch handed over while this ran was fetched
            # from the committed offsets, not from where the partitions were sought.
            self._generation += 1
        self.assigned.set()

    async def _commit(self) -> None:
        """Checkpoint, then commit what was processed (priced, counted, delivered) since
        the last commit."""
        if self._consumer is not None and self._checkpoints is not None:
            await self.positions.write(self._checkpoints)
        await super()._commit()

    async def handle(self, fetched: Fetched) -> None:
        if not fetched:
            for step in self.steps:  # windows close without traffic
                await step.flush()
            return
        await self._process(fetched)
        for tp, records in fetched.items():
            following = records[-1].offset + 1
            self._done[tp] = self.positions.processed(tp.partition, following)
            self.read[tp.partition] = following

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
                    self.skipped += 1
                    continue
                try:
                    out = price_wire(event, self._catalog)
                except ArithmeticError as exc:  # more tokens than exact decimals price
                    log.error(
                        "call %s could not be priced (%r): cost unknown", event.request_id, exc
                    )
                    out = wire.CostedEvent(
                        event_id=derived_id(event.event_id, "costed"),
                        response=event,
                        cost=None,
                        unpriced=False,
                    )
                if out.unpriced:
                    self._unpriced(event, message.offset >= below)
                if message.offset >= below:
                    key = topics.partition_key(event.request_id)
                    records.append((key, wire.encode(out), partition))
                if not wire.countable(event.ts_start, event.ts_end):
                    # The steps' date arithmetic overflowed on it: the stage crashed,
                    # and again at every restart.
                    log.error(
                        "call %s timed %s to %s: not counted in windows or budgets",
                        event.request_id,
                        event.ts_start.isoformat(),
                        event.ts_end.isoformat(),
                    )
                    continue
                position = (tp.partition, message.offset)
                for step in steps:
                    step.add(out, position, now)
        self.costed += len(records)
        sent = await self._send(records)
        for step in steps:
            await step.flush()
        # Delivered, not just queued, before the batch's offsets are committed: a
        # worker killed after the commit must not take costed events with it.
        await self._delivered(records, sent)

    def _unpriced(self, event: wire.Response, sent: bool) -> None:
        """A call whose model has no price (or none for fast mode or the OpenAI service
        tier which served it, or an advisor model it consulted has none): counted if its
        costed event is sent here, and what has no price logged once."""
        self.unpriced += sent
        missing = missing_price(event, self._catalog)
        if self._warned.first((missing, event.provider)):
            log.warning("no price for %s (provider %s)", missing, event.provider)

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
