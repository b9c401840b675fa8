"""The spikes stage: closed windows in (``llmtap.windows``), spike alerts out (the
judging is in stream/detector.py and stream/spikes.py).

Like the cost stage, a service the worker runs beside its Faust app, reading whole
fetched batches with its own consumer in the spikes group (stream/agents/stage.py):
at the stream bench's window rate, Faust's per-event stream (~70 µs a window) cost
the worker a good part of its throughput (README, Benchmarks). Offsets are committed
every second, and only those of windows whose alerts the broker acknowledged. Alert
ids are derived from the rule, the series and the window, so a window judged again
after a crash or a rebalance raises the same alert, which the webhook stage and the
store take once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

import msgspec

from llmtap import wire
from llmtap.config import Settings
from llmtap.events import Alert, utcnow
from llmtap.names import Names
from stream.agents.stage import Fetched, GroupStage
from stream.detector import Detector

log = logging.getLogger(__name__)

TICK_S = 1.0  # how often windows still waiting for shares are looked at again


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

    async def on_start(self) -> None:
        producer = await self._start_producer(linger_ms=0)
        # A window is whole once it has a share from each partition the topic has, not
        # the configured count (a topic made earlier, or grown to scale out, differs).
        self.detector.partitions = len(await producer.partitions_for(self.names.responses))
        await self._start_consuming()

    async def handle(self, fetched: Fetched) -> None:
        now = utcnow()
        raised: list[Alert] = []
        for records in fetched.values():
            for record in records:
                raised += judged(self.detector, record.value or b"", now)
        if time.monotonic() >= self._tick_at:
            raised += self.detector.tick(now)
            self._tick_at = time.monotonic() + TICK_S
        await self._publish(raised)
        for tp, records in fetched.items():
            self._done[tp] = records[-1].offset + 1

    async def _publish(self, raised: list[Alert]) -> None:
        """Send the alerts and wait until the broker has them (before their windows'
        offsets can be committed)."""
        producer = self._producer
        assert producer is not None
        sent = []
        for alert in raised:
            log.warning("%s", alert.message)
            value = alert.model_dump_json().encode()
            sent.append(await producer.send(self.names.alerts, value, key=alert.event_id.bytes))
        await asyncio.gather(*sent)
