"""The ClickHouse writer: costed events from Kafka into the ``calls`` table, and
closed windows into the ``windows`` table.

A pipeline of small steps, commit always last:

1. decode: bytes -> costed events (msgspec, held to the contract by tests/test_wire.py)
   or a dead letter (raw bytes kept) if it cannot be;
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
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import astuple
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError

from llmtap import topics
from llmtap.config import Settings
from sinks.clickhouse.decode import Batch as Batch  # re-exported: tests and tools build batches
from sinks.clickhouse.decode import DeadLetter as DeadLetter
from sinks.clickhouse.decode import Record, decode_batch, ready, start_decode_process
from sinks.clickhouse.rows import (
    CALLS_COLUMNS,
    DEAD_LETTER_COLUMNS,
    EVENT_ID,
    TS_END,
    WINDOW_ID,
    WINDOW_START,
    WINDOWS_COLUMNS,
    call_columns,
    from_ticks,
    window_row,
)
from sinks.consumer import consume_forever, sink_consumer
from sql.store import Store, render

log = logging.getLogger(__name__)


def new_windows(store: Store, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ``windows`` rows of a batch not stored yet, each once (looked up by id
    within the rows' window starts)."""
    unique = list({row[WINDOW_ID]: row for row in rows}.values())
    if not unique:
        return unique
    slack = timedelta(seconds=1)
    stored = store.rows(
        render("existing_window_ids"),
        {
            "ts_from": min(row[WINDOW_START] for row in unique) - slack,
            "ts_to": max(row[WINDOW_START] for row in unique) + slack,
            "event_ids": [row[WINDOW_ID] for row in unique],
        },
    )
    known = {r["event_id"] for r in stored}
    return [row for row in unique if row[WINDOW_ID] not in known]


# Money goes as the exact decimal text the columns hold; ClickHouse parses it into
# Decimal(18, 9) (clickhouse-connect would scale each value in Python: ~1 us apiece).
MONEY_AS_TEXT = {name: "Nullable(String)" for name in CALLS_COLUMNS if name.startswith("cost_")}

ID_PREFIX = 8  # hex digits of an event id the duplicate check sends (existing_call_ids.sql)


