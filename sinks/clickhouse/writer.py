"""The ClickHouse writer: costed events from Kafka into the ``calls`` table, and
closed windows into the ``windows`` table.

A pipeline of small steps, commit always last:

1. batch: until ``sink_batch_rows`` messages or ``sink_batch_seconds`` old, carrying
   the offsets of what it holds, in partition and offset order;
2. decode: bytes -> the body of the ``calls`` insert (msgspec, held to the contract by
   tests/test_wire.py; ClickHouse's Native format) and windows, or a dead letter (raw
   bytes kept) for a message that is not a valid event (sinks/clickhouse/decode.py);
3. decide the insert into ``calls``: the rows whose event_id is not stored yet (a
   replay after a crash between write and commit, or a duplicate from upstream), and
   record it with its offset ranges (sinks/clickhouse/replay.py);
4. write: that insert, with a token that makes a repeat exact, then windows and dead
   letters; on failure retry the same insert with backoff and read no further (Kafka
   keeps the data) (sinks/clickhouse/write.py);
5. commit: the batch's offsets, only after its write succeeded.

When given partitions, before reading them (they are paused until then), the writer
repeats the recorded inserts its group has not committed (one cut short by a crash may
have filled ``calls`` and not every view on it). A stop ends a repeat under way (a
store still failing): nothing is committed past its insert, so the partitions' next
owner repeats it. A handover that raises (at either end of a rebalance) fails the
writer: ``run`` raises, and the store process exits (sinks/app.py) to be started again,
rather than read nothing more.

When partitions are taken away (a rebalance, which waits for it), the writer first
lets the batch being written finish, insert and commit, for up to ``REVOKE_WAIT_S``,
and drops every message read before, written or not: the partitions' next owner (this
writer again, maybe) reads them from the last commit. Its duplicate check would
otherwise race this writer's insert: both checked, neither found the other's rows,
both inserted. A batch still unwritten then is given up: its insert into ``calls`` is
recorded before the partitions move or never (the next owner repeats it, with the
same token, or decides its own), and it writes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from llmtap.config import Settings
from llmtap.heartbeats import heartbeat_meanwhile
from sinks.clickhouse import replay
from sinks.clickhouse.decode import Batch, Run, decode_batch, decode_pool, ready
from sinks.clickhouse.write import (
    CallsInsert,
    calls_types,
    insert_calls,
    prepare_calls,
    write_others,
)
from sinks.consumer import consume_forever, sink_consumer
from sql.store import Store

log = logging.getLogger(__name__)

# The longest a revocation waits for the batch being written. The writer's consumer
# gives a rebalance its session's 10 s to rejoin in (aiokafka's default), and Kafka
# drops a member that takes longer (Tansu waits): this leaves room for the heartbeat
# that tells of the rebalance (1 s) and for the join.
REVOKE_WAIT_S = 5.0


class _GivenUp(Exception):
    """The batch's partitions moved on while it was written; it writes nothing more."""


class HandoverFailed(Exception):
    """Giving partitions up or taking them over raised: the writer cannot go on (the
    partitions given would stay paused, read by no one)."""


