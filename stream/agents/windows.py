"""The windows step: costed events counted in windows (stream/windows.py); a timer moves
the watermark, so windows close without traffic, and publishes each closed window."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import faust

from llmtap import topics, wire
from llmtap.events import utcnow
from stream.agents.costs import Position
from stream.windows import Windower

log = logging.getLogger(__name__)

CLOSE_EVERY_S = 1.0


class WindowsStep:
    def __init__(
        self,
        app: faust.App,
        sizes_s: tuple[int, ...],
        grace: timedelta,
        owned: Callable[[], list[int]],
    ) -> None:
        self.windower = Windower(sizes_s, grace)
        self._grace = grace
        self._windows = app.topic(topics.WINDOWS, key_serializer="raw", value_serializer="raw")

        @app.timer(CLOSE_EVERY_S)  # type: ignore[untyped-decorator]
        async def close_windows() -> None:
            await self.close(utcnow(), owned())

    def add(self, event: wire.CostedEvent, position: Position, now: datetime) -> None:
        self.windower.add(event, now)

    async def flush(self) -> None:
        """Nothing to do per batch: windows are published when they close."""

    async def close(self, now: datetime, owned: list[int]) -> None:
        late_before = self.windower.late_events
        for window in self.windower.advance(now, owned):
            await self._windows.send(
                key=window.series.encode(), value=window.model_dump_json().encode()
            )
        if self.windower.late_events > late_before:
            log.warning(
                "%d calls arrived after their window closed (grace %ss); counted as late",
                self.windower.late_events - late_before,
                self._grace.total_seconds(),
            )
