"""Budgets as the API and the dashboard show them: the configured budgets, with the
stream's latest state.

The stream publishes each budget's period-to-date spend on the compacted topic
``llmtap.budgets``. The store process follows it with the ingress's own follower
(:func:`ingress.guards.book_topics.follow`) into a :class:`BudgetBook` (one per app, set up
by :func:`sql.analytics.add_routes`), of which only the states are used here (same rule
for which state to keep as the ingress). The configuration says which budgets exist and
whom they belong to, and :func:`may_see` which of them a key may see (the same rule,
with :func:`alert_keys`, decides which budget alerts it sees); a budget whose state has
not been seen yet (or whose state counts another owner's calls) is unknown, never $0
spent. What the ingress processes hold against the hard caps (their calls in flight)
comes from the reservations topic (:class:`ReservationBook`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from aiohttp import web

from ingress.guards.book_topics import follow
from ingress.guards.budgets import BudgetBook
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import BudgetState, LatestHeard, Reservations
from llmtap.following import follow_topic
from sql.params import Scope
from stream.budgets import current, is_of
from stream.catalog import Catalog

BUDGET_BOOK = web.AppKey("budget_book", BudgetBook)


class ReservationBook:
    """The latest :class:`Reservations` of every ingress process that may be live.

    The topic keeps an entry for each process started (a new id each start): a stopped
    one's until compaction removes the key it deleted (its tombstone, :meth:`gone`), a
    killed one's for good. One silent since before the latest announcement heard is
    forgotten, as it can never be live again, or each restart of an ingress was kept
    for good, and scanned at each request (10,000 gone: 40 MB, 33 ms a request)."""

    # Those gone are looked for once this many more are kept than twice the last count.
    slack = 64

    def __init__(self) -> None:
        self.latest: dict[str, Reservations] = {}
        self._heard = LatestHeard()  # who has gone silent is judged against it
        # How many were kept when those gone were last forgotten (then again at twice as many).
        self._kept = 0

    def update(self, event: Reservations) -> None:
        held = self.latest.get(event.ingress_id)
        if held is None or event.at >= held.at:
            self.latest[event.ingress_id] = event
        heard = self._heard.hear(event)
        if len(self.latest) > 2 * self._kept + self.slack:
            self._forget_gone(heard)

    def gone(self, key: bytes) -> None:
        """A process's entry deleted from the topic (its tombstone, after the empty
        announcement it made as it stopped): forgotten."""
        self.latest.pop(key.decode(errors="replace"), None)

    def _forget_gone(self, heard: datetime) -> None:
        """Forget the processes silent since before ``heard`` for longer than they may
        be (:meth:`Reservations.live`): not live at ``heard``, nor at any time after."""
        self.latest = {
            ingress: r for ingress, r in self.latest.items() if r.at >= heard or r.live(heard)
        }
        self._kept = len(self.latest)

    def reserved(self, now: datetime) -> dict[str, Decimal] | None:
        """Per budget, what the live ingress processes hold (:meth:`Reservations.live`);
        None when none is live (nothing known, which is not the same as nothing held)."""
        live = [r for r in self.latest.values() if r.live(now)]
        if not live:
            return None
        total: dict[str, Decimal] = {}
        for r in live:
            for name, amount in r.held.items():
                total[name] = total.get(name, Decimal(0)) + amount
        return total


RESERVATION_BOOK = web.AppKey("reservation_book", ReservationBook)


def visible_budgets(budgets: Iterable[BudgetConfig], scope: Scope) -> list[BudgetConfig]:
    """The budgets a caller of ``scope`` may see (:func:`may_see`), in their order."""
    return [b for b in budgets if may_see(b, scope)]


def may_see(budget: BudgetConfig, scope: Scope) -> bool:
    """Whether a caller of ``scope`` may see ``budget``: an admin every budget; a virtual
    key those confined to its tenant (a tenant budget on it, or one whose ``tenant`` is
    it); a key bound to a team only that team's budgets, a key bound to a user (to a
    team too, or not) only that user's."""
    if scope.tenant is None:
        return True
    owner = budget.owner
    if not owner or owner != scope.tenant:  # "": every tenant's, for admins only
        return False
    if scope.user is not None:
        return budget.scope == "user" and budget.value == scope.user
    if scope.team is not None:
        return budget.scope == "team" and budget.value == scope.team
    return True


