"""The spikes stage: closed windows in (``llmtap.windows``), spike alerts out (the
judging is in stream/detector.py and stream/spikes.py).

Like the cost stage, a service the worker runs beside its Faust app, reading whole
fetched batches with its own consumer in the spikes group: at the stream bench's
window rate, Faust's per-event stream (~70 µs a window) cost the worker a quarter of
its throughput (README, "Stream throughput"). Offsets are committed every second, and
only those of windows whose alerts the broker acknowledged. Alert ids are derived from
the rule, the series and the window, so a window judged again after a crash or a
rebalance raises the same alert, which the webhook stage and the store take once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition
from mode import Service

from llmtap import topics, wire
from llmtap.config import Settings
from llmtap.events import Alert, utcnow
from stream.agents.consumer import Listener, group_consumer
from stream.detector import Detector

log = logging.getLogger(__name__)

BATCH = 2000  # windows per fetched batch, at most
POLL_MS = 50  # how long a fetch waits for windows before the loop looks around
TICK_S = 1.0  # how often windows still waiting for shares are looked at again
COMMIT_EVERY_S = 1.0
STOP_TIMEOUT_S = 30.0

Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class _Head(msgspec.Struct):
    """The two fields of a window that say whether a rule looks at it."""

    size_s: int
    dimension: str


_decode_head = msgspec.json.Decoder(_Head).decode


def judged(detector: Detector, raw: bytes, now: datetime) -> list[Alert]:
    """Offer one window, as it came off the topic, to ``detector``; the alerts it
    completes. Most windows are of series no rule looks at: a glance at two fields
    (~1 µs) spares them the full decoding. An undecodable window is logged and passed
    over."""
    try:
        head = _decode_head(raw)
        if not detector.judges(head.size_s, head.dimension):
            return []
        window = wire.decode_window(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("undecodable window skipped: %s", exc)
        return []
    return detector.offer(window, now)


class SpikesStage(Service):
    """Judges ``llmtap.windows`` with ``detector`` (stream/warmup.py gives it the
    windows judged before a restart) and publishes the alerts to ``llmtap.alerts``."""

    def __init__(self, settings: Settings, detector: Detector, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self.detector = detector
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._busy = asyncio.Lock()  # held while a batch is judged and committed
        self._generation = 0  # moves when partitions go: batches fetched before are void
        self._done: dict[TopicPartition, int] = {}  # next offsets, judged, not committed
        self._commit_at = 0.0
        self._tick_at = 0.0
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap, acks="all", linger_ms=0
        )
        await self._producer.start()
        self._consumer = group_consumer(self._settings, topics.SPIKES_GROUP)
        self._consumer.subscribe(
            [topics.WINDOWS], listener=Listener(self._revoked, self._assigned, self.crash)
        )
        await self._consumer.start()
        self._loop_task = asyncio.create_task(self._consume())

    async def on_stop(self) -> None:
        self._stopping = True
        if self._loop_task is not None:
            _, pending = await asyncio.wait({self._loop_task}, timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._busy:  # the batch in hand is committed before partitions go
            try:
                await self._commit()
            finally:
                # A batch fetched before now is dropped: the partitions' owners read it
                # again from the committed offsets.
                self._generation += 1

    async def _assigned(self, assigned: list[TopicPartition]) -> None:
        """Nothing to set up: a partition is read from the group's committed offset."""

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping:
                fetched: Fetched = await consumer.getmany(timeout_ms=POLL_MS, max_records=BATCH)
                generation = self._generation
                async with self._busy:
                    now = utcnow()
                    raised: list[Alert] = []
                    if generation != self._generation:
                        fetched = {}
                    for records in fetched.values():
                        for record in records:
                            raised += judged(self.detector, record.value or b"", now)
                    if time.monotonic() >= self._tick_at:
                        raised += self.detector.tick(now)
                        self._tick_at = time.monotonic() + TICK_S
                    await self._publish(raised)
                    for tp, records in fetched.items():
                        self._done[tp] = records[-1].offset + 1
                    if time.monotonic() >= self._commit_at:
                        await self._commit()
            async with self._busy:
                await self._commit()
        except Exception as exc:
            # The worker stops (and `llmtap up` with it) rather than look alive and
            # judge nothing.
            log.exception("spikes stage failed")
            await self.crash(exc)

    async def _publish(self, raised: list[Alert]) -> None:
        """Send the alerts and wait until the broker has them (before their windows'
        offsets can be committed)."""
        producer = self._producer
        assert producer is not None
        sent = []
        for alert in raised:
            log.warning("%s", alert.message)
            value = alert.model_dump_json().encode()
            sent.append(await producer.send(topics.ALERTS, value, key=alert.event_id.bytes))
        await asyncio.gather(*sent)

    async def _commit(self) -> None:
        if self._done and self._consumer is not None:
            done, self._done = self._done, {}
            try:
                await self._consumer.commit(
                    {tp: OffsetAndMetadata(offset, "") for tp, offset in done.items()}
                )
            except CommitFailedError as exc:
                # The partitions' new owner judges these windows again (same alert ids).
                log.warning("offsets not committed (%s); their windows are judged again", exc)
        self._commit_at = time.monotonic() + COMMIT_EVERY_S
