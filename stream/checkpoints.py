"""Where a worker's counting of each partition of ``llmtap.responses`` stands, kept on
``llmtap.checkpoints`` so that a worker taking a partition over (after a crash or a
rebalance) counts its open windows again, and nothing twice.

The group's committed offset says which calls were priced, delivered and counted in
budgets; open windows live in memory, and the calls they counted are behind it. So
before each commit the cost stage writes, per partition, a :class:`Checkpoint`: the
offset of the first call counted in a window still open (``hold``), the committed
offset to be (``done``), the watermark its windows were published up to
(``through``), and how far its calls had moved the windows' event time
(``event_time``: a call read again after a takeover moves it no further than it did
the first time, stream/windows.py). Written and acknowledged before the offsets are
committed, a partition's latest checkpoint is never behind its committed offset.

A worker given a partition reads its latest checkpoint: if it wrote it itself and the
partition's windows are still in its memory (a rebalance that gave the partition back),
it goes on from ``done``; otherwise it reads the partition again from ``hold``, passes
over the calls of windows published up to ``through``, counts the rest (what the old
owner's open windows held, and lost), and makes the open larger windows again from
the published smaller ones (stream/windows.py).

Partition p of the checkpoints topic holds responses partition p's checkpoints, keyed
by partition (compacted on Kafka), so the latest one is the last message there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from llmtap import topics
from llmtap.batches import Batches
from llmtap.kafka import Kafka


class Checkpoint(BaseModel):
    """One partition's counting, as of a commit of the stream group."""

    model_config = ConfigDict(frozen=True)

    partition: int
    hold: int  # read again from here by a new owner: the first call in an open window
    done: int  # the calls below were priced, delivered and counted
    through: AwareDatetime | None  # its windows ending at or before were published
    writer: uuid.UUID  # the worker that wrote it
    # The windows' event time the calls below ``done`` had moved (None: none counted, or
    # written by a worker that did not keep it).
    event_time: AwareDatetime | None = None

    @property
    def key(self) -> bytes:
        return str(self.partition).encode()


def of(
    partition: int,
    processed: int,
    counted_below: int,
    held: int | None,
    through: datetime | None,
    writer: uuid.UUID,
    event_time: datetime | None = None,
) -> Checkpoint:
    """The checkpoint of a partition processed up to offset ``processed``, taken over
    from a worker that had counted below ``counted_below`` (0: not taken over), whose
    open windows hold calls from offset ``held`` on (None: no window open)."""
    hold = processed if held is None else min(held, processed)
    done = max(processed, counted_below)
    return Checkpoint(
        partition=partition,
        hold=hold,
        done=done,
        through=through,
        writer=writer,
        event_time=event_time,
    )


async def latest(kafka: Kafka, partitions: Iterable[int]) -> dict[int, Checkpoint]:
    """The latest checkpoint of each of ``partitions`` that has one."""
    found: dict[int, Checkpoint] = {}
    read = await topics.read_latest(kafka, kafka.names.checkpoints, partitions)
    for partition, raw in read.items():
        try:
            checkpoint = Checkpoint.model_validate_json(raw)
        except ValidationError:
            continue  # as if none: the partition is read from the committed offset
        if checkpoint.partition == partition:
            found[partition] = checkpoint
    return found


class Holding(Protocol):
    """What holds counts of calls in memory behind the committed offsets (the windows
    step: its open windows)."""

    def held(self, partition: int) -> int | None:
        """The offset of the partition's first call counted in something still open."""
        ...

    def read_up_to(self, partition: int, following: int) -> None:
        """The partition was read up to ``following`` (records passed over included)."""
        ...

    def through(self, partition: int) -> datetime | None:
        """The watermark up to which the partition's windows were published."""
        ...

    def event_time(self, partition: int) -> datetime | None:
        """How far the partition's calls moved its windows' event time."""
        ...

    def park(self, partitions: Iterable[int]) -> None:
        """Stop counting ``partitions``, keeping what was counted should they return."""
        ...

    async def take_over(self, given: dict[int, tuple[Checkpoint | None, bool]]) -> set[int]:
        """Count the partitions given, each with its latest checkpoint and whether it
        was this worker's (with the partition's state parked here); return those it
        goes on counting from memory."""
        ...


class Positions:
    """Where this worker stands on each partition of ``llmtap.responses`` it owns: the
    offsets processed, the checkpoints it wrote, and where a partition it is given
    starts. The cost stage (stream/agents/costs.py) calls it under its lock."""

    def __init__(self, kafka: Kafka) -> None:
        self._kafka = kafka
        self.holding: Holding | None = None
        self._id = uuid.uuid4()
        self._next: dict[int, int] = {}  # partition -> next offset processed
        self._counted_below: dict[int, int] = {}  # taken over: counted by the old owner
        self._written: dict[int, Checkpoint] = {}  # the latest checkpoints written here
        self._parked: dict[int, tuple[int, int]] = {}  # given up: (next, counted below)

    def counted_below(self, partition: int) -> int:
        """Calls below this offset were counted by the partition's previous owner, who
        delivered their costed events (-1: none)."""
        return self._counted_below.get(partition, -1)

    def processed(self, partition: int, following: int) -> int:
        """Record the partition processed up to ``following``; return the offset to
        commit (never behind what the previous owner committed)."""
        self._next[partition] = following
        if self.holding is not None:
            self.holding.read_up_to(partition, following)
        return max(following, self._counted_below.get(partition, 0))

    async def write(self, batches: Batches) -> None:
        """Write the checkpoint of each partition that moved, acknowledged on return."""
        holding = self.holding
        changed: list[Checkpoint] = []
        for partition, processed in self._next.items():
            checkpoint = of(
                partition,
                processed,
                self._counted_below.get(partition, 0),
                None if holding is None else holding.held(partition),
                None if holding is None else holding.through(partition),
                self._id,
                None if holding is None else holding.event_time(partition),
            )
            if checkpoint != self._written.get(partition):
                changed.append(checkpoint)
                batches.add(checkpoint.key, checkpoint.model_dump_json().encode(), partition)
        if changed:
            await asyncio.gather(*await batches.send())
            self._written.update((c.partition, c) for c in changed)

    def give_up(self, partitions: Iterable[int]) -> None:
        """The group took ``partitions`` (their checkpoints were just written)."""
        gone = set(partitions)
        for partition in gone:
            if partition in self._next:
                below = self._counted_below.pop(partition, 0)
                self._parked[partition] = (self._next.pop(partition), below)
        if self.holding is not None:
            self.holding.park(gone)

    async def take_over(self, partitions: Iterable[int]) -> dict[int, int]:
        """Start on the partitions the group gave this worker; return the offset to
        read each from (none: its committed offset). From memory where this worker
        wrote the partition's latest checkpoint and still has what it counted, else
        from the checkpoint's ``hold``."""
        given = list(partitions)
        found = await latest(self._kafka, given)
        parked, self._parked = self._parked, {}
        mine = {
            p
            for p, checkpoint in found.items()
            if p in parked and checkpoint == self._written.get(p)
        }
        kept = set(mine)
        if self.holding is not None:
            kept = await self.holding.take_over({p: (found.get(p), p in mine) for p in given})
        starts: dict[int, int] = {}
        for partition, checkpoint in found.items():
            if partition in kept and partition in mine:
                position, below = parked[partition]
                self._next[partition] = starts[partition] = position
                if below:
                    self._counted_below[partition] = below
            else:
                starts[partition] = checkpoint.hold
                self._counted_below[partition] = checkpoint.done
        return starts
