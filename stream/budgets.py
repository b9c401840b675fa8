"""Budget arithmetic: periods, spend, thresholds, status. Pure functions.

Periods are calendar periods in UTC: a day from midnight, a week from Monday midnight,
a month from the 1st. A budget's state always describes one period; a call from a
later period rolls it over (spend restarts at zero), a call from an earlier, closed
period is not counted in the current one.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from operator import itemgetter
from typing import Literal
from uuid import UUID

from llmtap import wire
from llmtap.amounts import plain
from llmtap.config_sections import BudgetConfig
from llmtap.events import (
    Alert,
    Attribution,
    BudgetPeriod,
    BudgetState,
    stable_id,
)


def period_bounds(period: BudgetPeriod, at: datetime) -> tuple[datetime, datetime]:
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def matches(budget: BudgetConfig, who: Attribution | wire.Attribution) -> bool:
    """Whether a call made by ``who`` counts against ``budget``."""
    if budget.tenant and who.tenant != budget.tenant:
        return False
    return bool(getattr(who, SCOPE_FIELDS[budget.scope]) == budget.value)


# A budget's scope to the attribution field it is matched on.
SCOPE_FIELDS = {
    "tenant": "tenant",
    "team": "team",
    "key": "key_id",
    "user": "user",
    "feature": "feature",
}


class Matching:
    """Which of ``budgets`` a call counts against (:func:`matches`), in their order: found
    by a lookup per attribution field they are scoped on, not by matching each of them
    (with 200 budgets, ~35 µs a call)."""

    def __init__(self, budgets: Iterable[BudgetConfig]) -> None:
        # Attribution field -> its value -> the budgets of that scope and value, ranked.
        self._scoped: dict[str, dict[str, list[tuple[int, BudgetConfig]]]] = {}
        for rank, budget in enumerate(budgets):
            by_value = self._scoped.setdefault(SCOPE_FIELDS[budget.scope], {})
            by_value.setdefault(budget.value, []).append((rank, budget))

    def __call__(self, who: Attribution | wire.Attribution) -> list[BudgetConfig]:
        found: list[tuple[int, BudgetConfig]] = []
        for field, by_value in self._scoped.items():
            found += by_value.get(getattr(who, field), ())
        if len(found) > 1 and len(self._scoped) > 1:
            found.sort(key=itemgetter(0))
        # Of its scope's value, found so: :func:`matches` has only its tenant to ask.
        tenant = who.tenant
        return [budget for _, budget in found if not budget.tenant or budget.tenant == tenant]


def status_of(spent: Decimal, limit: Decimal, crossed: tuple[int, ...]) -> str:
    if spent >= limit:
        return "exhausted"
    return "warning" if crossed else "ok"


def passed(budget: BudgetConfig, spent: Decimal) -> tuple[int, ...]:
    """The thresholds of ``budget`` that ``spent`` has reached of its limit as configured:
    a state's ``crossed`` (the limit in force, not one the state was counted under)."""
    return tuple(t for t in sorted(budget.thresholds) if spent * 100 >= budget.limit_usd * t)


def due(before: BudgetState | None, after: BudgetState) -> list[int]:
    """The thresholds ``after`` has crossed whose alerts ``before`` had not raised: those
    it had not crossed, or all of them when ``before`` was another period's or counted
    under another limit (a threshold's alert is of one limit: threshold_alert's id)."""
    if (
        before is None
        or before.period_start != after.period_start
        or before.limit_usd != after.limit_usd
    ):
        return list(after.crossed)
    return [t for t in after.crossed if t not in before.crossed]


def rejudged(budget: BudgetConfig, state: BudgetState) -> BudgetState:
    """``state`` under ``budget``'s limit, hard cap and thresholds as configured now (the
    same object when they are the state's): its thresholds crossed and status those of
    its spend against the limit in force. A limit raised after a warning leaves the
    state ``ok``; one lowered below the spend makes it ``exhausted``."""
    crossed = passed(budget, state.spent_usd)
    if (state.limit_usd, state.hard_cap, state.crossed) == (
        budget.limit_usd,
        budget.hard_cap,
        crossed,
    ):
        return state
    return state.model_copy(
        update={
            "limit_usd": budget.limit_usd,
            "hard_cap": budget.hard_cap,
            "crossed": crossed,
            "status": status_of(state.spent_usd, budget.limit_usd, crossed),
        }
    )


def fresh(budget: BudgetConfig, at: datetime, now: datetime) -> BudgetState:
    """The state at the start of the period that contains ``at``."""
    start, end = period_bounds(budget.period, at)
    return BudgetState(
        budget=budget.name,
        scope=budget.scope,
        value=budget.value,
        tenant=budget.tenant,
        period=budget.period,
        period_start=start,
        period_end=end,
        limit_usd=budget.limit_usd,
        spent_usd=Decimal(0),
        status="ok",
        hard_cap=budget.hard_cap,
        updated_at=now,
    )


