"""The spikes agent: closed windows in, spike alerts out (the judging is in
stream/detector.py and stream/spikes.py)."""

from __future__ import annotations

import logging
from typing import Any

import faust
import msgspec
from pydantic import ValidationError

from llmtap import topics
from llmtap.events import Alert, WindowEvent, utcnow
from stream.detector import Detector

log = logging.getLogger(__name__)

BATCH = 1000
BATCH_SECONDS = 0.05
TICK_S = 1.0


class _Head(msgspec.Struct):
    """The two fields of a window that say whether a rule looks at it."""

    size_s: int
    dimension: str


_decode_head = msgspec.json.Decoder(_Head).decode


def register(app: faust.App, detector: Detector) -> Any:
    """The agent judging closed windows with ``detector`` (stream/warmup.py gives it
    the windows judged before a restart)."""
    windows = app.topic(topics.WINDOWS, key_serializer="raw", value_serializer="raw")
    alerts = app.topic(topics.ALERTS, key_serializer="raw", value_serializer="raw")

    async def publish(raised: list[Alert]) -> None:
        for alert in raised:
            log.warning("%s", alert.message)
            await alerts.send(key=alert.event_id.bytes, value=alert.model_dump_json().encode())

    @app.agent(windows, name="spikes")
    async def judge(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(BATCH, within=BATCH_SECONDS):
            now = utcnow()
            for raw in batch:
                try:
                    # Most windows are of series no rule looks at: a glance at two fields
                    # (~1 µs) spares them the full validation (~25 µs).
                    head = _decode_head(raw)
                    if not detector.judges(head.size_s, head.dimension):
                        continue
                    window = WindowEvent.model_validate_json(raw)
                except (ValidationError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.error("undecodable window skipped: %s", exc)
                    continue
                await publish(detector.offer(window, now))

    @app.timer(TICK_S)  # type: ignore[untyped-decorator]
    async def settle_windows() -> None:
        await publish(detector.tick(utcnow()))

    return judge
