"""The spikes stage: closed windows in (``llmtap.windows``), spike alerts out (the
judging is in stream/detector.py and stream/spikes.py).

Like the cost stage, a service the worker runs beside its Faust app, reading whole
fetched batches with its own consumer in the spikes group (stream/agents/stage.py):
at the stream bench's window rate, Faust's per-event stream (~70 µs a window) cost
the worker a good part of its throughput (bench/NOTES.md, Stream). Offsets are committed
every second, and only those of windows whose alerts the broker acknowledged. Alert
ids are derived from the rule, the series and the window, so a window judged again
after a crash or a rebalance raises the same alert, which the webhook stage and the
store take once. On the embedded broker, a stop judges the windows still waiting for
shares on those they have (:meth:`SpikesStage.on_stop`): its topics go with `llmtap
up`'s stop, and no warm-up reads them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from llmtap import logs, topics, wire
from llmtap.config import Settings
from llmtap.events import Alert, utcnow
from llmtap.names import Names
from stream.agents.stage import STOP_TIMEOUT_S, Fetched, GroupStage
from stream.agents.windows import AHEAD_LOG_EVERY_S
from stream.detector import TICK_S, Detector
from stream.warmup import warmed_detector
from stream.windows import ALLOWED_SKEW

log = logging.getLogger(__name__)


class _Head(msgspec.Struct):
    """The two fields of a window that say whether a rule looks at it."""

    size_s: int
    dimension: str


_decode_head = msgspec.json.Decoder(_Head).decode


def judged(
    detector: Detector, raw: bytes, now: datetime, home: int | None = None
) -> list[Alert] | None:
    """Offer one window, as it came off the topic, to ``detector``; the alerts it
    completes. Most windows are of series no rule looks at: a glance at two fields
    (~1 µs) spares them the full decoding. An undecodable window, or one that decodes
    but cannot be judged (a latency sketch whose bins do not add up: a foreign
    producer's, a corrupt one), is logged and passed over (None): raised, it stopped the
    stage, and its restart met the same window."""
    try:
        head = _decode_head(raw)
        if not detector.judges(head.size_s, head.dimension):
            return []
        window = wire.decode_window(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("undecodable window skipped: %s", exc)
        return None
    try:
        return detector.offer(window, now, home)
    except (ValueError, TypeError, ArithmeticError) as exc:
        log.error("window %s could not be judged, skipped: %s", window.event_id, exc)
        return None


class SpikesStage(GroupStage):
    """Judges ``llmtap.windows`` with ``detector`` (stream/warmup.py gives it the
    windows judged before a restart) and publishes the alerts to ``llmtap.alerts``."""

    client = "worker-spikes"
    redone = "their windows are judged again (same alert ids)"

    @staticmethod
    def reads(names: Names) -> tuple[str, str]:
        return names.windows, names.spikes_group

    def __init__(self, settings: Settings, detector: Detector, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.detector = detector
        self._tick_at = 0.0
        self._held: set[int] | None = None  # None until the first assignment
        self._adopting: asyncio.Task[None] | None = None
        self._adopted: set[int] = set()  # the partitions _adopting reads back
        self._ahead_logged = 0  # of the detector's ahead_windows
        self._ahead_log = logs.AtMostEvery(AHEAD_LOG_EVERY_S)
        # For the worker's /metrics: spike alerts delivered to the broker, by state.
        self.alerts_raised: dict[str, int] = {"firing": 0, "resolved": 0}

    def gave_up(self, revoked: Iterable[TopicPartition]) -> None:
        """(Kafka's eager rebalance takes every partition and gives back the kept ones:
        which were lost is known at :meth:`take_over`.)"""
        if self._adopting is not None and not self._adopting.done():
            self._adopting.cancel()
            if self._held is not None:  # not read back: read again if given again
                self._held -= self._adopted

    async def take_over(self, assigned: list[TopicPartition]) -> None:
        """Partitions given to this worker were judged elsewhere since it knew them (or
        never by it): their series' states are read back from what the group judged,
        as at start (stream/warmup.py), so an ongoing spike the previous owner fired
        does not fire again here, nor one it resolved stay firing. Read beside the
        group's rebalance (hours of windows may take longer than it waits), with those
        partitions paused meanwhile. The first assignment has the warmup of the start,
        of every partition: the others are another worker's.

        No series is found quiet until the partitions given (at the first assignment,
        all) are read up to where they end now: their backlog may hold the next window
        of a series firing, while another partition's moves the event time on."""
        held = {tp.partition for tp in assigned}
        if self._held is None:
            self.detector.keep_only(held)
        before = held if self._held is None else self._held
        self.detector.give_up(before - held)
        given = held - before
        self.detector.catching_up(held, held if self._held is None else given)
        self._held = held
        assert self._consumer is not None
        if given:
            paused = [tp for tp in assigned if tp.partition in given]
            self._consumer.pause(*paused)
            self._adopted = given
            self._adopting = asyncio.create_task(self._adopt(given, paused))
        # A partition taken over is paused while its states are read back (minutes,
        # maybe): its end is asked when it is resumed (_adopt), not now.
        await self._ask_ends([tp for tp in assigned if tp.partition not in given])

    async def _ask_ends(self, behind: list[TopicPartition]) -> None:
        """Tell the detector where those of the partitions not read up yet end now
        (each poll then says whether it is read up to there: :meth:`_read_up`)."""
        assert self._consumer is not None
        behind = [tp for tp in behind if tp.partition in (self.detector.behind or ())]
        if not behind:
            return
        try:
            ends = await self._consumer.end_offsets(behind)
        except KafkaError as exc:  # judged as if read up, rather than never found quiet
            log.warning("end offsets of %s unknown (%r): not waited for", behind, exc)
            for tp in behind:
                self.detector.read_up_to(tp.partition, 0, 0)
            return
        for tp, end in ends.items():
            self.detector.read_up_to(tp.partition, None, end)

    async def _read_up(self) -> None:
        """Tell the detector which partitions behind are read up to where the broker's
        last answer on them ended (its high watermark; an idle partition's comes too).
        Not a position at or past the end asked alone: on Tansu that end is the last
        record batch's first offset plus one, and a committed offset, or a fetch of at
        most BATCH records, may stop inside that batch."""
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        for partition, end in list((self.detector.behind or {}).items()):
            tp = TopicPartition(self.topic, partition)
            if tp not in assigned:  # taken away, before the listener hears: it says
                continue
            high = self._consumer.highwater(tp)
            if end is None or high is None:  # its end not asked yet, or not fetched yet
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:  # taken away meanwhile: the next assignment says
                continue
            if position >= high:
                self.detector.read_up_to(partition, position)

    async def _adopt(self, given: set[int], paused: list[TopicPartition]) -> None:
        try:
            taken = await warmed_detector(self._settings, given, self.detector.partitions)
        except Exception:  # judged with what this worker knew, rather than not at all
            log.exception("spike states of partitions %s could not be read back", given)
            taken = None
        async with self._busy:
            self.detector.adopt(taken, given)
            assert self._consumer is not None
            self._consumer.resume(*paused)
            # Adopted: this worker's now, given up at a rebalance as any other. (Left
            # among those being read back while their ends were asked, a revocation then
            # dropped them from what it held, and never gave them up: their series were
            # judged here, another worker's.)
            self._adopted = set()
        await self._ask_ends(paused)

    async def on_stop(self) -> None:
        if self._adopting is not None:
            self._adopting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopting
        if self._settings.embedded_broker and not self._worker_crashed():
            await self._judge_waiting()
        await super().on_stop()

    def _worker_crashed(self) -> bool:
        """Whether this stage, or the worker it runs in, crashed (a stage's failure stops
        the worker, which is started again with the broker alive)."""
        return any(getattr(node.data, "crashed", False) for node in self.beacon.walk())

    async def _judge_waiting(self) -> None:
        """At a stop on the embedded broker, judge the windows still waiting for shares on
        those they have, once the last batch is done: its topics go with `llmtap up`'s
        stop, so no warm-up would read them back after a restart (on Kafka it does, and
        judges them live, whole), and the shares still missing were of windows still
        open at the stop, never published. Their alerts reach the broker before the
        stage stops, for the store to take before `up` stops it (a worker restarted with
        the broker up judges them again after its warm-up: the same alert ids)."""
        await self.end_loop()
        if self._producer is None or not self.detector.pending:
            return
        async with self._busy:
            raised = self.detector.judge_waiting(utcnow())
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self._publish(raised)
            except (KafkaError, TimeoutError) as exc:
                log.error(
                    "%d spike alerts of the last windows not published (%r)", len(raised), exc
                )

    async def on_start(self) -> None:
        producer = await self._start_producer(linger_ms=0)
        # A window is whole once it has a share from each partition the topic has, not
        # the configured count (a topic made earlier, or grown to scale out, differs).
        self.detector.partitions = len(await producer.partitions_for(self.names.responses))
        # Spike alerts open at start that nothing judges any more (stream/reconcile.py):
        # resolved before any window is judged (their ids are the same from any worker).
        await self._publish(self.detector.restart_alerts)
        self.detector.restart_alerts = []
        await self._start_consuming()

    async def handle(self, fetched: Fetched) -> None:
        now = utcnow()
        raised: list[Alert] = []
        for tp, records in fetched.items():
            for record in records:
                alerts = judged(self.detector, record.value or b"", now, tp.partition)
                if alerts is None:
                    self.skipped += 1
                else:
                    raised += alerts
        if self.detector.behind:
            await self._read_up()
        if time.monotonic() >= self._tick_at:
            raised += self.detector.tick(now)
            self._tick_at = time.monotonic() + TICK_S
        self._log_ahead()
        await self._publish(raised)
        for tp, records in fetched.items():
            self._done[tp] = records[-1].offset + 1

    def _log_ahead(self) -> None:
        """Say, once a minute at most, that windows came ending ahead of this clock."""
        ahead = self.detector.ahead_windows - self._ahead_logged
        if ahead > 0 and self._ahead_log.due():
            self._ahead_logged += ahead
            log.warning(
                "%d windows judged before their end by this worker's clock: a stream "
                "worker's clock, or an ingress's, runs ahead (or this one's behind). They "
                "move the detector's time no further than this clock plus %ss",
                ahead,
                ALLOWED_SKEW.total_seconds(),
            )

    async def _publish(self, raised: list[Alert]) -> None:
        """Send the alerts and wait until the broker has them (before their windows'
        offsets can be committed)."""
        producer = self._producer
        assert producer is not None
        sent = []
        for alert in raised:
            log.warning("%s", alert.message)
            value = alert.model_dump_json().encode()
            sent.append(await producer.send(self.names.alerts, value, key=topics.alert_key(alert)))
        await asyncio.gather(*sent)
        for alert in raised:
            self.alerts_raised[alert.state] += 1
