"""What the other ingress processes hold against the hard caps, as they announce it on
the reservations topic (ingress/guards/book_topics.py): their calls in flight and the
costs of their ended calls no state has counted yet (placed costs, kept in
ingress/guards/placed.py). The budget book (ingress/guards/budgets.py) counts them
against each cap beside its own, so N replicas do not each admit what is left."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from decimal import Decimal

from ingress.guards.placed import OthersPlaced
from ingress.guards.sums import RunningSum
from llmtap.events import MISSED_ANNOUNCEMENTS, BudgetState, LatestHeard, Reservations


class OthersHeld:
    """The other ingress processes' announcements, by their ids, and what they hold."""

    def __init__(self) -> None:
        # What the other ingress processes announce they hold (the reservations topic,
        # :meth:`heard`), by their ids; this process's own id, whose it passes over.
        self.others: dict[str, Reservations] = {}
        # The partition each one's announcement in ``others`` was read from: a tombstone
        # on another deletes an entry it left there before the topic grew, not it.
        self._at: dict[str, int | None] = {}
        self.ingress_id = ""
        # What they hold, summed per budget as they are heard (a scan of every process
        # at each admission: ~20 µs a capped call and budget with 20 replicas); and the
        # times between which every one of them is live (then the sums are what is live).
        self._held: dict[str, RunningSum] = defaultdict(RunningSum)
        self.all_live: tuple[datetime, datetime] | None = None
        self._heard = LatestHeard()  # who has gone silent is judged against it
        # The costs each other process announced whose events Kafka has, kept whether it
        # lives or not until a state counts them or their period ends
        # (ingress/guards/placed.py).
        self.placed = OthersPlaced()

    def heard(self, event: Reservations, partition: int | None = None) -> None:
        """Another ingress process's announcement of what it holds (its latest counts).
        One holding nothing (a process stopping says so, then deletes its key:
        :meth:`gone`) is forgotten, and so is every one gone silent: the topic keeps an
        entry for each process killed, and a stopped one's until compaction removes it.

        Silence is judged against the latest announcement heard, not the one in hand:
        the topic is read a partition at a time, so a process long gone, read after a
        live one of another partition, made the live one look ten minutes ahead, and
        it was dropped (a replica starting then did not count what it held)."""
        if event.ingress_id == self.ingress_id:
            return
        heard = self._heard.hear(event)
        self.placed.hear(event.ingress_id, event.at, event.placed, self.others)
        known = self.others.get(event.ingress_id)
        if known is not None and event.at < known.at:
            return
        if event.held and event.live(heard):
            self._hear(event.ingress_id, event)
            self._at[event.ingress_id] = partition
        else:
            self._hear(event.ingress_id, None)
        for gone in [i for i, r in self.others.items() if not r.live(heard)]:
            self._hear(gone, None)
        self.all_live = _live_together(self.others.values())

    def gone(self, key: bytes, partition: int | None = None) -> None:
        """Another ingress process's entry deleted from the topic (its tombstone, after
        the empty announcement it made as it stopped): forgotten, with what it held; not
        by a tombstone on another partition than its announcement's (an entry it left
        there before partitions were added, deleted by a reaper: it lives). Its placed
        costs are kept (:meth:`OthersPlaced.orphaned`): facts, let go only once counted."""
        ingress_id = key.decode(errors="replace")
        at = self._at.get(ingress_id)
        if ingress_id in self.others and (partition is None or at is None or at == partition):
            self._hear(ingress_id, None)
            self.all_live = _live_together(self.others.values())

    def _hear(self, ingress_id: str, event: Reservations | None) -> None:
        """What process ``ingress_id`` holds is ``event``'s (None: nothing, forgotten).
        Its sums change where its amounts do (most are the same at each announcement)."""
        if event is None:
            self._at.pop(ingress_id, None)
        known = self.others.pop(ingress_id, None) if event is None else self.others.get(ingress_id)
        if (event is None) != (known is None):  # it leaves ``others``, or joins it
            if event is not None:
                self.others[ingress_id] = event
            # Its placed costs outlive it; or are in what it holds.
            self.placed.index(ingress_id, self.others)
        before = known.held if known is not None else {}
        after = event.held if event is not None else {}
        for name in before.keys() - after.keys():
            self._held[name].pop(ingress_id, None)
        for name, amount in after.items():
            prior = before.get(name)
            if (  # not the same amount written the same (a sum's digits are its amounts')
                prior is None
                or prior != amount
                or not prior.same_quantum(amount)
                or prior.is_signed() != amount.is_signed()
            ):
                self._held[name][ingress_id] = amount
        if event is not None:
            self.others[ingress_id] = event

    def holding(self, name: str, now: datetime) -> Decimal:
        """What the other live ingress processes last said they hold against budget
        ``name``: their calls in flight count against a cap here too, or N replicas each
        admitted what was left (a $0.01 cap ended at $0.019 over two). They are heard
        within about 0.3 s (announced every 0.2 s when they change), so calls admitted
        by two processes within that time can still pass it together. Costs a process
        holds that a state has counted since it announced them count twice meanwhile:
        stricter, never looser."""
        if not self.others:
            return Decimal(0)
        together = self.all_live
        held = self._held.get(name)
        if together is not None and together[0] <= now <= together[1]:
            if held is None:
                return Decimal(0)
            if held.exact:
                return held.total
        return sum(
            (r.held.get(name, Decimal(0)) for r in self.others.values() if r.live(now)),
            Decimal(0),
        )

    def orphaned(self, name: str, now: datetime, state: BudgetState) -> Decimal:
        """The placed costs of budget ``name`` of processes no longer heard as live
        (:meth:`OthersPlaced.orphaned`)."""
        return self.placed.orphaned(name, now, state, self.others, self.all_live)

    def holds(self, ingress_id: str, judged_by: Callable[[str], BudgetState | None]) -> bool:
        """Whether process ``ingress_id``'s placed costs are held still
        (:meth:`OthersPlaced.holds`)."""
        return self.placed.holds(ingress_id, judged_by, self.others)


def _live_together(announced: Iterable[Reservations]) -> tuple[datetime, datetime] | None:
    """The times at which every one of ``announced`` is live (:meth:`Reservations.live`),
    from and to, both included; None if there are none (or none can be told)."""
    try:
        bounds = [
            (r.at - span, r.at + span)
            for r in announced
            for span in (timedelta(seconds=r.interval_s * MISSED_ANNOUNCEMENTS),)
        ]
    except OverflowError:  # an announcement at the calendar's end: judged one by one
        return None
    if not bounds:
        return None
    start, end = max(b[0] for b in bounds), min(b[1] for b in bounds)
    return (start, end) if start <= end else None