def alert_keys(budgets: Iterable[BudgetConfig | BudgetRow]) -> list[tuple[str, str, str]]:
    """What the alerts of ``budgets`` carry as (rule, dimension, value): each one's
    (name, scope, value). Matched on all three, not the name alone: a name once given to
    another owner would bring that owner's alerts; and the query matches the alert's
    tenant too (one stored before alerts had tenants has none, and matches on these)."""
    return [(b.name, b.scope, b.value) for b in budgets]


def budget_follower(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: ``app[BUDGET_BOOK]`` and ``app[RESERVATION_BOOK]``, following
    the budgets and reservations topics while the app runs (only when budgets are
    configured)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        # No prices are needed: this book is never asked to admit or settle a call.
        book = app[BUDGET_BOOK] = BudgetBook(
            settings.budgets, Catalog(models={}), settings.budget_default_max_tokens
        )
        held = app[RESERVATION_BOOK] = ReservationBook()
        tasks = []
        if settings.budgets:
            kafka = settings.kafka
            tasks.append(
                asyncio.create_task(follow(book, kafka, "store-budgets"), name="budget-states")
            )
            reservations = follow_topic(
                kafka.names.reservations,
                Reservations,
                held.update,
                kafka,
                "store-reservations",
                held.gone,
            )
            tasks.append(asyncio.create_task(reservations, name="budget-reservations"))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return context


@dataclass(frozen=True)
class BudgetRow:
    name: str
    scope: str
    value: str
    tenant: str
    period: str
    limit_usd: Decimal
    hard_cap: bool
    state: BudgetState | None  # None: no state seen on the topic yet
    # What live ingress processes hold against it (hard caps only; 0 otherwise); None:
    # no ingress heard from.
    reserved_usd: Decimal | None = None

    @property
    def spent_usd(self) -> Decimal | None:
        return None if self.state is None else self.state.spent_usd

    @property
    def remaining_usd(self) -> Decimal | None:
        return None if self.state is None else self.limit_usd - self.state.spent_usd

    @property
    def used_percent(self) -> Decimal | None:
        if self.state is None:
            return None
        return (self.state.spent_usd * 100 / self.limit_usd).quantize(Decimal("0.1"))

    @property
    def status(self) -> str:
        return "unknown" if self.state is None else self.state.status

    @property
    def period_start(self) -> datetime | None:
        return None if self.state is None else self.state.period_start

    @property
    def period_end(self) -> datetime | None:
        return None if self.state is None else self.state.period_end

    @property
    def thresholds_crossed(self) -> list[int] | None:
        return None if self.state is None else list(self.state.crossed)

    @property
    def updated_at(self) -> datetime | None:
        return None if self.state is None else self.state.updated_at


def budget_rows(
    budgets: Iterable[BudgetConfig],
    states: Mapping[str, BudgetState],
    scope: Scope,
    now: datetime,
    reserved: Mapping[str, Decimal] | None = None,
) -> list[BudgetRow]:
    """The budgets ``scope`` may see (:func:`visible_budgets`), in configuration order, each
    with its state as of ``now`` (none: unknown, also when the state held is another
    owner's, :func:`is_of`) (a period that has ended rolls over to a fresh
    one, as the stream's does) and what is ``reserved`` against it (None: unknown)."""
    rows = []
    for budget in visible_budgets(budgets, scope):
        held = states.get(budget.name)
        if held is not None and not is_of(held, budget):
            held = None  # another owner's spend: unknown, not shown as this one's
        state = current(budget, held, now) if held is not None else None
        rows.append(
            BudgetRow(
                name=budget.name,
                scope=budget.scope,
                value=budget.value,
                tenant=budget.tenant,
                period=budget.period,
                limit_usd=budget.limit_usd,
                hard_cap=budget.hard_cap,
                state=state,
                reserved_usd=None if reserved is None else reserved.get(budget.name, Decimal(0)),
            )
        )
    return rows
