"""The windows step: costed events counted in windows (stream/windows.py), one windower
per partition of ``llmtap.responses``; every second, in the cost stage's loop, the
watermarks move, so windows close without traffic, and each closed window is
published, one share per partition.

A window is published and acknowledged before the partition's checkpoint can say so
(``through``), and the stage writes checkpoints only between batches: so what a
checkpoint says was published was, and what it says is held (the first call of a
window still open) is read again by whoever takes the partition over
(stream/checkpoints.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec
from aiokafka import AIOKafkaProducer

from llmtap import logs, topics, wire
from llmtap.batches import Batches
from llmtap.events import utcnow
from llmtap.kafka import Kafka
from stream.agents.costs import Position
from stream.checkpoints import Checkpoint
from stream.windows import ALLOWED_SKEW, Windower

log = logging.getLogger(__name__)

CLOSE_EVERY_S = 1.0
# Calls (and, at the spikes stage, windows) stamped ahead of the clock: logged at most
# this often.
AHEAD_LOG_EVERY_S = 60.0
# Calls that came after their window closed (a backlog after a stall brings them every
# second): logged at most this often, with how many since the last line.
LATE_LOG_EVERY_S = 60.0


@dataclass
class _Counting:
    windower: Windower
    through: datetime | None = None  # its windows ending at or before were published


class WindowsStep:
    def __init__(self, kafka: Kafka, sizes_s: tuple[int, ...], grace: timedelta) -> None:
        self._kafka = kafka
        self._sizes_s = sizes_s
        self._grace = grace
        self._windows: Batches | None = None  # on the cost stage's producer, once started
        self._counting: dict[int, _Counting] = {}  # by partition of llmtap.responses
        self._parked: dict[int, _Counting] = {}  # given up at a rebalance, maybe given back
        self._close_at = 0.0
        self._late_logged = 0  # of late_events, those said in a log line
        self._late_log = logs.AtMostEvery(LATE_LOG_EVERY_S)
        self._ahead_logged = 0  # of ahead_events, those said in a log line
        self._furthest = timedelta(0)  # the furthest ahead of those not said yet
        self._ahead_log = logs.AtMostEvery(AHEAD_LOG_EVERY_S)
        # For the worker's /metrics: windows published; and what the windowers dropped
        # at a takeover had counted (late_events, ahead_events add the live ones).
        self.published = 0
        self._retired_late = 0
        self._retired_ahead = 0

    def _windower(self) -> Windower:
        return Windower(self._sizes_s, self._grace, since=utcnow())

    async def start(self, producer: AIOKafkaProducer) -> None:
        """Windows go out as whole Kafka batches (a window per series, length and
        partition: thousands a minute with many users or keys), keyed by series."""
        self._windows = await Batches.of(producer, self._kafka.names.windows)

    async def taken(self, held: set[int]) -> None:
        """Nothing: the windows take partitions over from their checkpoints (take_over)."""

    async def stop(self) -> None:
        """Nothing: what is open is taken over from the checkpoints."""

    def add(self, event: wire.CostedEvent, position: Position, now: datetime) -> None:
        partition, offset = position
        counting = self._counting.get(partition)
        if counting is None:
            counting = self._counting[partition] = _Counting(self._windower())
        counting.windower.add(event, now, offset)

    async def flush(self) -> None:
        """Close and publish the windows the watermarks passed, once a second."""
        if time.monotonic() >= self._close_at:
            self._close_at = time.monotonic() + CLOSE_EVERY_S
            await self.close(utcnow())

    async def close(self, now: datetime) -> None:
        out = self._windows
        assert out is not None, "started by the cost stage"
        published = 0
        marks: dict[int, datetime | None] = {}
        for partition, counting in self._counting.items():
            windower = counting.windower
            for window in windower.advance(now, (partition,)):
                try:
                    out.add(window.series.encode(), wire.encode(window))
                except ValueError as exc:  # too large for Kafka: no retry can send it
                    log.error("window %s not published, %s", window.event_id, exc)
                    continue
                published += 1
            marks[partition] = windower.watermark
            self._furthest = max(self._furthest, windower.take_furthest_ahead())
        # Delivered, not just queued, before `through` moves (a failure stops the stage).
        await asyncio.gather(*await out.send())
        self.published += published
        for partition, mark in marks.items():
            self._counting[partition].through = mark
        late = self.late_events - self._late_logged
        if late and self._late_log.due():
            log.warning(
                "%d calls arrived after their window closed (grace %ss); counted as late",
                late,
                self._grace.total_seconds(),
            )
            self._late_logged += late
        ahead = self.ahead_events - self._ahead_logged
        if ahead and self._ahead_log.due():
            log.warning(
                "%d calls ended up to %.1f s ahead of this worker's clock: an ingress's clock "
                "runs ahead (or this worker's behind). Each counts in the window of its end; "
                "the windows' event time goes no further than this clock plus %ss",
                ahead,
                self._furthest.total_seconds(),
                ALLOWED_SKEW.total_seconds(),
            )
            self._ahead_logged += ahead
            self._furthest = timedelta(0)

    @property
    def late_events(self) -> int:
        """Calls counted late (their window had closed) since the worker started."""
        live = (*self._counting.values(), *self._parked.values())
        return self._retired_late + sum(c.windower.late_events for c in live)

    @property
    def ahead_events(self) -> int:
        """Calls stamped over ALLOWED_SKEW past the worker's clock since it started."""
        live = (*self._counting.values(), *self._parked.values())
        return self._retired_ahead + sum(c.windower.ahead_events for c in live)

    def _retire(self, counting: _Counting | None) -> None:
        """A windower is dropped: what it counted stays in the totals."""
        if counting is not None:
            self._retired_late += counting.windower.late_events
            self._retired_ahead += counting.windower.ahead_events

    def read_up_to(self, partition: int, following: int) -> None:
        """The partition was read up to offset ``following``, undecodable records too."""
        counting = self._counting.get(partition)
        if counting is not None:
            counting.windower.read_up_to(following)

    def held(self, partition: int) -> int | None:
        """The offset of the partition's first call in a window still open (Holding)."""
        counting = self._counting.get(partition)
        return None if counting is None else counting.windower.held()

    def through(self, partition: int) -> datetime | None:
        """The watermark up to which the partition's windows were published."""
        counting = self._counting.get(partition)
        return None if counting is None else counting.through

    def event_time(self, partition: int) -> datetime | None:
        """How far the partition's calls moved its windows' event time."""
        counting = self._counting.get(partition)
        return None if counting is None else counting.windower.event_time

    def park(self, partitions: Iterable[int]) -> None:
        """Stop counting ``partitions`` (a rebalance took them), keeping what was counted
        in case they come back."""
        for partition in partitions:
            counting = self._counting.pop(partition, None)
            if counting is not None:
                self._parked[partition] = counting

    async def take_over(self, given: dict[int, tuple[Checkpoint | None, bool]]) -> set[int]:
        """Count the partitions ``given``, each with its latest checkpoint and whether
        this worker wrote that one; return those it goes on counting from memory (the
        others are to be read again from their checkpoint's ``hold``)."""
        parked, self._parked = self._parked, {}
        kept: set[int] = set()
        resumed: dict[int, Windower] = {}
        for partition, (checkpoint, mine) in given.items():
            if mine and partition in parked:
                self._counting[partition] = parked.pop(partition)
                kept.add(partition)
                continue
            self._retire(self._counting.pop(partition, None))
            windower = self._windower()
            through = None if checkpoint is None else checkpoint.through
            if checkpoint is not None:
                windower.resume(through, checkpoint.done, checkpoint.hold, checkpoint.event_time)
                resumed[partition] = windower
            self._counting[partition] = _Counting(windower, through)
        for counting in parked.values():  # not given back, or read again from a checkpoint
            self._retire(counting)
        if resumed:
            await self._restore(resumed)
        return kept

    async def _restore(self, resumed: dict[int, Windower]) -> None:
        """Make the taken-over partitions' open larger windows again from the smaller
        windows published on ``llmtap.windows`` (each as long ago as the larger window)."""
        marks = [w.watermark for w in resumed.values() if w.watermark is not None and w.larger]
        if not marks:
            return
        windower = next(iter(resumed.values()))
        since = min(marks) - max(windower.larger)
        since_ms = int(since.timestamp() * 1000)
        raws = await topics.read_since(self._kafka, self._kafka.names.windows, since_ms)
        shares: dict[int, list[wire.Window]] = {partition: [] for partition in resumed}
        for raw in raws:
            try:
                window = wire.decode_window(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # the spikes stage and the writer report it
            if len(window.partitions) == 1 and window.partitions[0] in shares:
                shares[window.partitions[0]].append(window)
        for partition, windower in resumed.items():
            taken = windower.restore(shares[partition])
            log.info(
                "partition %d taken over: windows published up to %s, %d of them read back",
                partition,
                windower.watermark,
                taken,
            )
