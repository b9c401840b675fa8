"""Deleting the entries that ingress processes killed left on the reservations topic.

Each ingress start announces what it holds under a new id, on a compacted topic keyed by
that id (:func:`ingress.guards.book_topics.announce`), and a
stopping one deletes its key with a tombstone. One that was killed (SIGKILL after its
grace, out of memory, a lost machine) never does: its last announcement stayed on the
topic for good, one entry for every process ever killed, which every ingress and the
store read at start. Its holds were already let go (a process silent for three
announcements is gone); its entry is what this deletes.

Every ingress with a hard cap deletes the entries silent for :data:`REAP_AFTER` before
the latest announcement it has read (its own, every interval, among them; none past its
clock), at two looks a minute apart, once it has read the topic to its end (an older
announcement of a live process is then superseded by its latest), and each at most once
in its life: a live process whose clock runs that far behind is deleted once, heard again
at its next announcement (within its interval), not deleted at every one. Replicas may
each delete the same entry: a tombstone more. Judged by its clock alone, a process paused
for an hour, or cut off from Kafka that long, took every live process for dead as it woke
or as Kafka came back, before it read their announcements of that hour (the book judges
silence against what it read too: LatestHeard).

An entry is deleted on the partition it was read from: partitions added to the topic
move a key's (murmur2 % n), and a tombstone sent by the key went to another partition
than the entry, which stayed for good (deleted again by every process, at every start).
A process's entries on several partitions (its announcements before and after) are each
judged, and deleted, on their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from ingress.guards.book_topics import Publish
from llmtap.events import LatestHeard, Reservations, utcnow

log = logging.getLogger(__name__)

# Silent this long, an entry is deleted: far past the three announcements (30 s by
# default) after which its holds are let go, so a process paused, or on a clock that
# lags, is not taken for dead; what an entry costs meanwhile is a few hundred bytes read.
REAP_AFTER = timedelta(hours=1)
REAP_EVERY_S = 60.0


Entry = tuple[str, int | None]  # an ingress id, the partition its entry is on


class Reaper:
    """The latest announcement heard of each other ingress process (by its id and the
    partition it was read from), and which are due for deletion."""

    def __init__(self, own_id: str, keeps: Callable[[str, datetime], bool] | None = None) -> None:
        self._own_id = own_id
        # Whether a process's entry still tells costs no state has counted (placed:
        # BudgetBook.holds_placed): kept, however long silent, for a process started
        # later to read; deleted once they are counted.
        self._keeps = keeps
        self._latest: dict[Entry, datetime] = {}
        self._deleted: set[Entry] = set()
        self._silent: set[Entry] = set()  # found silent at the last look
        self._read = LatestHeard()  # the latest announcement read, its own too

    def heard(self, event: Reservations, partition: int | None = None) -> None:
        self._read.hear(event)
        if event.ingress_id == self._own_id:
            return
        entry = (event.ingress_id, partition)
        latest = self._latest.get(entry)
        if latest is None or event.at > latest:
            self._latest[entry] = event.at

    def gone(self, key: bytes, partition: int | None = None) -> None:
        """Its key deleted on ``partition`` (its own tombstone as it stopped, or one of
        ours)."""
        self._latest.pop((key.decode(errors="replace"), partition), None)

    def due(self, now: datetime) -> list[Entry]:
        """The processes silent for :data:`REAP_AFTER` before the latest announcement
        read (``now`` at the latest), at this look and at the one before, and not deleted
        yet by this one: taken as deleted from here on. What was read before a pause, or
        an outage, tells nothing of who has been silent since; and the topic is read a
        partition at a time, so as it is caught up with, this process's own latest may
        be read before a live one's (both waited in their spools through an outage):
        silent at two looks apart, with what came between read, it is not that."""
        if self._read.at is None:
            return []
        read_to = min(now, self._read.at)
        silent = {
            entry
            for entry, at in self._latest.items()
            if read_to - at > REAP_AFTER
            and entry not in self._deleted
            and not (self._keeps is not None and self._keeps(entry[0], now))
        }
        due = sorted(silent & self._silent, key=lambda entry: (entry[0], entry[1] or 0))
        self._silent = silent.difference(due)
        self._deleted.update(due)
        return due


async def reap(
    reaper: Reaper,
    read: asyncio.Event,
    publish: Publish,
    topic: str,
    every_s: float | None = None,
) -> None:
    """Once ``read`` is set (the topic was read to its end), and every ``every_s``
    seconds after (None: :data:`REAP_EVERY_S`), publish a tombstone on ``topic`` for each
    entry :meth:`Reaper.due`, on its partition."""
    every_s = REAP_EVERY_S if every_s is None else every_s
    await read.wait()
    while True:
        for ingress_id, partition in reaper.due(utcnow()):
            log.info(
                "deleting ingress %s's entry on %s (partition %s): silent for %s or more, "
                "it stopped without deleting it (killed)",
                ingress_id,
                topic,
                partition,
                REAP_AFTER,
            )
            publish(topic, ingress_id.encode(), None, None, partition)
        await asyncio.sleep(every_s)
