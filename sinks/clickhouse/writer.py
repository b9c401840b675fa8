"""The ClickHouse writer: costed events from Kafka into the ``calls`` table, and
closed windows into the ``windows`` table.

A pipeline of small steps, commit always last:

1. decode: bytes -> CostedEvent, or a dead letter (raw bytes kept) if it cannot be;
2. batch: until ``sink_batch_rows`` rows or ``sink_batch_seconds`` old, carrying the
   offsets of what it holds;
3. write: drop rows whose event_id is already stored (a replay after a crash between
   write and commit, or a duplicate from upstream), then one columnar insert; on
   failure retry with backoff and do not read further (Kafka keeps the data);
4. commit: the batch's offsets, only after its write succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import astuple, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError
from pydantic import ValidationError

from llmtap import topics
from llmtap.config import Settings
from llmtap.events import CostedEvent, WindowEvent, utcnow
from sinks.clickhouse.rows import (
    CALLS_COLUMNS,
    DEAD_LETTER_COLUMNS,
    EVENT_ID,
    TS_END,
    WINDOW_ID,
    WINDOW_START,
    WINDOWS_COLUMNS,
    call_row,
    window_row,
)
from sinks.consumer import consume_forever, sink_consumer
from sql.store import Store, render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be decoded, kept whole. Fields in DEAD_LETTER_COLUMNS order."""

    ts: datetime
    topic: str
    partition: int
    offset: int
    raw: bytes
    error: str


@dataclass
class Batch:
    """What the writer holds between reads and one write, with the offsets it covers."""

    events: list[CostedEvent] = field(default_factory=list)
    windows: list[WindowEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.events) + len(self.windows) + len(self.dead_letters)

    def add(self, record: ConsumerRecord[bytes, bytes]) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self.offsets[tp] = record.offset + 1  # the next offset to read
        raw = record.value or b""
        try:
            if record.topic == topics.WINDOWS:
                self.windows.append(WindowEvent.model_validate_json(raw))
            else:
                self.events.append(CostedEvent.model_validate_json(raw))
        except ValidationError as exc:
            self.dead_letters.append(
                DeadLetter(utcnow(), record.topic, record.partition, record.offset, raw, str(exc))
            )


def new_rows(
    store: Store,
    rows: list[tuple[Any, ...]],
    *,
    query: str = "existing_event_ids",
    id_at: int = EVENT_ID,
    ts_at: int = TS_END,
) -> list[tuple[Any, ...]]:
    """The rows of a batch whose event is not stored yet, each once. ``query`` finds
    the stored ids among those given, within the rows' time range (``ts_at``)."""
    unique = list({row[id_at]: row for row in rows}.values())
    if not unique:
        return unique
    slack = timedelta(seconds=1)
    stored = store.rows(
        render(query),
        {
            "ts_from": min(row[ts_at] for row in unique) - slack,
            "ts_to": max(row[ts_at] for row in unique) + slack,
            "event_ids": [row[id_at] for row in unique],
        },
    )
    known = {r["event_id"] for r in stored}
    return [row for row in unique if row[id_at] not in known]


def new_dead_letters(store: Store, letters: list[DeadLetter]) -> list[DeadLetter]:
    """The dead letters of a batch not stored yet (keyed by topic, partition, offset)."""
    fresh: list[DeadLetter] = []
    for topic in {d.topic for d in letters}:
        mine = [d for d in letters if d.topic == topic]
        rows = store.rows(
            render("existing_dead_letters"),
            {
                "topic": topic,
                "offset_from": min(d.offset for d in mine),
                "offset_to": max(d.offset for d in mine),
            },
        )
        stored = {(r["partition"], r["offset"]) for r in rows}
        fresh.extend(d for d in mine if (d.partition, d.offset) not in stored)
    return fresh


def write_batch(store: Store, batch: Batch) -> int:
    """Write a batch idempotently; return how many call rows were inserted."""
    fresh = new_rows(store, [call_row(e) for e in batch.events])
    if fresh:
        store.insert("calls", fresh, CALLS_COLUMNS)
    if batch.windows:
        windows = new_rows(
            store,
            [window_row(w) for w in batch.windows],
            query="existing_window_ids",
            id_at=WINDOW_ID,
            ts_at=WINDOW_START,
        )
        if windows:
            store.insert("windows", windows, WINDOWS_COLUMNS)
    letters = new_dead_letters(store, batch.dead_letters) if batch.dead_letters else []
    if letters:
        store.insert("dead_letters", [astuple(d) for d in letters], DEAD_LETTER_COLUMNS)
        log.error("%d undecodable messages sent to dead_letters", len(letters))
    return len(fresh)


class ClickHouseWriter:
    def __init__(self, settings: Settings, store: Store, group_id: str = topics.SINK_GROUP) -> None:
        self._settings = settings
        self._store = store
        self._group_id = group_id
        self.rows_written = 0
        self.batches_written = 0
        self.write_failures = 0
        self.first_read_at: float | None = None  # loop time of the first message read

    def _consumer(self) -> AIOKafkaConsumer:
        return sink_consumer(
            [topics.COSTED, topics.WINDOWS],
            self._settings.kafka_bootstrap,
            self._group_id,
            max_poll_records=self._settings.sink_batch_rows,
        )

    async def run(self) -> None:
        """Consume until cancelled; reconnect if the broker goes away."""
        await consume_forever(self._consumer, self._consume, "ClickHouse writer")

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        """Read a batch while the previous one is written: at most two batches held,
        writes and commits strictly in order, and no reading ahead of a failing store."""
        previous: asyncio.Task[None] | None = None
        try:
            while True:
                batch = await self._read_batch(consumer)
                if previous is not None:
                    await previous
                    previous = None
                if len(batch):
                    previous = asyncio.create_task(self._write_and_commit(consumer, batch))
        finally:
            if previous is not None and not previous.done():
                previous.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await previous

    async def _read_batch(self, consumer: AIOKafkaConsumer) -> Batch:
        """Up to ``sink_batch_rows`` messages, or what arrived within ``sink_batch_seconds``
        of the first one; empty after ``sink_batch_seconds`` with nothing to read."""
        loop = asyncio.get_running_loop()
        max_rows = self._settings.sink_batch_rows
        max_age = self._settings.sink_batch_seconds
        batch = Batch()
        first_at: float | None = None
        while len(batch) < max_rows:
            wait = max_age if first_at is None else first_at + max_age - loop.time()
            if wait <= 0:
                break
            records = await consumer.getmany(
                timeout_ms=max(1, int(wait * 1000)), max_records=max_rows - len(batch)
            )
            for partition_records in records.values():
                for record in partition_records:
                    batch.add(record)
            if not len(batch):
                return batch  # idle: let the caller look at the write in flight
            if first_at is None:
                first_at = loop.time()
                if self.first_read_at is None:
                    self.first_read_at = first_at
        return batch

    async def _write_and_commit(self, consumer: AIOKafkaConsumer, batch: Batch) -> None:
        await self._write(batch)
        try:
            await consumer.commit(batch.offsets)
        except CommitFailedError as exc:
            # Partitions moved to another writer: it re-reads them, and the
            # duplicate check keeps the rows we wrote from being written twice.
            log.warning("commit after write failed (%s)", exc)

    async def _write(self, batch: Batch) -> None:
        backoff = 0.5
        while True:
            try:
                written = await asyncio.to_thread(write_batch, self._store, batch)
            except Exception as exc:
                self.write_failures += 1
                log.error("ClickHouse write failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.rows_written += written
            self.batches_written += 1
            return
