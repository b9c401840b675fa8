"""Other ingress processes' placed costs: the costs of ended calls another process
announced in :attr:`Reservations.placed <llmtap.events.Reservations.placed>` (Kafka has
their events), kept until a budget state counts past them or their period ends, whether
that process lives or not (stopped, killed, gone silent). The budget book holds one
(:class:`OthersPlaced`), in what it keeps of the other processes
(ingress/guards/others.py), and hands it what of its own state it needs: the processes
it hears as live (``others``), the times between which every one of them is live, and
the states it judges by.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from decimal import Decimal

from llmtap.events import BudgetState, PlacedCosts, Reservations

# Another ingress's placed costs (ended calls, Kafka has their events) announced
# unchanged this long, and not counted by the state held here: spend, not a hold that
# settles (a live process tells them with each announcement, within 0.2 s of a state
# counting them; and the state held here is asked too).
PLACED_SETTLE = timedelta(seconds=30)


class OthersPlaced:
    """What the other ingress processes placed, by process and by budget."""

    def __init__(self) -> None:
        # The costs each other process announced whose events Kafka has (its latest
        # announcement's time, and them), by its id: facts, kept whether it lives or not
        # (stopped, killed, gone silent) until a state counts them or their period ends
        # (:meth:`orphaned`), not let go with its liveness as what it holds in flight.
        self._placed_by: dict[str, tuple[datetime, tuple[PlacedCosts, ...]]] = {}
        # When each other process's placed costs were first announced as they are, by
        # budget, process and partition (:meth:`ended`): announced unchanged a
        # while and not counted, they are spent, not held for a moment.
        self._placed_since: dict[str, dict[str, dict[int, tuple[PlacedCosts, datetime]]]] = {}
        # The placed costs of the processes not in ``others`` (stopped, killed, dropped
        # as silent), by budget and process (:meth:`orphaned`), and their sum per budget
        # as the state it was reckoned against counts them, reckoned again only when
        # either changes: admission does not walk every process's entries (a walk cost
        # ~250 µs to 2 ms a call after a rolling deploy with the stream down). A live
        # process's are in what it holds, and not looked at.
        self._orphans: dict[str, dict[str, tuple[PlacedCosts, ...]]] = {}
        # Each process's placed costs by budget (a silent one's, while it is not dropped
        # yet, are looked at per call: a budget's entries, not all of them).
        self._placed_of: dict[str, dict[str, tuple[PlacedCosts, ...]]] = {}
        self._orphans_sum: dict[str, tuple[BudgetState, Decimal]] = {}
        self._indexed: dict[str, set[str]] = {}  # the budgets each is in _orphans under

    def hear(
        self,
        ingress_id: str,
        at: datetime,
        placed: tuple[PlacedCosts, ...],
        others: dict[str, Reservations],
    ) -> None:
        """Process ``ingress_id``'s announcement at ``at`` of its ``placed`` costs, told
        unless an earlier one than those held (``others``: the processes heard live)."""
        told = self._placed_by.get(ingress_id)
        if (placed or told is not None) and (told is None or at >= told[0]):
            self._tell(ingress_id, at, placed, others)

    def _tell(
        self,
        ingress_id: str,
        at: datetime,
        placed: tuple[PlacedCosts, ...],
        others: dict[str, Reservations],
    ) -> None:
        """Process ``ingress_id`` told at ``at`` that it has ``placed`` (all of them)."""
        told = self._placed_by.pop(ingress_id, None)
        self._placed_of.pop(ingress_id, None)
        before: dict[tuple[str, int], tuple[PlacedCosts, datetime]] = {}
        for name in {p.budget for p in told[1]} if told is not None else ():
            by = self._placed_since.get(name, {})
            for partition, entry in by.pop(ingress_id, {}).items():
                before[name, partition] = entry
            if not by:
                self._placed_since.pop(name, None)
        if placed:
            self._placed_by[ingress_id] = (at, placed)
            self._placed_of[ingress_id] = _by_budget(placed)
        for p in placed:
            prior = before.get((p.budget, p.partition))
            entry = prior if prior is not None and prior[0] == p else (p, at)
            self._placed_since.setdefault(p.budget, {}).setdefault(ingress_id, {})[p.partition] = (
                entry
            )
        self.index(ingress_id, others)

    def _keep(
        self, ingress_id: str, kept: tuple[PlacedCosts, ...], others: dict[str, Reservations]
    ) -> None:
        """Of process ``ingress_id``'s placed costs, only ``kept`` are held still (the
        others counted, or of an earlier period)."""
        told = self._placed_by.get(ingress_id)
        if told is None:
            return
        ids = {id(p) for p in kept}
        for p in told[1]:
            by = self._placed_since.get(p.budget, {})
            parts = by.get(ingress_id, {})
            if id(p) not in ids and p.partition in parts and parts[p.partition][0] == p:
                del parts[p.partition]
                if not parts:
                    del by[ingress_id]
                if not by:
                    self._placed_since.pop(p.budget, None)
        if kept:
            self._placed_by[ingress_id] = (told[0], kept)
            self._placed_of[ingress_id] = _by_budget(kept)
        else:
            del self._placed_by[ingress_id]
            self._placed_of.pop(ingress_id, None)
        self.index(ingress_id, others)

    def index(self, ingress_id: str, others: dict[str, Reservations]) -> None:
        """Process ``ingress_id``'s placed costs are in :attr:`_orphans` if it is not in
        ``others``, not if it is (a look at its entries as it joins or leaves ``others``,
        or tells them: not at each call)."""
        for name in self._indexed.pop(ingress_id, ()):
            by = self._orphans.get(name, {})
            by.pop(ingress_id, None)
            if not by:
                self._orphans.pop(name, None)
            self._orphans_sum.pop(name, None)
        told = self._placed_by.get(ingress_id)
        if told is None or ingress_id in others:
            return
        grouped = self._placed_of[ingress_id]
        for name, entries in grouped.items():
            self._orphans.setdefault(name, {})[ingress_id] = entries
            self._orphans_sum.pop(name, None)
        self._indexed[ingress_id] = set(grouped)

    def orphaned(
        self,
        name: str,
        now: datetime,
        state: BudgetState,
        others: dict[str, Reservations],
        together: tuple[datetime, datetime] | None,
    ) -> Decimal:
        """The placed costs (:class:`PlacedCosts`) against budget ``name`` that processes
        no longer live announced (stopped, killed, silent), ``state`` (the budget's
        current) has not counted: a restarted or dead process's ended calls stay on the
        cap until the stream counts them, its successor reading them on the topic at
        start. Those counted, or of an earlier period, are let go. A live process's are
        in what it holds (ingress/guards/others.py, ``OthersHeld.holding``), not counted
        twice. Those of processes out of ``others`` are summed as they or ``state``
        change (:attr:`_orphans`); those of a process in it gone silent, not dropped yet,
        looked for only while one may be (every one live at ``now``: none looked at).
        ``together``: the times between which every one of ``others`` is live
        (``OthersHeld.all_live``)."""
        total = self._orphans_total(name, state, others) if self._orphans else Decimal(0)
        if not others or (together is not None and together[0] <= now <= together[1]):
            return total
        for ingress_id, announced in others.items():
            entries = self._placed_of.get(ingress_id, {}).get(name)
            if not entries or announced.live(now):
                continue
            total += sum((p.usd for p in entries if not _settled_by(p, state)), Decimal(0))
        return total

    def _orphans_total(
        self, name: str, state: BudgetState, others: dict[str, Reservations]
    ) -> Decimal:
        """The sum of :attr:`_orphans` against budget ``name`` that ``state`` has not
        counted: reckoned again (those counted let go) only when they or what ``state``
        counts (its period, its offsets) changed since it last was."""
        by = self._orphans.get(name)
        if not by:
            return Decimal(0)
        cached = self._orphans_sum.get(name)
        if cached is not None and (
            cached[0].applied is state.applied and cached[0].period_start == state.period_start
        ):
            return cached[1]
        for ingress_id, entries in list(by.items()):
            if any(_settled_by(p, state) for p in entries):
                told = self._placed_by[ingress_id][1]
                self._keep(
                    ingress_id,
                    tuple(p for p in told if p.budget != name or not _settled_by(p, state)),
                    others,
                )
        total = sum(
            (p.usd for entries in self._orphans.get(name, {}).values() for p in entries),
            Decimal(0),
        )
        self._orphans_sum[name] = (state, total)
        return total

    def holds(
        self,
        ingress_id: str,
        judged_by: Callable[[str], BudgetState | None],
        others: dict[str, Reservations],
    ) -> bool:
        """Whether process ``ingress_id``'s placed costs are held still (its entry on the
        reservations topic is then kept: a process starting later reads them there).
        ``judged_by``: the state a budget's are judged by (None: not held, the budget
        not hard-capped here)."""
        told = self._placed_by.get(ingress_id)
        if told is None:
            return False
        kept = tuple(
            p
            for p in told[1]
            if (state := judged_by(p.budget)) is not None and not _settled_by(p, state)
        )
        if len(kept) != len(told[1]):
            self._keep(ingress_id, kept, others)
        return bool(kept)

    def ended(self, name: str, now: datetime, state: BudgetState) -> Decimal:
        """The placed costs against budget ``name`` that other processes (live, stopped
        or killed) have announced unchanged for PLACED_SETTLE, ``state`` not counting
        them."""
        settled = now - PLACED_SETTLE
        total = Decimal(0)
        for parts in self._placed_since.get(name, {}).values():
            total += sum(
                (
                    p.usd
                    for p, since in parts.values()
                    if since <= settled
                    and p.period_start == state.period_start
                    and not _settled_by(p, state)
                ),
                Decimal(0),
            )
        return total


def _by_budget(placed: Iterable[PlacedCosts]) -> dict[str, tuple[PlacedCosts, ...]]:
    grouped: dict[str, list[PlacedCosts]] = defaultdict(list)
    for p in placed:
        grouped[p.budget].append(p)
    return {name: tuple(entries) for name, entries in grouped.items()}


def _settled_by(placed: PlacedCosts, state: BudgetState) -> bool:
    """Whether ``state`` (of ``placed``'s budget) has counted ``placed``'s costs, or is
    of a later period than theirs."""
    return placed.period_start < state.period_start or (
        state.applied.get(placed.partition, 0) > placed.through
    )
