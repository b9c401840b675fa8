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
roll at ``at``. Not the end offsets alone: on Tansu a partition's end offset is its
last record batch's first offset plus one, and a fetch of at most so many records may
stop inside that batch. A partition read to its end offset is read up once it reaches
the high watermark of the fetch answers then (the broker's log end when it answered a
fetch holding that batch, or a later one: past every call appended before ``at``). A
worker that is caught up reaches each snapshot at once (within a tick or two: the high
watermark may be a fetch ahead), and rolls within a tick or two of the boundary.
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
    # Partitions of the pending snapshot whose end was moved to the high watermark.
    _pinned: set[int] = field(default_factory=set)

    @property
    def waiting(self) -> bool:
        """Whether a snapshot is waited for (no new one is taken meanwhile)."""
        return self._pending is not None

    def taken(self, at: datetime, ends: Mapping[int, int]) -> None:
        """End offsets fetched after ``at``: every call appended before ``at`` is below."""
        self._pending = (at, dict(ends))
        self._pinned = set()

    def reached(self, read: Mapping[int, int], high: Mapping[int, int | None]) -> datetime | None:
        """With ``read`` so far and ``high``, the high watermark of each partition's
        latest fetch answer (None: none yet): ``at``, moved to the snapshot's time once
        read past it. A partition read to its end offset has that end moved to its high
        watermark then (once: a fixed mark, reached under steady traffic too)."""
        if self._pending is None:
            return self.at
        at, ends = self._pending
        for partition, end in ends.items():
            if partition in self._pinned or read.get(partition, 0) < end:
                continue
            mark = high.get(partition)
            if mark is None:  # no fetch answer yet: the end may be inside a batch
                continue
            ends[partition] = max(end, mark)
            self._pinned.add(partition)
        if self._pinned >= ends.keys() and read_past(read, ends):
            self.at, self._pending = at, None
        return self.at
