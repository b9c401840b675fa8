"""The windows agent: costed events in, closed windows out (the arithmetic is in
stream/windows.py). A timer moves the watermark, so windows close without traffic."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import faust
from pydantic import ValidationError

from llmtap import topics
from llmtap.events import CostedEvent, utcnow
from stream.windows import Windower

log = logging.getLogger(__name__)

BATCH = 1000
BATCH_SECONDS = 0.05
CLOSE_EVERY_S = 1.0


def register(app: faust.App, sizes_s: tuple[int, ...], grace: timedelta) -> Any:
    costed = app.topic(topics.COSTED, key_serializer="raw", value_serializer="raw")
    windows = app.topic(topics.WINDOWS, key_serializer="raw", value_serializer="raw")
    windower = Windower(sizes_s, grace)

    @app.agent(costed, name="windows")
    async def count(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(BATCH, within=BATCH_SECONDS):
            now = utcnow()
            for raw in batch:
                try:
                    event = CostedEvent.model_validate_json(raw)
                except ValidationError as exc:
                    log.error("undecodable costed event skipped: %s", exc.errors()[:1])
                    continue
                windower.add(event, now)

    @app.timer(CLOSE_EVERY_S)  # type: ignore[untyped-decorator]
    async def close_windows() -> None:
        owned = [tp.partition for tp in app.consumer.assignment() if tp.topic == topics.COSTED]
        late_before = windower.late_events
        for window in windower.advance(utcnow(), owned):
            await windows.send(key=window.series.encode(), value=window.model_dump_json().encode())
        if windower.late_events > late_before:
            log.warning(
                "%d calls arrived after their window closed (grace %ss); counted as late",
                windower.late_events - late_before,
                grace.total_seconds(),
            )

    return count
