"""Ended calls' costs a hard cap holds until a published budget state counts them.

Each call admitted against a hard cap ends with its real cost held (:class:`Settled`),
until the stream's published state for the budget has counted its response event.
Admission asks every call what a budget holds so; :class:`Uncounted` keeps the answer
as a running sum, so a call costs the same whatever the stream's lag: a list scanned
at each admission cost ~300 µs a call at 1,300 calls/s (~1,000 costs held while the
stream caught up) and grew with the lag without bound (a stream down for minutes made
every capped call scan every call since). Each cost is looked at a few times in all:
when it is held, when Kafka has its event, when a state counts it, when it ages.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from ingress.guards.sums import RunningSum
from llmtap.events import BudgetState


@dataclass(slots=True)
class Settled:
    """An ended call's cost, held against its budgets until a published state counts it."""

    ended: datetime
    cost: Decimal
    at: tuple[int, int] | None = None  # (partition, offset) of its event on the responses topic
    # Aged before Kafka had its event: the budgets whose period sums hold it (moved to
    # its partition's sum once Kafka has it, BudgetBook._unfold).
    folded: list[str] = field(default_factory=list)
    # Who is told where its event went, once (the budgets' books that hold it).
    listeners: list[Callable[[Settled], None]] = field(default_factory=list)

    def delivered(self, partition: int, offset: int) -> None:
        """The publisher's word that the call's response event is in Kafka, there."""
        self.at = (partition, offset)
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener(self)

    def counted_by(self, state: BudgetState) -> bool:
        return self.at is not None and state.applied.get(self.at[0], 0) > self.at[1]


class Uncounted:
    """One budget's held costs that no published state has counted yet, and their sum.

    A cost is let go once the state held now has counted it: when a state arrives
    (:meth:`counting`) or, if one that counted it came first, when the cost learns where
    its event went (:meth:`placed`). Costs ended before the budget's period are let go
    (:meth:`since`), and those older than the age limit handed to the caller to hold
    otherwise (:meth:`expire`). Costs let go are dropped from the queues below when they
    reach their front, and the queues rebuilt when they hold mostly such."""

    def __init__(self) -> None:
        self._held: dict[int, Settled] = {}  # by id(): what the sum is of
        self._amounts = RunningSum()  # their costs, by id(), and the sum
        self._by_end: deque[Settled] = deque()  # as they were held: by when they ended
        # Those Kafka has, a heap per partition by offset (ties broken by id()).
        self._placed: dict[int, list[tuple[int, int, Settled]]] = {}
        self._queued = 0  # entries in _by_end and _placed, held or not
        # Those held in _placed: the partition of each (by id()), and per partition
        # how many, the latest offset, their sum (:meth:`by_partition`).
        self._in: dict[int, int] = {}
        self._partitions: dict[int, tuple[int, int, Decimal]] = {}
        self._state: BudgetState | None = None
        self._since: datetime | None = None

    def __len__(self) -> int:
        return len(self._held)

    @property
    def total(self) -> Decimal:
        return self._amounts.total

    @property
    def idle(self) -> bool:
        """Nothing held, and nothing left in line for :meth:`expire` to let go."""
        return not self._held and not self._by_end

    def costs(self) -> list[Settled]:
        """Those held, in the order they were."""
        return [c for c in self._by_end if id(c) in self._held]

    def by_partition(self) -> dict[int, tuple[int, Decimal]]:
        """The costs held whose events Kafka has, per partition: the latest one's offset
        and their sum (what a state must count past to count them all)."""
        return {p: (latest, total) for p, (_, latest, total) in self._partitions.items()}

    def add(self, cost: Settled) -> None:
        if self._since is not None and cost.ended < self._since:
            return  # an earlier period's
        self._held[id(cost)] = cost
        self._amounts[id(cost)] = cost.cost
        self._by_end.append(cost)
        self._queued += 1
        if cost.at is None:
            cost.listeners.append(self.placed)
        else:
            self.placed(cost)

    def placed(self, cost: Settled) -> None:
        """Kafka has ``cost``'s event (at ``cost.at``)."""
        if id(cost) not in self._held or cost.at is None:
            return
        if self._state is not None and cost.counted_by(self._state):
            self._let_go(cost)
            return
        partition, offset = cost.at
        heapq.heappush(self._placed.setdefault(partition, []), (offset, id(cost), cost))
        self._queued += 1
        self._in[id(cost)] = partition
        n, latest, total = self._partitions.get(partition, (0, -1, Decimal(0)))
        self._partitions[partition] = (n + 1, max(latest, offset), total + cost.cost)

    def counting(self, state: BudgetState) -> None:
        """The state held now for the budget: the costs it has counted are let go."""
        self._state = state
        for partition, applied in state.applied.items():
            heap = self._placed.get(partition)
            while heap and heap[0][0] < applied:
                cost = heapq.heappop(heap)[2]
                self._queued -= 1
                if id(cost) in self._held:
                    self._let_go(cost)
        self._compact()

    def since(self, start: datetime) -> None:
        """The budget's period starts at ``start``: costs ended before it are let go (a
        scan, once a period)."""
        if self._since is not None and start <= self._since:
            return
        self._since = start
        for cost in [c for c in self._held.values() if c.ended < start]:
            self._let_go(cost)
        self._compact()

    def expire(self, cutoff: datetime, age: Callable[[Settled], None]) -> None:
        """Costs that ended by ``cutoff`` are let go, each handed to ``age`` (they were
        held in order of their ends, give or take the calls ending together)."""
        while self._by_end:
            cost = self._by_end[0]
            held = id(cost) in self._held
            if held and cost.ended > cutoff:
                break
            self._by_end.popleft()
            self._queued -= 1
            if held:
                self._let_go(cost)
                age(cost)

    def _let_go(self, cost: Settled) -> None:
        del self._held[id(cost)]
        del self._amounts[id(cost)]
        partition = self._in.pop(id(cost), None)
        if partition is not None:
            n, latest, total = self._partitions[partition]
            if n == 1:
                del self._partitions[partition]
            else:
                self._partitions[partition] = (n - 1, latest, total - cost.cost)
        if self.placed in cost.listeners:
            cost.listeners.remove(self.placed)

    def _compact(self) -> None:
        if self._queued <= 2 * len(self._held) + 1024:
            return
        self._by_end = deque(c for c in self._by_end if id(c) in self._held)
        for partition, heap in self._placed.items():
            kept = [entry for entry in heap if id(entry[2]) in self._held]
            heapq.heapify(kept)
            self._placed[partition] = kept
        self._queued = len(self._by_end) + sum(len(h) for h in self._placed.values())
