"""When the budgets step may roll periods: not past calls still unread that belong to
the closing one (stream/agents/budgets.py). Pure bookkeeping, no I/O.

A worker with a backlog at a period's end (lagging, or taking over after being down
across midnight) would otherwise roll every budget to the new period by its clock
before reading the backlog, and the closing period's last calls, read after, would be
late for a closed period: never counted, their thresholds never alerted.

The stage says how far it has read (the next offset handed to the steps, per
partition) and, from time to time, fetches the partitions' end offsets (a
:class:`Watermark` snapshot, taken at a time ``at``). Once what it has read reaches a
snapshot's end offsets, every call appended before ``at`` has been read: periods may
roll at ``at``. A worker that is caught up reaches each snapshot at once, and rolls
within a tick of the boundary, as by the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


def read_past(read: Mapping[int, int], ends: Mapping[int, int]) -> bool:
    """Whether the offsets ``read`` (next offsets handed on, per partition) have reached
    the end offsets ``ends`` of every partition."""
    return all(read.get(partition, 0) >= end for partition, end in ends.items())


def roll_time(now: datetime, read_up_to: datetime | None) -> datetime | None:
    """The time periods roll at: ``now``, or, while calls appended before it may be
    unread, ``read_up_to`` (every call appended before it read); None when nothing is
    known read yet (just given the partitions): no roll."""
    if read_up_to is None:
        return None
    return min(now, read_up_to)


@dataclass(slots=True)
class Watermark:
    """The time up to which every call appended to the partitions has been read
    (``at``; None until the first snapshot is reached), and the snapshot of end offsets
    waited for (kept until reached, not replaced: a stage that never catches up would
    never reach the newest)."""

    at: datetime | None = None
    _pending: tuple[datetime, dict[int, int]] | None = field(default=None)

    @property
    def waiting(self) -> bool:
        """Whether a snapshot is waited for (no new one is taken meanwhile)."""
        return self._pending is not None

    def taken(self, at: datetime, ends: Mapping[int, int]) -> None:
        """End offsets fetched after ``at``: every call appended before ``at`` is below."""
        self._pending = (at, dict(ends))

    def reached(self, read: Mapping[int, int]) -> datetime | None:
        """With ``read`` so far: ``at``, moved to the snapshot's time once read past it."""
        if self._pending is not None and read_past(read, self._pending[1]):
            self.at, self._pending = self._pending[0], None
        return self.at
