"""Budgets as the API and the dashboard show them: the configured budgets, with the
stream's latest state.

The stream publishes each budget's period-to-date spend on the compacted topic
``llmtap.budgets``. The store process follows it with the ingress's own follower
(:func:`ingress.guards.budgets.follow`) into a :class:`BudgetBook` (one per app, set up
by :func:`sql.analytics.add_routes`), of which only the states are used here (same rule
for which state to keep as the ingress). The configuration says which budgets exist and
whom they belong to, and :func:`visible_budgets` which of them a key may see (the same
rule decides which budget alerts it sees); a budget whose state has not been seen yet is
unknown, never $0 spent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from aiohttp import web

from ingress.guards.budgets import BudgetBook, follow
from llmtap.config import BudgetConfig, Settings
from llmtap.events import BudgetState
from sql.params import Scope
from stream.budgets import current
from stream.pricing import Catalog

BUDGET_BOOK = web.AppKey("budget_book", BudgetBook)


def visible_budgets(budgets: list[BudgetConfig], scope: Scope) -> list[str]:
    """The names of the budgets a caller of ``scope`` may see: an admin every budget; a
    virtual key those confined to its tenant (a tenant budget on it, or one whose
    ``tenant`` is it); a key bound to a team only that team's budgets, a key bound to a
    user only that user's."""

    def visible(budget: BudgetConfig) -> bool:
        if scope.tenant is None:
            return True
        if owner_of(budget) != scope.tenant:
            return False
        if scope.user is not None:
            return budget.scope == "user" and budget.value == scope.user
        if scope.team is not None:
            return budget.scope == "team" and budget.value == scope.team
        return True

    return [b.name for b in budgets if visible(b)]


def owner_of(budget: BudgetConfig) -> str:
    """The tenant a budget belongs to; "": none (it counts every tenant's calls)."""
    return budget.value if budget.scope == "tenant" else budget.tenant


def budget_follower(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: ``app[BUDGET_BOOK]``, following the budgets topic while the app
    runs (only when budgets are configured)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        # No prices are needed: this book is never asked to admit or settle a call.
        book = app[BUDGET_BOOK] = BudgetBook(
            settings.budgets, Catalog(models={}), settings.budget_default_max_tokens
        )
        task = None
        if settings.budgets:
            task = asyncio.create_task(follow(book, settings.kafka_bootstrap), name="budget-states")
        yield
        if task is not None:
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
) -> list[BudgetRow]:
    """The budgets ``scope`` may see (:func:`visible_budgets`), in configuration order,
    each with its state as of ``now`` (a period that has ended rolls over to a fresh
    one, as the stream's does)."""
    configured = list(budgets)
    seen = set(visible_budgets(configured, scope))
    rows = []
    for budget in configured:
        if budget.name not in seen:
            continue
        held = states.get(budget.name)
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
            )
        )
    return rows
