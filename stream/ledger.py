"""The ledger: every configured budget's current state, as the budgets step keeps it
(the arithmetic is in stream/budgets.py).

Exactly once: each state carries, per responses partition, the next offset it has not
counted (``applied``), and is published as one message, so the spend and the position
it was counted up to cannot disagree. A worker that restarts from older committed
offsets (it was killed after publishing a state, before committing) skips, budget by
budget, every event that budget's state has already counted. Duplicates with different
offsets (a costed event produced twice) are dropped by event id while they are among
the last ``remember`` events seen; their offsets, and those of calls whose cost is
unknown, are still counted past (an ingress holding a call's cost against a hard cap
waits for a state whose offset has passed the call's event). States seeded from the
budgets topic (the worker's own earlier output, or the store's rebuild from
ClickHouse) never lower the spend of a period: within a period, spend only grows.

**Counted, then stated.** Most calls change only a budget's spend, its latest call and
its offsets: no threshold crossed, no new period, no change of status. Those are
counted into a small running total (:class:`_Counted`), and the budget's state is made
from it when asked for (the step asks once per batch, to publish it): a pydantic copy
per call and budget was a tenth of the worker's time (bench/results/stream.md). A call
that does more goes through :func:`stream.budgets.spend`, as every call did, so both
ways give the same state (tests/test_budgets.py).
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from llmtap import logs, wire
from llmtap.config_sections import BudgetConfig
from llmtap.events import Alert, BudgetState
from stream.budgets import (
    Matching,
    applied_with,
    current,
    due,
    is_of,
    later_or_larger,
    owned,
    period_time,
    spend,
    status_of,
    threshold_alert,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Counted:
    """What was counted into a budget since its state was last made."""

    spent: Decimal
    last_event_at: datetime | None
    applied: dict[int, int]
    now: datetime


ZERO = Decimal(0)


class Ledger:
    def __init__(self, budgets: list[BudgetConfig], remember: int = 200_000) -> None:
        self.budgets = {b.name: b for b in budgets}
        # A call's budgets, found by a lookup per field, not by matching every budget.
        self._matching = Matching(self.budgets.values())
        self._states: dict[str, BudgetState] = {}
        self._counted: dict[str, _Counted] = {}
        # Budgets whose state was seeded (the topic's) and not judged yet by the limit
        # and thresholds configured here (it may have been counted under others): their
        # next call goes through spend, and the next roll judges them.
        self._unjudged: set[str] = set()
        # Budgets whose state the store's rebuild made whole (no longer ``partial``) or
        # larger: published at the next roll, with or without a call (an ingress judges a
        # hard cap only on a whole state).
        self._restated: set[str] = set()
        # Ids in arrival order; OrderedDict drops its oldest in O(1) (a dict's
        # `del d[next(iter(d))]` rescans the deleted slots: ~40 µs a call at 200,000).
        self._seen: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._remember = remember
        # Calls counted in no period: ended in one its budget had rolled past (read after
        # the roll: appended after the stage's watermark passed the period's end, or
        # after a call of the next period rolled the budget). Logged once a budget and
        # period.
        self.late = 0
        self._warned = logs.Once()
        # Each budget's closing period, rolled past by a call of the next one read before
        # the stage's watermark passed the period's end (a backlog across it, read one
        # partition before another): its calls read meanwhile are counted in it, their
        # thresholds alerted, until a roll at or past its end makes it final
        # (:meth:`roll`). Its states changed since last published: :meth:`closings`.
        self._closing: dict[str, BudgetState] = {}
        self._closed: dict[str, BudgetState] = {}

    @property
    def states(self) -> Mapping[str, BudgetState]:
        """Every budget's state, with all it has counted."""
        for name in list(self._counted):
            self.state(name)
        return self._states

    def state(self, name: str) -> BudgetState:
        """One budget's state, with all it has counted."""
        counted = self._counted.pop(name, None)
        state = self._states[name]
        if counted is not None:
            state = self._states[name] = state.model_copy(
                update={
                    "spent_usd": counted.spent,
                    "last_event_at": counted.last_event_at,
                    "updated_at": counted.now,
                    "applied": counted.applied,
                }
            )
        return state

    def seed(self, state: BudgetState) -> None:
        budget = self.budgets.get(state.budget)
        if budget is None or not is_of(state, budget):  # its name was another's
            return
        state = owned(state, budget)
        mine = self.states.get(state.budget)
        if mine is not None and not state.applied and later_or_larger(state, mine):
            # The store's rebuild (no offsets) with more spend: taken with the offsets
            # this ledger's state counted, as :meth:`rebuilt` does (the partitions are
            # read on from them; its calls read again from an older commit are in both).
            state = _with_offsets_of(state, mine)
        if mine is None or later_or_larger(state, mine):
            self._states[state.budget] = _whole_if(state, mine)
            self._unjudged.add(state.budget)
        elif later_or_larger(mine, state):
            self._states[state.budget] = _whole_if(mine, state)
        elif state.applied != mine.applied and all(
            state.applied.get(partition, 0) >= offset for partition, offset in mine.applied.items()
        ):
            # The same spend, counted further (past calls that cost nothing). Not offsets
            # merged from two states that each counted what the other had not (two
            # workers counting for a while: one whose membership lapsed unseen): the
            # same spend by chance, and the calls only one of them counted lost.
            further = mine.model_copy(update={"applied": state.applied})
            self._states[state.budget] = _whole_if(further, state)
        else:
            self._states[state.budget] = _whole_if(mine, state)

    def rebuilt(self, state: BudgetState) -> bool:
        """A state that counted no partition (no offsets: the store's rebuild from
        ClickHouse, published as it starts), followed while this worker counts: its
        spend taken if larger in the same period (the largest spend seen wins), with the
        offsets this ledger counted kept (it reads the partitions on from them); its own,
        counted from its first call (``partial``), made whole by it. The first state of
        a budget this ledger has none of yet (its first roll to come) is taken as it is.
        False if this ledger has no state of that period to judge it by, or ``state`` is
        no rebuild (a worker's first, ``partial``)."""
        budget = self.budgets.get(state.budget)
        if budget is None or not is_of(state, budget):
            return True  # not this budget's: nothing to take, now or later
        if state.partial:
            return False
        mine = self.states.get(state.budget)
        if mine is None:
            self.seed(state)
            return True
        if mine.period_start != state.period_start:
            return False
        if state.spent_usd <= mine.spent_usd:
            if mine.partial:  # the largest spend seen wins: its own, now whole
                self._states[state.budget] = mine.model_copy(update={"partial": False})
                self._restated.add(state.budget)
            return True
        self._states[state.budget] = _with_offsets_of(owned(state, budget), mine)
        self._unjudged.add(state.budget)
        self._restated.add(state.budget)
        return True

    def record(
        self, event: wire.Costed, now: datetime, position: tuple[int, int] | None = None
    ) -> tuple[set[str], list[Alert]]:
        """Count one costed event against every budget it matches; the names of the
        budgets it changed (:meth:`state` has their new states) and the alerts it
        raised. ``position`` is the event's (partition, offset) on the responses topic,
        when it came from there."""
        repeat = event.event_id in self._seen
        if not repeat:
            self._seen[event.event_id] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        # A repeat, or a call whose cost is unknown, adds nothing to any spend, but is
        # counted past: its offset goes into the states, so an ingress holding the
        # call's cost against a hard cap learns the stream has read it.
        cost = ZERO if repeat or event.cost is None else event.cost.total
        if not cost and position is None:
            return set(), []
        changed: set[str] = set()
        alerts: list[Alert] = []
        response = event.response
        at = response.ts_end
        for budget in self._matching(response.attribution):
            name = budget.name
            before = self._states.get(name)
            counted = self._counted.get(name)
            if before is not None and position is not None:
                partition, offset = position
                applied = before.applied if counted is None else counted.applied
                if offset < applied.get(partition, 0):
                    continue  # counted before a restart: this state says so
            if (
                before is not None
                and name not in self._unjudged
                and self._count(budget, before, counted, cost, at, now, position)
            ):
                changed.add(name)
                continue
            if before is not None:
                before = self.state(name)
            state, raised = spend(budget, before, cost, at, now, position)
            if state is None:
                if self._into_closing(budget, cost, at, now, position, alerts):
                    changed.add(name)
                else:
                    self._late(name, before, at)
                continue
            if before is not None and state.period_start != before.period_start:
                # The first call of a new period: the closing one's calls still unread
                # (on other partitions) count in it until the watermark passes its end.
                self._closing[name] = self._closed[name] = before
            self._states[name] = state
            self._unjudged.discard(name)
            changed.add(name)
            alerts.extend(raised)
        return changed, alerts

    def _into_closing(
        self,
        budget: BudgetConfig,
        cost: Decimal,
        at: datetime,
        now: datetime,
        position: tuple[int, int] | None,
        alerts: list[Alert],
    ) -> bool:
        """Count a call of a closed period into the budget's closing period, if it is
        that one's (its alerts, with the ids they would have had, into ``alerts``); the
        current state counts past its offset (a worker restarted from it skips it)."""
        name = budget.name
        closing = self._closing.get(name)
        if closing is None or not closing.period_start <= period_time(at, now) < closing.period_end:
            return False
        state, raised = spend(budget, closing, cost, at, now, position)
        assert state is not None  # of the closing period
        self._closing[name] = self._closed[name] = state
        alerts.extend(raised)
        if position is not None:
            # No running total here: record() took the state whole (Ledger.state) first.
            partition, offset = position
            current = self._states[name]
            if offset + 1 > current.applied.get(partition, 0):
                applied = {**current.applied, partition: offset + 1}
                self._states[name] = current.model_copy(update={"applied": applied})
        return True

    def forget_closings(self) -> None:
        """Partitions given again (another worker may have counted meanwhile): closing
        periods kept are no longer counted into (their states stay to be published)."""
        self._closing.clear()

    def closings(self) -> list[BudgetState]:
        """The closing periods' states changed since last asked (counted into, or final
        as a call of the next period rolled their budget): published before their
        budgets' current states, so the compacted topic keeps the current one."""
        closed, self._closed = self._closed, {}
        return list(closed.values())

    def _late(self, name: str, state: BudgetState | None, at: datetime) -> None:
        self.late += 1
        if state is not None and self._warned.first((name, state.period_start)):
            log.warning(
                "budget %r: a call ended %s, read after its period closed (the budget is "
                "counting from %s), is counted in no period",
                name,
                at.isoformat(),
                state.period_start.isoformat(),
            )

    def _count(
        self,
        budget: BudgetConfig,
        state: BudgetState,
        counted: _Counted | None,
        cost: Decimal,
        at: datetime,
        now: datetime,
        position: tuple[int, int] | None,
    ) -> bool:
        """Count the call into the budget's running total if all it changes is the
        spend, the latest call and the offsets; False (nothing counted) if it does more
        (a new or closed period, a threshold, a change of status)."""
        if not state.period_start <= period_time(at, now) < state.period_end:
            return False
        spent = (state.spent_usd if counted is None else counted.spent) + cost
        limit = budget.limit_usd
        if status_of(spent, limit, state.crossed) != state.status:
            return False
        for threshold in budget.thresholds:
            if threshold not in state.crossed and spent * 100 >= limit * threshold:
                return False
        if counted is None:
            counted = self._counted[state.budget] = _Counted(
                state.spent_usd, state.last_event_at, dict(state.applied), now
            )
        counted.spent = spent
        if counted.last_event_at is None or at > counted.last_event_at:
            counted.last_event_at = at
        counted.now = now
        if position is not None:
            partition, offset = position
            if offset + 1 > counted.applied.get(partition, 0):
                counted.applied[partition] = offset + 1
        return True

    def roll(self, now: datetime) -> tuple[list[BudgetState], list[Alert]]:
        """Budgets whose period ended (or that have no state yet: ``partial``), whose
        state was counted under another limit or thresholds, or that took the store's
        rebuild (:meth:`rebuilt`): their new states, and the alerts of the thresholds the
        spend is already past of a limit changed mid-period (raised at once: a limit
        lowered below the spend is news)."""
        rolled, alerts = [], []
        restated, self._restated = self._restated, set()
        for name, closing in list(self._closing.items()):
            if closing.period_end <= now:  # every call ended in it read: final
                del self._closing[name]
        for name, budget in self.budgets.items():
            before = self.state(name) if name in self._states else None
            after = current(budget, before, now)
            if before is None:  # its first state: the period's spend so far is not in it
                after = after.model_copy(update={"partial": True})
            self._unjudged.discard(name)
            if after is not before or name in restated:
                after = _carry_applied(after, before)
                self._states[name] = after
                rolled.append(after)
                alerts += [threshold_alert(budget, after, t, now) for t in due(before, after)]
        return rolled, alerts


def _whole_if(kept: BudgetState, other: BudgetState | None) -> BudgetState:
    """``kept`` (of two states of a budget, the one kept), no longer ``partial`` when
    ``other``, of the same period, is not: the larger spend seen wins, and one of the
    two counted the period from its start."""
    if (
        kept.partial
        and other is not None
        and not other.partial
        and other.period_start == kept.period_start
    ):
        return kept.model_copy(update={"partial": False})
    return kept


def _with_offsets_of(rebuild: BudgetState, mine: BudgetState) -> BudgetState:
    """The store's ``rebuild`` (no offsets) with the offsets ``mine`` counted, and its
    latest call if later."""
    last = mine.last_event_at
    if rebuild.last_event_at is not None and (last is None or rebuild.last_event_at > last):
        last = rebuild.last_event_at
    return rebuild.model_copy(update={"applied": mine.applied, "last_event_at": last})


def _carry_applied(state: BudgetState, before: BudgetState | None) -> BudgetState:
    """``state`` with the offsets ``before`` had counted (offsets only grow)."""
    applied = applied_with(state, before, None)
    if applied == state.applied:
        return state
    return state.model_copy(update={"applied": applied})