def of_period(budget: BudgetConfig, state: BudgetState, now: datetime) -> bool:
    """Whether ``state`` is still of ``budget``'s period at ``now``: not ended, and of
    the period the budget has now."""
    return now < state.period_end and state.period == budget.period


def current(budget: BudgetConfig, state: BudgetState | None, now: datetime) -> BudgetState:
    """``state`` if it is still this period's (judged by the budget's current settings:
    :func:`rejudged`), else a fresh one: a period rolls over without any call having to
    arrive."""
    if state is None or not of_period(budget, state, now):
        return fresh(budget, now, now)
    return rejudged(budget, state)


def period_time(at: datetime, now: datetime) -> datetime:
    """The time a call ended at ``at`` is counted at: ``at``, or the worker's ``now``
    if ``at`` is ahead of it. Periods move forward by the worker's clock only: one call
    stamped by an ingress whose clock runs ahead, seconds before midnight, started the
    next day early, and the day's spend (what a hard cap holds calls to) went from the
    state, and every call after it, stamped right, counted in no period."""
    return at if at <= now else now


def spend(
    budget: BudgetConfig,
    state: BudgetState | None,
    cost: Decimal,
    at: datetime,
    now: datetime,
    position: tuple[int, int] | None = None,
) -> tuple[BudgetState | None, list[Alert]]:
    """Count a call's cost (ended at ``at``; at ``position`` on the responses topic, when
    it came from there). Returns the new state (None if the call belongs to an already
    closed period and changes nothing) and the alerts it raises: one per threshold
    crossed, once per period and limit (:func:`due`: a state counted under another limit
    raises those the spend is already past of this one at once). The new state keeps the
    offsets ``state`` had counted (a new period too: offsets only grow), and
    ``position``'s. A first state (``state`` None) is ``partial``: the period's calls
    before this one are not in it.

    The period a call counts in is judged by :func:`period_time`: a call stamped
    ahead of the worker's clock counts in the period the worker is in."""
    before = state
    when = period_time(at, now)
    if state is None:  # the first call counted: those before it are not
        state = fresh(budget, when, now).model_copy(update={"partial": True})
    elif when >= state.period_end:
        state = fresh(budget, when, now)  # the first of a new period
    elif when < state.period_start:
        return None, []  # late for a closed period
    spent = state.spent_usd + cost
    crossed = passed(budget, spent)
    last = at if state.last_event_at is None else max(at, state.last_event_at)
    updated = state.model_copy(
        update={
            "limit_usd": budget.limit_usd,
            "hard_cap": budget.hard_cap,
            "spent_usd": spent,
            "crossed": crossed,
            "status": status_of(spent, budget.limit_usd, crossed),
            "last_event_at": last,
            "updated_at": now,
            "applied": applied_with(state, before, position),
        }
    )
    return updated, [threshold_alert(budget, updated, t, when) for t in due(state, updated)]


def threshold_alert(
    budget: BudgetConfig, state: BudgetState, threshold: int, at: datetime
) -> Alert:
    severity: Literal["info", "warning", "critical"] = (
        "critical" if threshold >= 100 else "warning" if threshold >= 80 else "info"
    )
    return _budget_alert(
        budget,
        state,
        at,
        threshold_alert_id(budget, state.period_start, threshold),
        severity,
        f"budget {budget.name!r} ({budget.scope} {budget.value!r}) passed {threshold}% "
        f"of ${plain(budget.limit_usd)}: ${plain(state.spent_usd)} spent this "
        f"{budget.period}",
        Decimal(threshold),
    )


def capped_alert(
    budget: BudgetConfig, state: BudgetState, worst_case: Decimal, left: Decimal, at: datetime
) -> Alert:
    """A hard cap refusing a call, for the ingress to raise: a cap refuses a call whose
    worst case does not fit what is ``left``, so the spend may never reach 100% while its
    calls are refused, and no threshold alert says so. One id per budget, period, limit
    and highest threshold crossed (:func:`capped_alert_id`): the first refusal at each
    level raises it (an early one of a very large call, then the lock-out near the top),
    and every replica raises the same, sent once."""
    level = max(state.crossed, default=0)
    share = (state.spent_usd * 100 / budget.limit_usd).quantize(Decimal("0.1"), ROUND_DOWN)
    return _budget_alert(
        budget,
        state,
        at,
        capped_alert_id(budget, state.period_start, level),
        "critical" if share >= 80 else "warning",  # a lock-out, or one large call
        f"budget {budget.name!r} ({budget.scope} {budget.value!r}) hard cap refused a "
        f"call: its worst case ${plain(worst_case)} is more than the "
        f"${plain(max(left, Decimal(0)))} left of ${plain(budget.limit_usd)} "
        f"(${plain(state.spent_usd)} spent this {budget.period}, {share}%); calls whose "
        f"worst case fits are admitted, the rest refused until "
        f"{state.period_end:%Y-%m-%d %H:%M} UTC",
    )