class ClickHouseWriter:
    """Kafka -> ClickHouse. ``sink_decode_processes`` > 0 (default 2) decodes in that
    many separate processes (spawned, so a forked copy of this process's threads and
    chDB engine is never made), in parallel with reading and inserting here; 0 decodes
    in this process, on the event loop. A decode process takes the GIL-bound decode and
    the encoding of the insert off this process at the cost of a little more CPU in all
    (the records to pickle). A batch is decoded as soon as it is read, so with two the
    next batch's decode does not wait for the one before it, which the write still
    waits for: writes and commits stay in the order read (bench/results/ingest.md
    measures 2, 1 and 0 side by side)."""

    POOL_RETRY_S = 60.0  # after decode processes could not be started, or died young
    POOL_START_TIMEOUT_S = 60.0

    def __init__(self, settings: Settings, store: Store, group_id: str | None = None) -> None:
        self._settings = settings
        self._store = store
        self._group_id = group_id or settings.kafka.names.sink_group
        self._decode_processes = settings.sink_decode_processes
        self._pool: ProcessPoolExecutor | None = None
        self._pool_retry_at = 0.0  # loop time: when to try starting decode processes again
        self._pool_started_at = 0.0  # loop time: when the running ones were started
        self._pool_starting = asyncio.Lock()  # two batches decoded at once start one pool
        self._calls_types: tuple[str, ...] | None = None  # read once, at the first batch
        self.rows_written = 0
        self.batches_written = 0
        self.write_failures = 0
        self._uncommitted = replay.Uncommitted()  # recorded inserts not yet committed past
        self.inserts_repeated = 0  # recorded, uncommitted inserts made again
        self.inserts_lost = 0  # ... that could not be: their messages gone
        self.dead_letters = 0  # messages that could not be decoded, kept aside
        self.last_written_at: float | None = None  # Unix time of the last batch written
        self.first_read_at: float | None = None  # loop time of the first message read
        self.batches_given_up = 0  # still unwritten when a revocation stopped waiting
        self._epoch = 0  # revocations so far: a batch read before the last one is dropped
        self._given_up = -1  # batches of epochs up to this one write nothing more
        self._handover = threading.Lock()  # taken to give up, and to record or write
        self._writing: asyncio.Task[None] | None = None  # the batch being written
        self._listener: _Handover | None = None  # that of the consumer in use
        self._running: asyncio.Task[None] | None = None  # run()'s task
        self._failed: tuple[str, BaseException] | None = None  # a handover that raised

    def _consumer(self) -> AIOKafkaConsumer:
        handover = self._listener = _Handover(self)
        handover.consumer = sink_consumer(
            [self._settings.kafka.names.costed, self._settings.kafka.names.windows],
            self._settings.kafka,
            self._group_id,
            "store-writer",
            max_poll_records=self._settings.sink_batch_rows,
            listener=handover,
        )
        return handover.consumer

    async def repeat_uncommitted(self, assigned: set[TopicPartition]) -> None:
        """Repeat the recorded inserts not committed on ``assigned`` partitions, before
        reading them (sinks/clickhouse/replay.py); retried while the store fails."""
        backoff = 0.5
        while True:
            try:
                repeated, lost = await replay.repeat_uncommitted(
                    self._store, self._settings.kafka, self._group_id, assigned
                )
            except Exception as exc:
                log.error("repeating uncommitted inserts failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            for r in repeated:  # committed past by the batches that follow
                self._uncommitted.add(r.token, r.ranges)
            self.inserts_repeated += len(repeated)
            self.inserts_lost += lost
            return

    async def revoke(self, partitions: list[TopicPartition]) -> None:
        """Partitions taken away (every one this writer held, as aiokafka rebalances):
        drop what was read before, let the batch being written finish (insert and
        commit) or give it up after ``REVOKE_WAIT_S``; then what is committed there is
        no longer ours to record."""
        # aiokafka began the reassignment in this step: getmany returns nothing more of
        # the old assignment, nor of the new one before it is made.
        self._epoch += 1
        read_before = self._epoch - 1
        writing = self._writing
        if writing is not None and not writing.done():
            log.info(
                "partitions revoked: waiting up to %.0f s for the batch being written",
                REVOKE_WAIT_S,
            )
            await asyncio.wait({writing}, timeout=REVOKE_WAIT_S)
            if not writing.done():
                # Once no recording or write is under way (one is a few ms), none starts.
                await asyncio.to_thread(self._give_up, read_before)
            if writing.cancel():
                self.batches_given_up += 1
                log.warning(
                    "partitions revoked: the batch being written was given up after %.0f s;"
                    " its messages are read again from the last commit",
                    REVOKE_WAIT_S,
                )
        self._uncommitted.forget(partitions)

    def _give_up(self, epoch: int) -> None:
        with self._handover:
            self._given_up = epoch

    def _still_ours(self, batch: Batch) -> None:
        """Called holding ``_handover``: raise if the batch was given up."""
        if batch.epoch <= self._given_up:
            raise _GivenUp

    async def run(self) -> None:
        """Consume until cancelled; reconnect if the broker goes away. Raises
        HandoverFailed once a handover raised (:meth:`fail`)."""
        self._running = asyncio.current_task()
        try:
            await self._start_pool_or_decode_here()
            await consume_forever(self._consumer, self._consume, "ClickHouse writer", self._closing)
        except asyncio.CancelledError:
            if self._failed is None:
                raise
            what, exc = self._failed
            raise HandoverFailed(f"{what} failed: {exc!r}") from exc
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def fail(self, what: str, exc: BaseException) -> None:
        """A handover raised: stop, ``run`` raising (aiokafka would log it and go on)."""
        log.critical("%s failed (%r): the writer stops", what, exc, exc_info=exc)
        if self._failed is None:
            self._failed = (what, exc)
            if self._running is not None:
                self._running.cancel()

    def _closing(self) -> None:
        """The consumer is about to stop: a repeat its assignment callback makes ends."""
        if self._listener is not None:
            self._listener.close()

    async def _start_pool(self) -> None:
        """Start the decode processes (imports and all; the pool's first ones have run
        ``ready``, the pool starts the rest as work comes), or raise, leaving none."""
        pool = decode_pool(self._decode_processes)
        loop = asyncio.get_running_loop()
        started: list[asyncio.Future[bool]] = []
        try:
            async with asyncio.timeout(self.POOL_START_TIMEOUT_S):  # a start that hangs
                started += (
                    loop.run_in_executor(pool, ready) for _ in range(self._decode_processes)
                )
                await asyncio.gather(*started)
        except BaseException:
            for future in started:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        self._pool = pool
        self._pool_started_at = loop.time()

    async def _start_pool_or_decode_here(self) -> None:
        """Start the decode processes if there are to be some and none run; if they
        cannot be started (one killed as it starts, out of processes or memory...), the
        store process decodes, as with none, and tries again ``POOL_RETRY_S`` later."""
        loop = asyncio.get_running_loop()
        async with self._pool_starting:
            if (
                self._decode_processes <= 0
                or self._pool is not None
                or loop.time() < self._pool_retry_at
            ):
                return
            try:
                await self._start_pool()
            except Exception as exc:
                self._pool_retry_at = loop.time() + self.POOL_RETRY_S
                log.error(
                    "decode processes could not be started (%r): decoding in this "
                    "process, trying again in %gs",
                    exc,
                    self.POOL_RETRY_S,
                )

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        """Read a batch while the previous one is decoded and written: writes and
        commits strictly in order, and no reading ahead of a failing store. A batch's
        decoding starts as soon as it is read, so it overlaps the previous write."""
        previous: asyncio.Task[None] | None = None
        decoding: asyncio.Future[Batch] | None = None
        try:
            while True:
                runs, spans, epoch = await self._read_batch(consumer)
                if runs:
                    decoding = asyncio.ensure_future(self._decode(runs, spans, epoch))
                if previous is not None:
                    await asyncio.wait({previous})
                    if not previous.cancelled():  # cancelled: given up at a revocation
                        previous.result()
                    previous = None
                if decoding is not None:
                    previous = asyncio.create_task(self._write_and_commit(consumer, decoding))
                    self._writing = previous
                    decoding = None
        finally:
            for task in (decoding, previous):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _read_batch(
        self, consumer: AIOKafkaConsumer
    ) -> tuple[list[Run], dict[TopicPartition, tuple[int, int]], int]:
        """Up to ``sink_batch_rows`` messages, or what arrived within ``sink_batch_seconds``
        of the first one; none after ``sink_batch_seconds`` with nothing to read; a run
        of each partition read, in topic and partition order. Also the offsets they
        span: for each partition, the first and the next to read; and
        the revocations before they were read. Those read before a revocation met
        during the read are dropped: a getmany that returns after it (aiokafka returns
        nothing while a reassignment is under way) returns the new assignment's."""
        loop = asyncio.get_running_loop()
        max_rows = self._settings.sink_batch_rows
        max_age = self._settings.sink_batch_seconds
        runs: dict[TopicPartition, Run] = {}
        read = 0
        spans: dict[TopicPartition, tuple[int, int]] = {}
        first_at: float | None = None
        epoch = self._epoch
        while read < max_rows:
            wait = max_age if first_at is None else first_at + max_age - loop.time()
            if wait <= 0:
                break
            fetched = await consumer.getmany(
                timeout_ms=max(1, int(wait * 1000)), max_records=max_rows - read
            )
            if epoch != self._epoch:
                runs, read, spans, first_at, epoch = {}, 0, {}, None, self._epoch
            for tp, partition_records in fetched.items():
                run = runs.get(tp)
                if run is None:
                    run = runs[tp] = Run(tp.topic, tp.partition, [], [])
                run.offsets.extend([record.offset for record in partition_records])
                run.values.extend([record.value or b"" for record in partition_records])
                read += len(partition_records)
                first = spans[tp][0] if tp in spans else partition_records[0].offset
                spans[tp] = (first, partition_records[-1].offset + 1)
            if not read:
                break  # idle: let the caller look at the write in flight
            if first_at is None:
                first_at = loop.time()
                if self.first_read_at is None:
                    self.first_read_at = first_at
        return [runs[tp] for tp in sorted(runs)], spans, epoch  # as a replay reads them

    async def _decode(
        self, runs: list[Run], spans: dict[TopicPartition, tuple[int, int]], epoch: int
    ) -> Batch:
        """Decode in a decode process (or here, without one), into the body of the
        ``calls`` insert."""
        types = await self._body_types()
        batch: Batch | None = None
        await self._start_pool_or_decode_here()  # none yet: they could not be started
        pool = self._pool
        if pool is not None:
            try:
                batch = await asyncio.get_running_loop().run_in_executor(
                    pool, decode_batch, runs, types
                )
            except BrokenProcessPool:
                # A decode process died (killed?): decode this batch here, start new ones.
                # Every batch the pool held fails alike; the first to tell replaces it.
                if self._pool is pool:
                    loop = asyncio.get_running_loop()
                    pool.shutdown(wait=False)
                    self._pool = None
                    if loop.time() - self._pool_started_at < self.POOL_RETRY_S:
                        # Died young (killed for its memory at every batch?): not again
                        # at once, and not at every batch.
                        self._pool_retry_at = loop.time() + self.POOL_RETRY_S
                    log.error(
                        "a decode process died; starting new ones%s",
                        ""
                        if loop.time() >= self._pool_retry_at
                        else f" in {self.POOL_RETRY_S:g}s, decoding in this process meanwhile",
                    )
                    await self._start_pool_or_decode_here()
        if batch is None:
            batch = decode_batch(runs, types)
        batch.source = runs
        batch.offsets = {tp: next_offset for tp, (_, next_offset) in spans.items()}
        batch.costed_ranges = replay.costed_ranges(spans)
        batch.epoch = epoch
        return batch

    async def _body_types(self) -> tuple[str, ...] | None:
        """The types the body of a ``calls`` insert is built with, read from the store
        once; None (decode into columns, the write builds the body) while it cannot
        say."""
        if self._calls_types is None:
            try:
                self._calls_types = await asyncio.to_thread(calls_types, self._store)
            except Exception as exc:
                log.warning("could not read the calls table's column types (%s)", exc)
        return self._calls_types

    async def _write_and_commit(
        self, consumer: AIOKafkaConsumer, decoding: asyncio.Future[Batch]
    ) -> None:
        batch = await decoding
        if batch.epoch != self._epoch:
            return  # read before a revocation: read again, by whoever holds it now
        try:
            await self._write(batch)
        except _GivenUp:  # a revocation stopped waiting for it: neither written nor committed
            self.batches_given_up += 1
            return
        committed = await self.commit(consumer, batch.offsets)
        if not committed:
            return
        done = self._uncommitted.commit(committed)
        if done:
            try:
                await asyncio.to_thread(replay.record_commits, self._store, self._group_id, done)
            except Exception as exc:  # asked again at the next commit
                self._uncommitted.keep(done)
                log.warning("could not record the commit of %d inserts (%s)", len(done), exc)

    async def commit(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Commit a written batch's ``offsets`` on the partitions the consumer still
        holds; return what was committed. Those a rebalance took away meanwhile are
        another writer's: it re-reads them from the group's last commit. Committing
        them was refused (aiokafka's IllegalStateError), and that tore the consumer
        down: the partitions it still held went uncommitted too, and it left the
        group and rejoined, a rebalance more."""
        held = consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in held}
        if len(mine) < len(offsets):
            gone = sorted(f"{tp.topic}-{tp.partition}" for tp in offsets.keys() - mine.keys())
            log.warning("partitions %s were taken away before their batch's commit", gone)
        if not mine:
            return {}
        try:
            await consumer.commit(mine)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced under the commit: the partitions' next owner re-reads
            # them, and the duplicate check keeps what we wrote from being written twice.
            log.warning("commit after write failed (%s)", exc)
            return {}
        return mine

    def _prepare(self, batch: Batch) -> CallsInsert:
        insert = prepare_calls(self._store, batch)
        if _recorded(insert, batch):
            with self._handover:  # recorded before its partitions move on, or never
                self._still_ours(batch)
                replay.record(self._store, self._group_id, insert, batch.costed_ranges)
        return insert

    def _write_others(self, batch: Batch) -> None:
        with self._handover:  # no check-then-insert racing the next owner's
            self._still_ours(batch)
            write_others(self._store, batch)

    async def _write(self, batch: Batch) -> None:
        """Write a batch, retrying until it is written: its insert into ``calls`` is
        decided (and recorded) once, then repeated as it is."""
        backoff = 0.5
        insert: CallsInsert | None = None
        while True:
            try:
                if insert is None:
                    insert = await asyncio.to_thread(self._prepare, batch)
                    if _recorded(insert, batch):  # here, on the loop that reads it
                        self._uncommitted.add(insert.token, batch.costed_ranges)
                written = await asyncio.to_thread(insert_calls, self._store, insert)
                await asyncio.to_thread(self._write_others, batch)
            except _GivenUp:
                raise
            except Exception as exc:
                self.write_failures += 1
                log.error("ClickHouse write failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.rows_written += written
            self.batches_written += 1
            self.dead_letters += len(batch.dead_letters)
            self.last_written_at = time.time()
            return


def _recorded(insert: CallsInsert, batch: Batch) -> bool:
    """Whether the batch's insert into ``calls`` is recorded (replay.record) before it
    is made: one with rows, from the costed topic."""
    return bool(insert.rows and batch.costed_ranges)


class _Handover(ConsumerRebalanceListener):  # type: ignore[misc]
    """Losing partitions, the writer first finishes (or gives up) the batch it writes;
    given partitions, it first repeats their uncommitted inserts. aiokafka waits for
    both before the rebalance goes on, but hands the partitions given out before the
    repeat is done: they are paused until then (``consumer``, the one listened to).
    aiokafka's stop waits for them too: closing the consumer ends a repeat. If either
    raises, the writer fails (aiokafka would log it and go on)."""

    def __init__(self, writer: ClickHouseWriter) -> None:
        self._writer = writer
        self.consumer: AIOKafkaConsumer | None = None
        self._closed = False
        self._repeating: asyncio.Task[None] | None = None

    def close(self) -> None:
        """The consumer is stopping: a repeat under way (a store failing, retried until
        it no longer does) ends, and none starts. Its partitions stay paused, nothing
        committed past the insert: their next owner repeats it."""
        self._closed = True
        if self._repeating is not None:
            self._repeating.cancel()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._guarded(self._writer.revoke(revoked), "giving partitions up")

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._guarded(self._take_over(assigned), "taking partitions over")

    async def _guarded(self, handover: Awaitable[None], what: str) -> None:
        try:
            await handover
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and self._closed:
                raise  # the stop's own
            self._writer.fail(what, exc)

    async def _take_over(self, assigned: list[TopicPartition]) -> None:
        assert self.consumer is not None
        self.consumer.pause(*assigned)  # before anything is fetched from them
        if self._closed:
            return
        # A repeat may take longer than the session (a broker slow to give its range
        # back, a store failing): expelled meanwhile, the writer would read on as owner.
        heartbeat_meanwhile(self.consumer, "store-writer")
        repeating = self._repeating = asyncio.create_task(
            self._writer.repeat_uncommitted(set(assigned))
        )
        try:
            await asyncio.wait({repeating})  # ended by close() too, not only by itself
        finally:
            repeating.cancel()  # this callback cancelled
            self._repeating = None
        if self._closed:
            return
        repeating.result()
        self.consumer.resume(*assigned)
