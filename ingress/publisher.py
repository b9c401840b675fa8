"""Publishing events to Kafka without ever delaying, failing or losing a call's events.

Handlers call :meth:`EventPublisher.publish`, a plain function: it appends to a bounded
in-memory queue and returns. One background task does everything else; it owns the
aiokafka producer (connecting with backoff) and the on-disk spool (:mod:`ingress.spool`,
whose file I/O it runs in worker threads):

- broker healthy and spool empty: the queue goes straight to Kafka;
- broker down (a connect or a delivery failed), slow (a batch in flight longer than
  ``slow_after_s``), or the queue past its high-water mark (half its size): the queue
  is moved to the spool;
- while the spool holds anything, queued events wait behind it (in memory, or on disk
  when one of the above says so), so order is kept; when the broker is back the spool
  is replayed oldest segment first, each segment deleted once all of it was delivered,
  and then the queue is sent. A spool being replayed does not send the queue to disk by
  itself: with a broker answering in more than ``POLL_S``, it did, so every event went
  through the disk for good;
- on start, whatever a previous run (or a crash) left in the spool is replayed first;
- a segment that cannot be read is logged at ERROR, left on disk and passed over (what
  comes after it goes meanwhile), and read again after 1 s, the wait doubling up to
  ``SPOOL_READ_RETRY_MAX_S``;
- :meth:`stop` gives the broker ``drain_timeout`` seconds, then spools what is left;
- an event published with a ``delivered`` listener (a hard-capped call's response
  event: ingress/guards/budgets.py) is told the partition and offset it went to, once
  Kafka has it, also when it went through the spool in between.

A batch in flight from the queue when spooling starts keeps its place in line: the
spool reserves a segment ahead of what is spooled after it, filled with whatever part
of the batch then fails.

Counters, plain ints: ``published`` (delivered to Kafka, replays included),
``spooled`` (written to the spool), ``replayed`` (delivered from the spool),
``dropped`` (lost), and ``spool_bytes``. Events are dropped, counted and logged at
ERROR in these cases only: the memory queue is full (while the spool is full, or has
no room, or the disk fails, refused events wait in memory, and the newest are dropped
when that fills too, never the oldest); the spool cannot take what is left at stop;
Kafka refuses an event for good (too large); an event cannot be encoded (a value no
JSON can carry: a bug before here, :meth:`EventPublisher.drop_unencodable`). A crash
loses the memory queue, never the spool. Delivery is at least once: of a segment partly
delivered when the process stops, the next start replays what followed the records
delivered in a row from its start (noted by the spool, ``Spool.mark``: at stop, and
during the replay at most once every ``MARK_EVERY_S``); after a crash, what followed
the last note; every stage downstream is idempotent on ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer

from ingress.flight import InFlight, Outcome, deliver, outcome_of
from ingress.producer import LINGER_MS, connect, disconnect
from ingress.spool import (
    DEFAULT_SEGMENT_BYTES,
    LARGEST_FRAME,
    Delivered,
    Record,
    Segment,
    Spool,
)
from llmtap import logs
from llmtap.data_dir import spool_left
from llmtap.kafka import Kafka

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
POLL_S = 0.05  # how often the spool policy is looked at while Kafka is awaited
MAX_BATCH = 5_000  # events taken from the queue per send
ABANDON_TIMEOUT_S = 10.0  # for the task to wind down once stop() gives up on the broker
DROP_LOG_INTERVAL_S = 1.0
SPOOL_RETRY_S = 1.0  # after the spool refused events (full, or a disk error)
SPOOL_OPEN_RETRY_S = 5.0  # after the spool could not be opened (another process holds it)
# After a spool segment could not be read: tried again after 1 s, doubling up to this.
SPOOL_READ_RETRY_MAX_S = 60.0
# A segment's replay notes its progress (Spool.mark: a write, two fsyncs and a rename,
# in a thread beside the flights) at most this often: a crash replays at most about
# this long's worth of it again.
MARK_EVERY_S = 1.0
# Spooled records whose delivery someone waits to hear of (hard-capped calls' response
# events); past this many, the oldest stop waiting (their costs age out in the budget book).
MAX_AWAITING = 100_000


class _Abandoned(Exception):
    """stop() gave up waiting for the broker."""


def _retrieved(opening: asyncio.Future[Spool]) -> None:
    """An open whose try was cancelled may fail with no one left to hear it."""
    if not opening.cancelled():
        opening.exception()


def _mark_failed(marking: asyncio.Future[None]) -> None:
    """A note of progress that failed on a bug (a disk error it logs itself)."""
    if not marking.cancelled() and (error := marking.exception()) is not None:
        log.error("noting a spool segment's progress failed", exc_info=error)


class EventPublisher:
    def __init__(
        self,
        kafka: Kafka,
        *,
        queue_size: int,
        spool_dir: Path,
        spool_max_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        request_timeout_ms: int = 10_000,
        slow_after_s: float = 1.0,
        topic_partitions: int | None = None,
        topic_replicas: int = 1,
    ) -> None:
        """``topic_partitions``: make llmtap's topics (those missing) with that many
        partitions and ``topic_replicas`` copies each time it connects, before it sends
        (None: leave them to the worker and the store)."""
        self._kafka = kafka
        self._topic_partitions = topic_partitions
        self._topic_replicas = topic_replicas
        self.names = kafka.names  # the topics events go to
        self._queue_size = queue_size
        self._high_water = max(1, queue_size // 2)
        self._spool_dir = spool_dir
        self._spool_max_bytes = spool_max_bytes
        self._segment_bytes = segment_bytes
        self._request_timeout_ms = request_timeout_ms
        self._slow_after_s = slow_after_s
        self._queue: deque[Record] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._spool: Spool | None = None
        # Whether to open the spool: always with one, with spool_max_bytes 0 only to
        # replay what a run with one left (decided at start, as the ingress's lock was).
        self._spool_wanted = spool_max_bytes > 0
        self._spool_retry_at = 0.0  # after a refusal, try the spool again from then (or an ack)
        self._spool_open_at = 0.0  # after a failed open, open it again from then
        self._read_again_at = 0.0  # after a segment could not be read, try again from then
        self._read_again_s = SPOOL_RETRY_S  # and the wait after the next failure
        self._opening: asyncio.Future[Spool] | None = None  # an open under way, in its thread
        # A spool write whose await stop() cancelled, going on in its thread, and its
        # records: stop() accounts for what it refused (_settle_write).
        self._writing: tuple[asyncio.Future[int], list[Record]] | None = None
        self._open_log = logs.AtMostEvery(60.0)
        self._broker_down = False  # the last connect or delivery failed
        self._in_flight: InFlight | None = None
        self._reservation: int | None = None  # the spool's place for the batch in flight
        self._replay_done: dict[int, set[int]] = {}  # segment -> records already delivered
        self._replay_from = 0  # below it, every record of the segment replayed is delivered
        self._replaying: Segment | None = None  # the segment being replayed, read once
        self._marking: asyncio.Future[None] | None = None  # a Spool.mark in its thread
        self._marked_at = 0.0  # when the last one began
        # (topic, key) -> who waits to hear where a spooled record went (_await_in_spool)
        self._awaiting: OrderedDict[tuple[str, bytes], Delivered] = OrderedDict()
        self._closing = False
        self._abandon = False
        self._drop_log = logs.AtMostEvery(DROP_LOG_INTERVAL_S)
        self._unencodable_log = logs.AtMostEvery(DROP_LOG_INTERVAL_S)
        self.published = 0
        self.spooled = 0
        self.replayed = 0
        self.dropped = 0
        self.spool_bytes = 0

    @property
    def connected(self) -> bool:
        return self._producer is not None

    @property
    def spool_room(self) -> bool:
        """The spool is open and has room for the largest event (empty, if its limit is
        smaller than that): events have somewhere to wait."""
        if self._spool is None:
            return False
        needed = min(LARGEST_FRAME, self._spool.max_bytes)
        return self._spool.max_bytes > 0 and self._spool.max_bytes - self.spool_bytes >= needed

    @property
    def spool_unreadable(self) -> int:
        """Spool segments whose last read failed: left on disk, passed over meanwhile."""
        return 0 if self._spool is None else self._spool.unreadable

    @property
    def spool_max_bytes(self) -> int:
        """The spool's limit: past it, new events are dropped (0: no spool)."""
        return self._spool_max_bytes

    @property
    def backlog(self) -> int:
        """Events waiting in memory (the spool's are counted in ``spool_bytes``)."""
        return len(self._queue)

    def publish(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        delivered: Delivered | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue an event (its JSON; None: a tombstone, deleting ``key`` from a compacted
        topic) for Kafka. Never blocks, never raises, never waits for the broker.
        ``delivered`` is told the partition and offset the event went to, once Kafka has
        it (also after a spell in the spool, within this process). ``partition``: the
        one it goes to (None, or one the topic does not have: its key's; the spool keeps
        none, :class:`~ingress.spool.Record`). An empty value is
        refused (counted as dropped, logged): the spool frames a tombstone as no bytes,
        so it would reach Kafka as one once spooled, and as an empty value if not."""
        if value == b"":
            self.drop_unencodable(topic, ValueError("an empty value (no event is empty)"))
            return
        if len(self._queue) >= self._queue_size:
            self._drop_queue_full()
            return
        self._queue.append(Record(topic, key, value, delivered, partition))
        self._wakeup.set()

    def drop_unencodable(self, topic: str, error: Exception) -> None:
        """Count an event that could not be encoded, so never published, as dropped: a
        bug (a value no JSON can carry) loses the event, but never unseen. Logged at
        ERROR with its traceback, at most once a second."""
        self.dropped += 1
        if self._unencodable_log.due():
            log.error(
                "an event to %s could not be encoded and is dropped (%s); %d dropped so far",
                topic,
                error,
                self.dropped,
                exc_info=error,
            )

    async def start(self) -> None:
        if not self._spool_wanted:
            self._spool_wanted = await asyncio.to_thread(spool_left, self._spool_dir)
        self._task = asyncio.create_task(self._supervise(), name="event-publisher")

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Give queued events ``drain_timeout`` to reach the broker, then spool the rest.

        Nothing in memory is lost on a clean stop unless the spool refuses it (full, or
        a disk error), which is counted in ``dropped`` and logged at ERROR.
        """
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=drain_timeout)
            if not done:
                self._abandon = True  # Kafka waits give up; a spool write in progress ends
                self._wakeup.set()
                done, _ = await asyncio.wait({self._task}, timeout=ABANDON_TIMEOUT_S)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._disconnect()  # settles what was in flight: delivered, or not
        await self._settle_write()
        await self._settle()
        await self._note_replayed()
        keeps = self._spool_max_bytes > 0  # a spool for what is left (0: none)
        if self._spool is None and ((self._queue and keeps) or self._opening is not None):
            # One last try (what is left has nowhere else to go), or the one under way
            # when the loop was cancelled: its spool is closed below.
            await self._open_spool()
        if self._queue and self._spool is not None and keeps:
            await self._spool_queue()
        if self._queue:
            where = "the spool refused them" if self._spool is not None and keeps else "no spool"
            log.error("stopping with %d events lost (%s)", len(self._queue), where)
            self.dropped += len(self._queue)
            self._queue.clear()
        if self._spool is not None:
            await asyncio.to_thread(self._spool.close)
            if self._spool.segments:
                log.warning(
                    "stopped with %d bytes spooled in %s; replayed at next start",
                    self._spool.size,
                    self._spool_dir,
                )

    async def _supervise(self) -> None:
        """Run the loop; should it fail on a bug, log it and start it again."""
        while True:
            try:
                await self._run()
                return
            except _Abandoned:
                return
            except Exception:
                log.exception("event publisher failed; restarting it in 1s")
                await self._disconnect()
                await self._settle()
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            await self._spool_policy()
            if self._closing and (not self._queue or self._producer is None):
                return
            if self._producer is None:
                self._producer = await self._meanwhile(
                    connect(
                        self._kafka,
                        self._request_timeout_ms,
                        self._topic_partitions,
                        self._topic_replicas,
                    )
                )
                if self._producer is None:
                    self._broker_down = True
                    await self._meanwhile(asyncio.sleep(backoff))
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
                self._broker_down = False
                backoff = BACKOFF_MIN_S
            if (
                self._spool is None
                and self._spool_max_bytes > 0
                and not self._closing
                and len(self._queue) < self._high_water
            ):
                # Not open yet (another process holds it: a run still stopping): what it
                # holds goes before anything new, so events wait in memory meanwhile (up
                # to the high-water mark: a spool that stays shut must not cost events),
                # and the open is tried again when due (_spool_policy).
                await self._meanwhile(asyncio.sleep(POLL_S))
                continue
            if self._spool is not None and not self._spool.empty:
                delivered = await self._replay(self._producer)
            elif self._queue:
                delivered = await self._send_queue(self._producer)
            else:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):  # a segment to read again then
                    await asyncio.wait_for(self._wakeup.wait(), self._idle_timeout())
                continue
            if not delivered:
                self._broker_down = True
                await self._disconnect()

    async def _spool_policy(self) -> None:
        """Open the spool if it is not (yet) open; move the queue to it if it should be."""
        if (
            self._spool is None
            and self._spool_wanted
            and asyncio.get_running_loop().time() >= self._spool_open_at
        ):
            await self._open_spool()
        if self._should_spool():
            await self._spool_queue()
        if (
            self._spool is not None
            and self._spool.unreadable
            and asyncio.get_running_loop().time() >= self._read_again_at
        ):
            self._spool.read_again()

    async def _open_spool(self) -> None:
        """Open the spool; failing (another process holds it, the disk), try again in
        ``SPOOL_OPEN_RETRY_S``: events wait in memory meanwhile.

        One open at a time, which goes on in its thread if the try is cancelled (stop()
        cancelling the loop): the next try takes its spool. A second open raced the
        first for the directory's lock, and the loser took it for another process's."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(
                asyncio.to_thread(
                    Spool,
                    self._spool_dir,
                    max_bytes=self._spool_max_bytes,
                    segment_bytes=self._segment_bytes,
                )
            )
            self._opening.add_done_callback(_retrieved)
        opening = self._opening
        try:
            spool = await asyncio.shield(opening)
        except OSError as exc:
            self._spool_open_at = asyncio.get_running_loop().time() + SPOOL_OPEN_RETRY_S
            if self._open_log.due():
                log.error(
                    "cannot open the spool at %s (%s): events wait in memory; tried again "
                    "every %.0f s",
                    self._spool_dir,
                    exc,
                    SPOOL_OPEN_RETRY_S,
                )
            return
        finally:
            if opening.done():  # whatever its outcome: the next try opens anew
                self._opening = None
        if self._spool is spool:  # stop()'s own try took it while the loop's was under way
            return
        self._spool = spool
        self.spool_bytes = spool.size
        if not spool.empty:
            log.info(
                "spool holds %d bytes in %d segments from a previous run: replaying them first",
                spool.size,
                spool.segments,
            )

    def _should_spool(self) -> bool:
        """Move the queue to disk now? Not only because the spool holds something: the
        queue is sent only once the spool is empty, so order holds without it."""
        if not self._queue or self._spool is None or self._spool.max_bytes == 0:
            return False
        now = asyncio.get_running_loop().time()
        if now < self._spool_retry_at:
            return False
        flight = self._in_flight
        slow = flight is not None and now - flight.started > self._slow_after_s
        return (
            self._broker_down
            or self._reservation is not None
            or len(self._queue) >= self._high_water
            or slow
        )

    async def _spool_queue(self) -> None:
        """Write the whole queue to the spool; what it refuses stays queued, in front."""
        spool = self._spool
        assert spool is not None
        flight = self._in_flight
        if flight is not None and flight.segment is None and self._reservation is None:
            self._reservation = spool.reserve()  # the batch in flight goes before these
        records = list(self._queue)
        self._queue.clear()
        refused = await self._write(spool.append, records)
        self._await_in_spool(records[: len(records) - refused])  # the refused stay queued
        self.spooled += len(records) - refused
        self.spool_bytes = spool.size
        if refused:
            self._queue.extendleft(reversed(records[len(records) - refused :]))
            self._spool_retry_at = asyncio.get_running_loop().time() + SPOOL_RETRY_S
            log.error(
                "spool refused %d events (full: %d of %d bytes in %s, or a disk error): they "
                "wait in memory; new events are dropped once the memory queue (%d) is full",
                refused,
                spool.size,
                spool.max_bytes,
                self._spool_dir,
                self._queue_size,
            )

    async def _write(self, write: Callable[[Sequence[Record]], int], records: list[Record]) -> int:
        """A spool write (``append``, ``fill``) in its thread: how many records it refused.
        Cancelled (stop() giving up on the loop), the write goes on in its thread, and
        stop() accounts for it (:meth:`_settle_write`): none of its records is lost
        uncounted."""
        writing = asyncio.ensure_future(asyncio.to_thread(write, records))
        try:
            return await asyncio.shield(writing)
        except asyncio.CancelledError:
            self._writing = (writing, records)
            raise

    async def _settle_write(self) -> None:
        """Wait for a spool write cut off by stop(): what it took is spooled, what it
        refused goes back in front of the queue (stop() spools it again, or counts it
        as dropped)."""
        if self._writing is None:
            return
        (writing, records), self._writing = self._writing, None
        try:
            refused = await writing
        except Exception:  # a bug: none of it is known to be spooled
            log.exception("a spool write cut off by stop failed")
            refused = len(records)
        self._await_in_spool(records[: len(records) - refused])
        self.spooled += len(records) - refused
        if self._spool is not None:
            self.spool_bytes = self._spool.size
        self._queue.extendleft(reversed(records[len(records) - refused :]))

    async def _meanwhile(self, work: Coroutine[Any, Any, T]) -> T:
        """Await Kafka work; meanwhile keep moving the queue to disk when the policy says so."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if self._abandon:
                    raise _Abandoned
                await self._spool_policy()
        finally:
            task.cancel()

    async def _disconnect(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await disconnect(producer)

    async def _send_queue(self, producer: AIOKafkaProducer) -> bool:
        """Send a batch from the queue; True if all of it is settled (sent or dropped)."""
        if len(self._queue) < MAX_BATCH and not self._closing:
            # Let the flight fill, as a producer's linger would: every flight is a
            # produce request per partition (measured: sent at once, flights of one or
            # two events cost ~350 µs of CPU per call more at 500 calls/s).
            await asyncio.sleep(LINGER_MS / 1000)
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
        self._in_flight = InFlight(batch, started=asyncio.get_running_loop().time())
        await self._meanwhile(deliver(producer, self._in_flight))
        return await self._settle()

    def _renamed(self, record: Record) -> Record:
        """A spooled record, to this deployment's topic of its kind: it was spooled under
        another namespace if kafka_namespace changed since (its old topic may be read by
        nobody, or out of the deployment's ACLs)."""
        topic = self.names.current(record.topic)
        return record if topic == record.topic else replace(record, topic=topic)

    async def _replay(self, producer: AIOKafkaProducer) -> bool:
        """Send the next ``MAX_BATCH`` records of the oldest spool segment not yet
        delivered; ack the segment once all of it is. A flight at a time, as from the
        queue: one of a whole segment (100,000 records, as stop() spools them) held the
        event loop ~150 ms to account for."""
        spool = self._spool
        assert spool is not None
        segment = self._replaying
        if segment is None:
            try:
                segment = self._replaying = await asyncio.to_thread(spool.oldest)
            except OSError as exc:
                self._unreadable(exc)
                return True  # the segments after it, and then the queue, go meanwhile
            finally:
                self.spool_bytes = spool.size  # less, if a segment's file was gone
            if segment is None:
                return True
            if not spool.unreadable:  # every one read again: the next failure waits 1 s
                self._read_again_s = SPOOL_RETRY_S
        done = self._replay_done.setdefault(segment.number, set())
        start = self._replay_from
        while start in done:  # each delivered record passed once, not once a flight
            start += 1
        self._replay_from = start
        left = (i for i in range(start, len(segment.records)) if i not in done)
        indices = list(itertools.islice(left, MAX_BATCH))
        self._in_flight = InFlight(
            [self._renamed(segment.records[i]) for i in indices],
            started=asyncio.get_running_loop().time(),
            segment=segment.number,
            indices=indices,
        )
        await self._meanwhile(deliver(producer, self._in_flight))
        if not await self._settle():
            return False
        if len(done) < len(segment.records):
            self._mark_progress(spool, segment)
            return True  # the next flight of it
        self._replaying = None
        self._replay_from = 0
        await self._marked()  # before the ack: a note never outlives its segment
        await asyncio.to_thread(spool.ack, segment.number)
        del self._replay_done[segment.number]
        self.spool_bytes = spool.size
        self._spool_retry_at = 0.0  # room was freed
        return True

    async def _note_replayed(self) -> None:
        """Stopping mid-segment: note in the spool how much of it was delivered, so the
        next start replays only the rest."""
        await self._marked()
        segment = self._replaying
        if segment is None or self._spool is None:
            return
        delivered = self._delivered_in_a_row(segment)
        if 0 < delivered < len(segment.records):  # all of it, not acked: replayed whole
            await asyncio.to_thread(self._spool.mark, segment.number, segment.delivered + delivered)

    def _delivered_in_a_row(self, segment: Segment) -> int:
        """How many of the segment's records (read this run) were delivered in a row
        from its start."""
        done = self._replay_done.get(segment.number, set())
        delivered = self._replay_from
        while delivered in done:
            delivered += 1
        return delivered

    def _mark_progress(self, spool: Spool, segment: Segment) -> None:
        """Mid-replay, note how much of the segment was delivered (at most once every
        ``MARK_EVERY_S``, one note at a time), so that after a crash the next start
        replays only the rest. In a thread, not awaited: the flights go on meanwhile."""
        now = asyncio.get_running_loop().time()
        if now - self._marked_at < MARK_EVERY_S or not (
            self._marking is None or self._marking.done()
        ):
            return
        delivered = self._delivered_in_a_row(segment)
        if delivered == 0:
            return
        self._marked_at = now
        self._marking = asyncio.ensure_future(
            asyncio.to_thread(spool.mark, segment.number, segment.delivered + delivered)
        )
        self._marking.add_done_callback(_mark_failed)

    async def _marked(self) -> None:
        """Wait for a note of progress under way (before its segment's ack, or stop's
        own note)."""
        marking, self._marking = self._marking, None
        if marking is None:
            return
        try:
            await asyncio.shield(marking)
        except asyncio.CancelledError:
            self._marking = marking  # stop() waits for it
            raise
        except Exception:  # a bug, logged by _mark_failed: the segment replayed whole
            pass

    def _unreadable(self, error: OSError) -> None:
        """A spool segment could not be read: passed over (left on disk, never deleted)
        and tried again later, the wait doubling up to ``SPOOL_READ_RETRY_MAX_S``."""
        wait, self._read_again_s = (
            self._read_again_s,
            min(self._read_again_s * 2, SPOOL_READ_RETRY_MAX_S),
        )
        self._read_again_at = asyncio.get_running_loop().time() + wait
        log.error(
            "cannot read spool segment %s (%s): left on disk, passed over (the events "
            "after it are sent meanwhile); tried again in %.0f s",
            error.filename,
            error.strerror or error,
            wait,
        )

    def _idle_timeout(self) -> float | None:
        """How long the loop may wait for new events: until a segment is read again."""
        if self._spool is None or not self._spool.unreadable:
            return None
        return max(POLL_S, self._read_again_at - asyncio.get_running_loop().time())

    async def _settle(self) -> bool:
        """Account for the batch in flight; put back what must be retried. True if none."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return True
        retry: list[Record] = []
        for index, record, outcome in zip(
            flight.indices or range(len(flight.records)),
            flight.records,
            flight.outcomes(),
            strict=True,
        ):
            if outcome is Outcome.RETRY:
                retry.append(record)
                continue
            if flight.segment is not None:
                self._replay_done[flight.segment].add(index)
            if outcome is Outcome.SENT:
                self.published += 1
                self.replayed += flight.segment is not None
            else:
                self.dropped += 1
                log.error("event to %s refused by Kafka for good; dropped", record.topic)
        self._tell_delivered(flight)
        if retry:
            log.warning("%d events not delivered; they wait for the broker", len(retry))
        if flight.segment is None:
            await self._put_back(retry)
        return not retry

    async def _put_back(self, records: list[Record]) -> None:
        """Undelivered records from the queue go back to their place in line."""
        reservation, self._reservation = self._reservation, None
        if reservation is None:
            self._queue.extendleft(reversed(records))  # nothing was spooled behind them
            return
        assert self._spool is not None
        if not records:
            self._spool.release(reservation)
            return
        refused = await self._write(functools.partial(self._spool.fill, reservation), records)
        self._await_in_spool(records[: len(records) - refused])
        self.spooled += len(records) - refused
        self.spool_bytes = self._spool.size
        if refused:
            # A disk error: they wait in memory, in front (after what the spool holds,
            # now: later events overtake them, which every stage downstream takes, as
            # it takes a replay), as far as the queue has room; the rest are lost.
            back = records[len(records) - refused :]
            room = max(0, self._queue_size - len(self._queue))
            kept = back[:room]
            self._queue.extendleft(reversed(kept))
            self._spool_retry_at = asyncio.get_running_loop().time() + SPOOL_RETRY_S
            lost = len(back) - len(kept)
            self.dropped += lost
            full = f", {lost} dropped (memory queue full)" if lost else ""
            log.error("spool write failed: %d events wait in memory%s", len(kept), full)

    def _await_in_spool(self, records: list[Record]) -> None:
        """The spool keeps records' bytes, not who waits to hear where they went: keep
        that here (by topic and key: a call's), for when the spool is replayed."""
        for record in records:
            if record.delivered is not None:
                self._awaiting[record.topic, record.key] = record.delivered
                if len(self._awaiting) > MAX_AWAITING:
                    self._awaiting.popitem(last=False)

    def _tell_delivered(self, flight: InFlight) -> None:
        """Tell each delivered record's listener its partition and offset."""
        for record, future, offset in zip(
            flight.records, flight.futures, flight.offsets, strict=False
        ):
            if record.delivered is None and not self._awaiting:
                continue
            outcome = outcome_of(future)
            if outcome is Outcome.RETRY:
                continue  # a record to retry keeps its listener
            delivered = record.delivered or self._awaiting.pop((record.topic, record.key), None)
            if outcome is Outcome.DROP:
                continue  # never in Kafka: the held cost ages out
            where = future.result()  # the batch's RecordMetadata: its base offset
            if delivered is not None and where.offset >= 0:
                try:
                    delivered(where.partition, where.offset + offset)
                except Exception:  # a listener's bug: the flight is settled all the same
                    # (raised here, what was to be retried was lost uncounted, and a
                    # reserved spool segment left unfilled stopped the replay for good)
                    log.exception("a delivery listener of an event to %s failed", record.topic)

    def _drop_queue_full(self) -> None:
        """Count a new event the full queue cannot take; log at most once a second."""
        self.dropped += 1
        if self._drop_log.due():
            log.error(
                "publish queue full (%d events, spool full or broker away): new events are "
                "dropped; %d dropped so far",
                self._queue_size,
                self.dropped,
            )