def _budget_alert(
    budget: BudgetConfig,
    state: BudgetState,
    at: datetime,
    alert_id: UUID,
    severity: Literal["info", "warning", "critical"],
    message: str,
    threshold: Decimal | None = None,
) -> Alert:
    """A budget's alert on its period's spend against its limit."""
    return Alert(
        event_id=alert_id,
        alert_type="budget",
        state="firing",
        severity=severity,
        rule=budget.name,
        dimension=budget.scope,
        value=budget.value,
        tenant=budget.owner,
        metric="spend",
        observed=state.spent_usd,
        baseline=budget.limit_usd,
        threshold=threshold,
        window_start=state.period_start,
        window_end=state.period_end,
        first_seen=at,
        message=message,
        period=budget.period,
    )


def capped_alert_id(budget: BudgetConfig, period_start: datetime, level: int) -> UUID:
    """:func:`capped_alert`'s id: of a budget's period and limit, as a threshold's, and
    of the highest threshold its spend had crossed (``level``; 0: none)."""
    limit = plain(budget.limit_usd)
    return stable_id(*_threshold_of(budget, period_start, level)[:-1], f"capped-{level}", limit)


def threshold_alert_id(budget: BudgetConfig, period_start: datetime, threshold: int) -> UUID:
    """One per budget, period, limit and threshold: a replay of the same calls under the
    same configuration raises the same ids (sent once); a limit changed mid-period raises
    its own thresholds' alerts (50% of $1000 is not 50% of $100, alerted already). Its
    owner too: a name given to another budget within the period raises its own."""
    limit = plain(budget.limit_usd)  # "100", "100.0" and "1E+2" alike
    return stable_id(*_threshold_of(budget, period_start, threshold), limit)


def threshold_alert_id_before_limits(
    budget: BudgetConfig, period_start: datetime, threshold: int
) -> UUID:
    """The id :func:`threshold_alert_id` gave before it named the limit: the store's
    rebuild takes one stored, of the same limit (the alert's baseline), as raised, so an
    upgrade sends no alert of the period again. Of no use once a period has passed."""
    return stable_id(*_threshold_of(budget, period_start, threshold))


def threshold_alert_id_before_owners(
    budget: BudgetConfig, period_start: datetime, threshold: int
) -> UUID:
    """The id threshold alerts had before they named their budget's owner (scope, value,
    tenant) or limit: of the name, period and threshold only (llmtap before 2026-12-01).
    The store's rebuild takes one stored, of the same scope, value and limit, as raised,
    so an upgrade from such a release sends none of the period's alerts again."""
    return stable_id("budget", budget.name, period_start.isoformat(), str(threshold))


def _threshold_of(budget: BudgetConfig, period_start: datetime, threshold: int) -> tuple[str, ...]:
    """What names a threshold of a budget's period, its owner included (both ids')."""
    return (
        "budget",
        budget.name,
        budget.scope,
        budget.value,
        budget.tenant,
        period_start.isoformat(),
        str(threshold),
    )


def remaining(state: BudgetState) -> Decimal:
    return state.limit_usd - state.spent_usd


def applied_with(
    state: BudgetState, before: BudgetState | None, position: tuple[int, int] | None
) -> dict[int, int]:
    """The offsets counted so far (``before``'s carry into a new period: offsets only
    grow) and, when given, the event just counted."""
    applied = dict(before.applied) if before is not None else {}
    applied.update(state.applied)
    if position is not None:
        partition, offset = position
        applied[partition] = max(applied.get(partition, 0), offset + 1)
    return applied


def later_or_larger(new: BudgetState, old: BudgetState) -> bool:
    """Whether ``new`` should replace ``old``: a later period, or more spend in the same."""
    if new.period_start != old.period_start:
        return new.period_start > old.period_start
    return new.spent_usd > old.spent_usd


def is_of(state: BudgetState, budget: BudgetConfig) -> bool:
    """Whether ``state`` (published under ``budget``'s name) counts ``budget``'s calls:
    its scope, value and tenant. One published while the name was another owner's does
    not (its spend is not this budget's, to count on from or to cap by), nor one counted
    over another period (a daily budget made monthly: a day's spend is not the month's,
    and a later period start must not win over the month's state)."""
    if (state.scope, state.value, state.period) != (budget.scope, budget.value, budget.period):
        return False
    return state.tenant is None or state.tenant == budget.tenant


def owned(state: BudgetState, budget: BudgetConfig) -> BudgetState:
    """``state`` (:func:`is_of` ``budget``) saying the tenant it counts: one from before
    states said so would go on saying nothing, and match any tenant all its period."""
    if state.tenant is not None:
        return state
    return state.model_copy(update={"tenant": budget.tenant})
