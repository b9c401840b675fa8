"""Hard budget caps, before any token is spent.

The stream owns each budget's spend and publishes it on the compacted budgets topic; the
ingress follows that topic (ingress/guards/book_topics.py). A call that counts against a hard-capped
budget is admitted only if the budget's remaining amount covers the call's worst case,
the most it can cost (ingress/guards/worst_case.py). That worst case is reserved at
admission — check and reserve happen with no await between them, so concurrent calls
cannot both take the last dollars — and settled when
the call ends: the reservation is replaced by the call's real cost, which is held
until a published state has counted it (a call the stream cannot price, its usage
unknown, or served in fast mode, at an OpenAI service tier or in a geography its
price gives no rates for: its worst case, until its period ends). "Counted" is exact:
once its response event is delivered, the publisher tells the cost where it went
(partition and offset of the responses topic, :meth:`Settled.delivered`), and a state
counts it once its ``applied`` offset for that partition has passed it; a cost not
delivered yet is not counted by any state (a time would not do: the stream reads
partitions unevenly, and other ingresses' later calls may be counted first). A model
with no price cannot be bounded: refused (ingress/guards/refusals.py), or, with
``admit_unpriced``, admitted with nothing reserved (its spend is not counted either).
What a process holds
is announced on the reservations topic (book_topics.announce): the other ingress
processes count it against their caps too (book_topics.hear_others), and the budgets endpoint shows
it; the costs of ended calls they announce (placed costs) are kept until a state counts
them in ingress/guards/placed.py, which the book holds.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from ingress.guards.bounds import Reach
from ingress.guards.others import OthersHeld
from ingress.guards.refusals import Exhausted, Unpriced
from ingress.guards.settled import Settled, Uncounted
from ingress.guards.sums import ZERO, RunningSum, exponent_of
from ingress.guards.worst_case import WorstCase
from llmtap.config_sections import BudgetConfig
from llmtap.events import (
    Alert,
    Attribution,
    BudgetState,
    PlacedCosts,
    Reservations,
    Usage,
)
from stream.budgets import (
    Matching,
    capped_alert,
    capped_alert_id,
    fresh,
    is_of,
    later_or_larger,
    of_period,
    owned,
    period_bounds,
    rejudged,
)
from stream.catalog import Catalog
from stream.pricing import advisor_breakdown, cost_of, no_tokens, priced_as_served

# A cost no state has counted this long after its call ended is no longer held on its
# own (memory: one entry a call, while a broker outage or a lagging stream lasts): one
# whose event Kafka has is added to a sum of its partition's, let go once a state has
# counted past the latest of them; one whose event Kafka has not (in the spool, or
# dropped) is held until its period ends, as the unpriced are.
SETTLED_MAX_AGE = timedelta(hours=1)


class BudgetBook:
    def __init__(
        self,
        budgets: list[BudgetConfig],
        catalog: Catalog,
        default_max_tokens: int,
        default_context_tokens: int = 1_000_000,
        default_web_searches: int = 100,
        image_tokens: int = 50_000,
        default_advisor_uses: int = 100,
        admit_unpriced: bool = False,
    ):
        self.budgets = budgets
        self._named = {b.name: b for b in budgets}
        self.catalog = catalog
        self.worst = WorstCase(
            catalog,
            default_max_tokens,
            default_context_tokens,
            default_web_searches,
            image_tokens,
            default_advisor_uses,
        )
        # A hard cap admits a call of a model with no price, reserving nothing for it
        # (its spend is not counted either), rather than refuse it.
        self.admit_unpriced = admit_unpriced
        # The hard caps a call counts against, found by its attribution (a lookup per
        # field, not a match of every budget: ~35 µs a call with 200 budgets).
        self._capping = Matching(b for b in budgets if b.hard_cap)
        self.states: dict[str, BudgetState] = {}
        # The fresh state of each budget's period while none published is of it (made
        # once a period: :meth:`_current`).
        self._fresh: dict[str, BudgetState] = {}
        # The state each budget's latest replaced, of an earlier period: the current one
        # for this process until its clock reaches the latest's period (:meth:`_current`).
        self._prior: dict[str, BudgetState] = {}
        # The worst cases of calls in flight, per budget, and their sum (RunningSum); and
        # the budgets each call reserved on, so ending it looks at those only.
        self.reserved: dict[str, RunningSum] = defaultdict(RunningSum)
        self._reserving: dict[uuid.UUID, list[BudgetConfig]] = {}
        self.settled: dict[str, Uncounted] = defaultdict(Uncounted)
        # What ended calls whose usage is unknown hold, a sum per budget for its period
        # (the period's start, the sum): the stream cannot price them, so it is held
        # until the period ends (:meth:`settle`).
        self.unpriced: dict[str, tuple[datetime, Decimal]] = {}
        # Costs held past SETTLED_MAX_AGE whose events Kafka has, per budget and
        # partition: (their period's start, the latest one's offset, their sum).
        self.aged: dict[str, dict[int, tuple[datetime, int, Decimal]]] = defaultdict(dict)
        self._by_name = {b.name: b for b in budgets}
        # The id of the last hard cap's alert this process raised, per budget (capped).
        self._capped_told: dict[str, uuid.UUID] = {}
        # What the other ingress processes hold (ingress/guards/others.py).
        self.held_by_others = OthersHeld()
        # The state each budget's held costs were last let go against (Uncounted.counting
        # and :meth:`_aged`), and a state of a later period not applied so yet: held
        # until this process's clock reaches its period (:meth:`_current`), the calls it
        # admits until then being of the period it judges them in (:attr:`_prior`).
        self._counted: dict[str, BudgetState] = {}
        self._deferred: dict[str, BudgetState] = {}
        # Set once the states the budgets topic held when this process started are read
        # (:func:`follow`). Before, a budget not read yet looks unspent: a hard-capped
        # call waits for them (ingress/forward/admission.py), not judged on nothing.
        self.states_read = asyncio.Event()
        if not budgets:
            self.states_read.set()
        # Set, per hard-capped budget, once a state of it that holds its period's spend
        # has been read: the store's rebuild from ClickHouse, or the stream's counted on
        # from one (not ``partial``). Before, it would look unspent, or spent only since
        # a worker first counted it (a budget new to the configuration): its calls wait.
        self.stated = {b.name: asyncio.Event() for b in budgets if b.hard_cap}
        self._unstated = set(self.stated)
        # Likewise the other ingress processes' reservations (:func:`hear_others`): a
        # replica just added (in a burst, when caps matter) would judge without them.
        self.others_read = asyncio.Event()
        if not any(b.hard_cap for b in budgets):
            self.others_read.set()

    @property
    def read(self) -> bool:
        """Whether what the caps are judged on (spend, others' holds) has been read."""
        return self.states_read.is_set() and self.others_read.is_set() and not self._unstated

    def unstated(self, who: Attribution) -> list[BudgetConfig]:
        """The hard-capped budgets counting ``who``'s calls with no whole state read."""
        return [b for b in self._capping(who) if b.name in self._unstated]

    async def readied(self, who: Attribution) -> None:
        """Return once what a call of ``who`` is judged on has been read (:attr:`read`)."""
        await self.states_read.wait()
        await self.others_read.wait()
        for budget in self.unstated(who):
            await self.stated[budget.name].wait()

    def caps(self, who: Attribution) -> bool:
        """Does a hard-capped budget count this caller's calls?"""
        return bool(self._capping(who))

    def update(self, state: BudgetState) -> None:
        """A state from the topic: keep it unless it is older than what we hold (the
        costs it has counted are let go when next looked at: :meth:`_uncounted`)."""
        budget = self._named.get(state.budget)
        if budget is not None:
            if not is_of(state, budget):
                return  # published while its name was another budget's: not its spend
            state = owned(state, budget)
            if not state.partial and state.budget in self._unstated:
                self._unstated.discard(state.budget)
                self.stated[state.budget].set()
        held = self.states.get(state.budget)
        if (
            held is None
            or later_or_larger(state, held)
            # Its offsets moved on, its spend not (calls that cost nothing); not an
            # earlier period's (a closing day's state, published before the current's).
            or (state.spent_usd == held.spent_usd and state.period_start == held.period_start)
        ):
            if held is not None and state.period_start > held.period_start:
                self._prior[state.budget] = held  # judged on until this clock's period ends
            self.states[state.budget] = state
            if budget is not None:
                self._count(state)
            return
        prior = self._prior.get(state.budget)
        if (
            budget is not None
            and prior is not None
            and state.period_start == prior.period_start
            and (later_or_larger(state, prior) or state.spent_usd == prior.spent_usd)
        ):
            self._prior[state.budget] = state  # the period it may still judge in
            counted = self._counted.get(state.budget)
            if counted is not None and counted.period_start == state.period_start:
                self._count(state)

    def _count(self, state: BudgetState) -> None:
        """Let go the costs held against ``state``'s budget that it counts; a state of a
        later period than the one they were let go against is applied so only once this
        process's clock reaches its period (:meth:`_current`): the worker, past its
        midnight, counts past calls this process admits before its own, stamped the
        day before (dropped as late), which the state judged on then (:attr:`_prior`)
        never counted (let go, the day's cap was overshot: $1.30 on $1.00)."""
        counted = self._counted.get(state.budget)
        if counted is not None and state.period_start > counted.period_start:
            self._deferred[state.budget] = state
            return
        self._deferred.pop(state.budget, None)
        self._counted[state.budget] = state
        self.settled[state.budget].counting(state)

    def _current(self, budget: BudgetConfig, now: datetime) -> BudgetState:
        """:func:`~stream.budgets.current`: the state published, if it is this period's;
        else a fresh one, made once a period and budget, not at each admission (~15 µs
        a capped call and budget: before the stream rolls a period over, or with none
        published, a worker down at midnight made every call pay it until it was back)."""
        if self._deferred:
            deferred = self._deferred.get(budget.name)
            if deferred is not None and now >= deferred.period_start:
                del self._deferred[budget.name]
                self._counted[budget.name] = deferred
                self.settled[budget.name].counting(deferred)
        published = self.states.get(budget.name)
        if published is not None and now < published.period_start:
            # Of a period this process's clock has not reached (the worker's runs ahead):
            # yesterday's calls judged on it were judged against $0, and what they hold
            # let go; they are still yesterday's, the state before it theirs.
            published = self._prior.get(budget.name)
        if published is not None and of_period(budget, published, now):
            return rejudged(budget, published)  # as current() has it
        made = self._fresh.get(budget.name)
        if made is not None and of_period(budget, made, now):
            return made
        made = self._fresh[budget.name] = fresh(budget, now, now)
        return made

    def committed(self, budget: BudgetConfig, now: datetime) -> tuple[BudgetState, Decimal]:
        state = self._current(budget, now)
        # A call that ended in an earlier period is not this period's cost; one that
        # ended since is, also while the published state is still last period's (the
        # stream has not rolled it over yet).
        held = self._holding(budget.name, now, state.period_start)
        others = self.held_by_others.holding(budget.name, now)
        others += self.held_by_others.orphaned(budget.name, now, state)
        return state, state.spent_usd + held + others

    @property
    def ingress_id(self) -> str:
        """This process's id on the reservations topic, whose announcements it passes
        over ("" until it has one)."""
        return self.held_by_others.ingress_id

    @ingress_id.setter
    def ingress_id(self, ingress_id: str) -> None:
        self.held_by_others.ingress_id = ingress_id

    def heard(self, event: Reservations, partition: int | None = None) -> None:
        """Another ingress process's announcement (:meth:`OthersHeld.heard`)."""
        self.held_by_others.heard(event, partition)

    def gone(self, key: bytes, partition: int | None = None) -> None:
        """Another ingress process's entry deleted (:meth:`OthersHeld.gone`)."""
        self.held_by_others.gone(key, partition)

    def holds_placed(self, ingress_id: str, now: datetime) -> bool:
        """Whether process ``ingress_id``'s placed costs are held still (its entry on the
        reservations topic is then kept: a process starting later reads them there)."""

        def judged_by(name: str) -> BudgetState | None:
            """The state a placed cost of budget ``name`` is judged by (its current);
            None: not a hard-capped budget here, not held."""
            budget = self._named.get(name)
            if budget is None or not budget.hard_cap:
                return None
            return self._current(budget, now)

        return self.held_by_others.holds(ingress_id, judged_by)

    def placed(self, now: datetime) -> tuple[PlacedCosts, ...]:
        """This process's held costs whose events Kafka has and no state has counted,
        per hard-capped budget and partition of the responses topic (as held: call
        :meth:`held` first, which lets go those counted): at most one entry a budget and
        partition, however long the stream is down."""
        told: list[PlacedCosts] = []
        for b in self.budgets:
            if not b.hard_cap or self._idle(b.name):
                continue
            start = self._current(b, now).period_start
            sums = dict(self.settled[b.name].by_partition())
            for partition, (period, latest, amount) in self.aged[b.name].items():
                if period >= start:
                    before, total = sums.get(partition, (-1, Decimal(0)))
                    sums[partition] = (max(before, latest), total + amount)
            told += (
                PlacedCosts(
                    budget=b.name, period_start=start, partition=p, through=latest, usd=total
                )
                for p, (latest, total) in sorted(sums.items())
                if total
            )
        return tuple(told)

    def _holding(self, name: str, now: datetime, since: datetime | None = None) -> Decimal:
        """In-flight worst cases plus the costs :meth:`_uncounted` still holds."""
        in_flight = self.reserved[name].total
        ended = self._uncounted(name, now, since)
        aged = self._aged(name, since)
        period, unpriced = self.unpriced.get(name, (None, Decimal(0)))
        if since is not None and (period is None or period < since):
            unpriced = Decimal(0)  # an earlier period's
        return in_flight + ended + aged + unpriced

    def _uncounted(self, name: str, now: datetime, since: datetime | None) -> Decimal:
        """The costs of ended calls (since ``since``, when given) that the state held now
        has not counted (:class:`Uncounted`); those older than SETTLED_MAX_AGE are moved
        to sums (:meth:`_aged`, or the period's with the unpriced)."""
        held = self.settled[name]
        if since is not None:
            held.since(since)

        def age(cost: Settled) -> None:
            if cost.at is None:  # not in Kafka an hour on: in the spool, or dropped
                self._hold_unpriced({name: cost.cost}, cost.cost, cost.ended)
                if not cost.folded:
                    cost.listeners.append(self._unfold)
                cost.folded.append(name)
            else:
                self._age(name, cost, cost.at)

        held.expire(now - SETTLED_MAX_AGE, age)
        return held.total

    def _unfold(self, cost: Settled) -> None:
        """Kafka has the event of a cost held to its period's end (spooled an hour or
        more): held in its partition's sum instead, let go once a state counts it, not
        held twice to the period's end once the stream has counted it."""
        assert cost.at is not None
        for name in cost.folded:
            period = period_bounds(self._by_name[name].period, cost.ended)[0]
            start, total = self.unpriced.get(name, (period, Decimal(0)))
            if start == period:
                self.unpriced[name] = (start, max(Decimal(0), total - cost.cost))
                self._age(name, cost, cost.at)
        cost.folded.clear()

    def _age(self, name: str, cost: Settled, at: tuple[int, int]) -> None:
        partition, offset = at
        period = period_bounds(self._by_name[name].period, cost.ended)[0]
        start, latest, total = self.aged[name].get(partition, (period, -1, Decimal(0)))
        if period < start:
            return  # an earlier period's: no longer counted
        if start < period:
            latest, total = -1, Decimal(0)
        self.aged[name][partition] = (period, max(latest, offset), total + cost.cost)

    def _aged(self, name: str, since: datetime | None) -> Decimal:
        """The sums of aged costs no state has counted yet (those counted let go)."""
        published = self._counted.get(name)  # not a later period's before this clock's
        total = Decimal(0)
        for partition, (period, latest, amount) in list(self.aged[name].items()):
            counted = published is not None and published.applied.get(partition, 0) > latest
            if counted or (since is not None and period < since):
                del self.aged[name][partition]
            else:
                total += amount
        return total

    def _lasting(self, name: str, since: datetime) -> Decimal:
        """What budget ``name`` holds until its period (from ``since``) ends: the worst
        cases of ended calls the stream cannot price (:meth:`_hold_unpriced`)."""
        period, total = self.unpriced.get(name, (None, Decimal(0)))
        return total if period is not None and period >= since else Decimal(0)

    def held(self, now: datetime) -> dict[str, Decimal]:
        """What this process holds against each hard-capped budget beyond its published
        spend (what :meth:`committed` adds): in-flight worst cases and uncounted costs.
        Asked every 0.2 s (:func:`announce`), on the event loop: a budget that holds
        nothing is known to at a glance (:meth:`_idle`), not worked out (~3.5 µs each:
        0.7 ms a time with 200 hard-capped budgets, 1.8 with no state of them read)."""
        return {
            b.name: ZERO
            if self._idle(b.name)
            else self._holding(b.name, now, self._current(b, now).period_start)
            for b in self.budgets
            if b.hard_cap
        }

    def _idle(self, name: str) -> bool:
        """Whether budget ``name`` holds nothing, so that :meth:`_holding` is 0 (as it
        gives it: ``Decimal("0")``) with nothing left for it to let go either. A 0 held
        to its period's end of other digits (a free model's worst case: 0E-9) is not."""
        settled = self.settled.get(name)
        unpriced = self.unpriced.get(name)
        return (
            not self.reserved.get(name)
            and (settled is None or settled.idle)
            and not self.aged.get(name)
            and (unpriced is None or (not unpriced[1] and unpriced[1].same_quantum(ZERO)))
        )

    def admit(
        self,
        call_id: uuid.UUID,
        who: Attribution,
        model: str,
        request_bytes: int,
        max_tokens: int | None,
        now: datetime,
        provider: str = "",
        choices: int = 1,
        reach: Callable[[], Reach] | None = None,
        prompts: int = 1,
        unpriced: Literal["refuse", "admit"] | None = None,
    ) -> Exhausted | Unpriced | None:
        """Reserve the call's worst case on every hard-capped budget it counts against,
        or say which budget cannot cover it (and reserve nothing). ``reach`` is asked
        only then: what does the body leave unbounded (its input, its searches)? A
        model with no price has no worst case: refused (:class:`Unpriced`), unless
        the call's provider says ``unpriced: admit``, or says nothing and the book
        ``admit_unpriced``."""
        capped = self._capping(who)
        if not capped:
            return None
        unbounded = reach() if reach is not None else Reach(False, 0)

        def reckoned(most_tokens: int | None) -> Decimal | None:
            return self.worst.cost(
                model,
                request_bytes + unbounded.added_tokens,  # the provider's own (bounds.Reach)
                most_tokens,
                now,
                provider,
                choices,
                unbounded.input_unbounded,
                prompts,
                unbounded.web_searches,
                unbounded.images,
                unbounded.preview_named,
                unbounded.fast,
                unbounded.advisor,
                unbounded.geo,
                unbounded.priority,
                unbounded.ultrafast,
            )

        worst = reckoned(max_tokens)
        if worst is None:
            if not (self.admit_unpriced if unpriced is None else unpriced == "admit"):
                return Unpriced(capped[0], model, provider)
            worst = Decimal(0)
        # One the call can never fit is its answer, rather than one it fits once reset.
        for budget in sorted(capped, key=lambda b: worst <= b.limit_usd):
            state, committed = self.committed(budget, now)
            if committed + worst > budget.limit_usd:
                floor = reckoned(0) if worst > budget.limit_usd else None
                lasting = self._lasting(budget.name, state.period_start)
                ended = self._ended(budget.name, now, state)
                held = committed - state.spent_usd
                return Exhausted(budget, state, worst, floor, held, lasting, ended)
        exponent = exponent_of(worst)
        for budget in capped:
            self.reserved[budget.name].reserve(call_id, worst, exponent)
        reserving = self._reserving.setdefault(call_id, capped)
        if reserving is not capped:  # reserved on before (the same call admitted again)
            reserving += capped
        return None

    def capped(self, exhausted: Exhausted, now: datetime) -> Alert | None:
        """The alert that a budget's hard cap refused a call for its spend, the first
        time this process refuses one in the budget's period at its level (the highest
        threshold crossed): None after, and for a refusal that calls in flight caused, or
        of a call no period could cover. Every replica raises the same id: storage and
        webhooks take it once."""
        if exhausted.never_fits or exhausted.held_back:
            return None
        budget, state = exhausted.budget, exhausted.state
        told = capped_alert_id(budget, state.period_start, max(state.crossed, default=0))
        if self._capped_told.get(budget.name) == told:
            return None
        self._capped_told[budget.name] = told
        left = budget.limit_usd - state.spent_usd - exhausted.held
        if exhausted.ended:  # spent, not published yet (the stream lags, or is down)
            spent = state.spent_usd + exhausted.ended
            state = state.model_copy(update={"spent_usd": spent})
        return capped_alert(budget, state, exhausted.worst_case, left, now)

    def _ended(self, name: str, now: datetime, state: BudgetState) -> Decimal:
        """Of what budget ``name`` holds beyond ``state`` (its current), the real costs
        of ended calls no state has counted (:attr:`Exhausted.ended`). Asked at a
        refusal only, after :meth:`committed` (which let go what is counted)."""
        own = self.settled[name].total + self._aged(name, state.period_start)
        return own + self.held_by_others.placed.ended(name, now, state)

    def settle(
        self,
        call_id: uuid.UUID,
        model: str,
        usage: Usage,
        ended: datetime,
        provider: str = "",
        started: datetime | None = None,
    ) -> Settled | None:
        """The call ended: its reservation becomes its real cost (when it can be priced),
        held until a state counts it. Priced at the rates in force when it ``started``
        (None: ``ended``), as the stream prices it: a call across a price change's
        midnight was held at the new price and counted at the old. Returns what is held,
        for the publisher to tell where the call's response event went
        (:meth:`Settled.delivered`); None if nothing is. A call that reserved nothing
        (no hard cap applied) costs a dict lookup."""
        held = {
            budget.name: worst
            for budget in self._reserving.pop(call_id, ())
            if (worst := self.reserved[budget.name].pop(call_id, None)) is not None
        }
        if not held or no_tokens(usage):
            return None  # nothing reached a model: zero, as the stream prices it
        cost = None
        entry = self.catalog.lookup(model, provider)
        priced_at = ended if started is None else started
        rates = entry[1].at(priced_at) if entry is not None else None
        # Its advisor's calls, at their model's prices (None: one has none).
        advised = (
            advisor_breakdown(usage.advisor, self.catalog, priced_at, provider, usage.inference_geo)
            if usage.advisor
            else {"total": Decimal(0)}
        )
        # No price for the model the provider says it served (an OpenAI-compatible
        # server's own id for it, a deployment's name), though the one asked for had
        # one: the stream prices by the served name too, and cannot.
        unpriceable = rates is None or not priced_as_served(usage, rates) or advised is None
        if rates is not None and advised is not None and not usage.usage_missing:
            cost = cost_of(usage, rates).total + advised["total"]
        # Every budget reserved the same worst case, and holds the same cost.
        worst = next(iter(held.values()))
        if usage.usage_missing or usage.output_tokens_counted or unpriceable:
            # Unknown, or llmtap's count of a stream cut short, which is no bound (an
            # Anthropic one knows its input; its thinking may be billed, not streamed);
            # or served under a model name, in fast mode, at an OpenAI service tier or in
            # a geography with no price for it, or with an advisor model with none, which
            # the stream cannot price.
            self._hold_unpriced(held, worst, ended)
            return None
        holding = Settled(ended, cost or Decimal(0))
        if not holding.cost:
            return None
        for name in held:
            self.settled[name].add(holding)
        return holding

    def _hold_unpriced(self, held: dict[str, Decimal], worst: Decimal, ended: datetime) -> None:
        """A call whose usage is unknown (a client that hung up before the provider's
        count): the stream cannot price it and counts nothing for it, so its worst case
        is held until its period ends (let go, it would vanish from the cap, and calls
        cut short could spend without end). All of it: what streamed does not bound what
        was billed (a reasoning model's hidden tokens; a background response goes on)."""
        for name in held:
            period = period_bounds(self._by_name[name].period, ended)[0]
            start, total = self.unpriced.get(name, (period, Decimal(0)))
            if period < start:
                continue  # an earlier period's: no longer counted
            self.unpriced[name] = (period, (total if start == period else Decimal(0)) + worst)
