"""Why a hard budget cap refused a call, in words the caller can act on: the budget
(:class:`Exhausted`: its spend, what is held, when it resets, or that no period could
cover the call) or the model (:class:`Unpriced`: no price to bound it by). Made by
:meth:`ingress.guards.budgets.BudgetBook.admit`; their messages go into the 429 or 400
the caller gets (ingress/forward/admission.py)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from llmtap.amounts import plain
from llmtap.config_sections import BudgetConfig
from llmtap.events import BudgetState


@dataclass(frozen=True)
class Exhausted:
    """Why a call was refused: the budget, its state, and when it resets."""

    budget: BudgetConfig
    state: BudgetState
    worst_case: Decimal
    # The worst case with no output at all (its input, images, searches): more than the
    # whole limit, no max_tokens would make the call fit. Reckoned only for a refusal.
    without_output: Decimal | None = None
    # What this ingress holds against the budget beyond its published spend: worst cases
    # of calls in flight, and costs of ended calls not counted yet (or unpriced).
    held: Decimal = Decimal(0)
    # Of ``held``, what is held until the period ends (the worst cases of ended calls
    # the stream cannot price): spent as far as the cap can tell, never settled sooner.
    lasting: Decimal = Decimal(0)
    # Of ``held``, the real costs of ended calls no state has counted yet (this
    # process's, a stopped one's, another's announced unchanged for placed.PLACED_SETTLE):
    # spent, whether or not the stream is there to count them. Counted, they move to
    # the published spend, the sum the same: they free nothing.
    ended: Decimal = Decimal(0)

    @property
    def held_back(self) -> bool:
        """Refused for what may settle within seconds (worst cases of calls in flight,
        settled at their real cost, and what other processes hold that a state may have
        counted since they said so), not for the spend alone. What ended calls cost, and
        what is held until the period ends, do not settle so: they count as the spend
        (with the stream down for hours, a full budget's refusal said "retry in a second"
        and raised no alert, as long as it was down)."""
        spent = self.state.spent_usd + self.lasting + self.ended
        return (
            self.held > self.lasting + self.ended
            and spent + self.worst_case <= self.budget.limit_usd
        )

    @property
    def never_fits(self) -> bool:
        """The call's worst case is more than the budget's whole limit: no period, however
        little spent, could admit it, so waiting for the reset is no answer."""
        return self.worst_case > self.budget.limit_usd

    def message(self) -> str:
        b, s = self.budget, self.state
        if self.never_fits:
            remedy = "name a smaller max_tokens (the most the call may write)"
            if self.without_output is not None and self.without_output > b.limit_usd:
                remedy = (
                    f"its input and searches alone may cost ${plain(self.without_output)}, so a "
                    "smaller max_tokens would not do: send less input (each image, and a "
                    "conversation the body does not hold, count in full) or bound its searches"
                    " and advisor calls (max_uses)"
                )
            return (
                f"budget {b.name!r} ({b.scope} {b.value!r}) cannot cover this call in any "
                f"{b.period}: the worst case of this call ${plain(self.worst_case)} is more than "
                f"its whole limit of ${plain(b.limit_usd)}; {remedy}, or ask for a larger limit"
            )
        if not b.owner and b.scope != "key":
            # It counts every tenant's calls (a key's are one tenant's): its spend, and
            # what is held against it, are other tenants' too (the budgets endpoint shows
            # them to admins only).
            return (
                f"budget {b.name!r} ({b.scope} {b.value!r}, of every tenant) cannot cover "
                f"this call: worst case of this call ${plain(self.worst_case)}; it resets at "
                f"{s.period_end.isoformat()}"
            )
        return (
            f"budget {b.name!r} ({b.scope} {b.value!r}) cannot cover this call: "
            f"${plain(s.spent_usd)} of ${plain(b.limit_usd)} spent this {b.period}, "
            + (
                f"${plain(self.held)} held for calls in flight or not yet counted"
                + (f" (${plain(self.ended)} of it ended calls' costs), " if self.ended else ", ")
                if self.held
                else ""
            )
            + f"worst case of this call ${plain(self.worst_case)}; it resets at "
            f"{s.period_end.isoformat()}"
        )


@dataclass(frozen=True)
class Unpriced:
    """Why a call was refused: a hard-capped budget counts it, and its model has no
    price to bound it by (``budget_unpriced: refuse``)."""

    budget: BudgetConfig
    model: str
    provider: str

    def message(self) -> str:
        b = self.budget
        return (
            f"budget {b.name!r} ({b.scope} {b.value!r}) has a hard cap, and model "
            f"{self.model!r} (provider {self.provider!r}) has no price in llmtap's catalog "
            "to bound this call's cost by; add the model to the pricing_file (a model of "
            "your own at 0), or ask for its calls to be admitted unbounded (unpriced: admit "
            "on the provider, or budget_unpriced: admit for every provider)"
        )