def new_calls(store: Store, columns: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ``calls`` columns of a batch without the events stored already, each event
    once (what :func:`new_windows` does for rows, without turning columns into rows)."""
    if not columns:
        return columns
    ids = columns[EVENT_ID]
    last = {event_id: i for i, event_id in enumerate(ids)}  # the last copy of each
    ts_end = columns[TS_END]
    slack = 1000  # ms
    stored = store.rows(
        render("existing_call_ids"),
        {
            "ts_from": from_ticks(min(ts_end) - slack),
            "ts_to": from_ticks(max(ts_end) + slack),
            "id_prefixes": ",".join(event_id[:ID_PREFIX] for event_id in last),
        },
    )
    for r in stored:
        last.pop(str(r["event_id"]), None)
    if len(last) == len(ids):
        return columns  # the usual case: nothing to drop
    keep = sorted(last.values())
    return [tuple(column[i] for i in keep) for column in columns] if keep else []


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
    calls = batch.calls
    if batch.events:
        extra = call_columns(batch.events)
        calls = [a + b for a, b in zip(calls, extra, strict=True)] if calls else extra
    fresh = new_calls(store, calls)
    if fresh:
        store.insert_columns("calls", fresh, CALLS_COLUMNS, send_as=MONEY_AS_TEXT)
    if batch.windows:
        windows = new_windows(store, [window_row(w) for w in batch.windows])
        if windows:
            store.insert("windows", windows, WINDOWS_COLUMNS)
    letters = new_dead_letters(store, batch.dead_letters) if batch.dead_letters else []
    if letters:
        store.insert("dead_letters", [astuple(d) for d in letters], DEAD_LETTER_COLUMNS)
        log.error("%d undecodable messages sent to dead_letters", len(letters))
    return len(fresh[0]) if fresh else 0


class ClickHouseWriter:
    """Kafka -> ClickHouse. ``sink_decode_processes`` > 0 decodes in that many separate
    processes (spawned, so a forked copy of this process's threads and chDB engine is
    never made), in parallel with reading and inserting here; 0 (the default) decodes
    in this process, on the event loop. A decode process takes the GIL-bound decode off
    this process but costs more CPU in all (plain values to build and pickle), so it is
    opt-in, for a store with a core to spare (bench/results/ingest.md)."""

    def __init__(self, settings: Settings, store: Store, group_id: str = topics.SINK_GROUP) -> None:
        self._settings = settings
        self._store = store
        self._group_id = group_id
        self._decode_processes = settings.sink_decode_processes
        self._pool: ProcessPoolExecutor | None = None
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
        try:
            await self._start_pool()
            await consume_forever(self._consumer, self._consume, "ClickHouse writer")
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    async def _start_pool(self) -> None:
        if self._decode_processes <= 0:
            return
        self._pool = ProcessPoolExecutor(
            self._decode_processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=start_decode_process,
        )
        loop = asyncio.get_running_loop()
        # Start them (imports and all) before the first read.
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, ready) for _ in range(self._decode_processes))
        )

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        """Read a batch while the previous one is decoded and written: writes and
        commits strictly in order, and no reading ahead of a failing store. A batch's
        decoding starts as soon as it is read, so it overlaps the previous write."""
        previous: asyncio.Task[None] | None = None
        decoding: asyncio.Future[Batch] | None = None
        try:
            while True:
                records, offsets = await self._read_batch(consumer)
                if records:
                    decoding = asyncio.ensure_future(self._decode(records, offsets))
                if previous is not None:
                    await previous
                    previous = None
                if decoding is not None:
                    previous = asyncio.create_task(self._write_and_commit(consumer, decoding))
                    decoding = None
        finally:
            for task in (decoding, previous):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _read_batch(
        self, consumer: AIOKafkaConsumer
    ) -> tuple[list[Record], dict[TopicPartition, int]]:
        """Up to ``sink_batch_rows`` messages, or what arrived within ``sink_batch_seconds``
        of the first one; none after ``sink_batch_seconds`` with nothing to read. Also
        the offsets they cover: for each partition, the next offset to read."""
        loop = asyncio.get_running_loop()
        max_rows = self._settings.sink_batch_rows
        max_age = self._settings.sink_batch_seconds
        records: list[Record] = []
        offsets: dict[TopicPartition, int] = {}
        first_at: float | None = None
        while len(records) < max_rows:
            wait = max_age if first_at is None else first_at + max_age - loop.time()
            if wait <= 0:
                break
            fetched = await consumer.getmany(
                timeout_ms=max(1, int(wait * 1000)), max_records=max_rows - len(records)
            )
            for tp, partition_records in fetched.items():
                for record in partition_records:
                    records.append(
                        (record.topic, record.partition, record.offset, record.value or b"")
                    )
                offsets[tp] = partition_records[-1].offset + 1
            if not records:
                break  # idle: let the caller look at the write in flight
            if first_at is None:
                first_at = loop.time()
                if self.first_read_at is None:
                    self.first_read_at = first_at
        return records, offsets

    async def _decode(self, records: list[Record], offsets: dict[TopicPartition, int]) -> Batch:
        """Decode in a decode process (or here, without one)."""
        batch: Batch | None = None
        if self._pool is not None:
            try:
                batch = await asyncio.get_running_loop().run_in_executor(
                    self._pool, decode_batch, records
                )
            except BrokenProcessPool:
                # A decode process died (killed?): decode this batch here, start new ones.
                log.error("a decode process died; starting new ones")
                self._pool.shutdown(wait=False)
                self._pool = None
                await self._start_pool()
        if batch is None:
            batch = decode_batch(records)
        batch.offsets = offsets
        return batch

    async def _write_and_commit(
        self, consumer: AIOKafkaConsumer, decoding: asyncio.Future[Batch]
    ) -> None:
        batch = await decoding
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
