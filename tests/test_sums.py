"""What a hard cap holds for its calls in flight and for the other ingress processes
(ingress/guards/sums.py), and what finding a call's caps costs (stream/budgets.Matching):
the running sums are what summing every reservation and every process's announcement
at each admission gave, digits too, and the lookup what matching every budget gave
(property tests against the code they replaced); none grows with the calls in flight,
the processes or the budgets configured."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingress.guards import budgets as book_module
from ingress.guards.budgets import BudgetBook
from ingress.guards.settled import Settled
from ingress.guards.sums import RunningSum
from llmtap.config_sections import BudgetConfig
from llmtap.events import Attribution, Reservations, Usage, utcnow
from stream import budgets as budget_math
from stream.budgets import Matching, matches
from stream.catalog import Catalog, ModelPrice, Rates, load_catalog

# Amounts of every shape a worst case takes: few digits at any exponent, and some
# with more than a Decimal's 28 (which no addition can keep: summed as summing rounds).
amounts = st.one_of(
    st.builds(lambda c, e: Decimal(c).scaleb(e), st.integers(0, 10**6), st.integers(-15, 3)),
    st.decimals(min_value=0, max_value=10**9, places=12, allow_nan=False),
    st.builds(lambda c: Decimal(c).scaleb(-30), st.integers(10**29, 10**31)),
)
calls = st.integers(0, 7)
put = st.tuples(st.just("put"), calls, amounts)
pop = st.tuples(st.just("pop"), calls, st.just(Decimal(0)))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(put, put, pop), max_size=80))
def test_the_running_sum_is_the_sum_whatever_is_reserved_and_let_go(
    steps: list[tuple[str, int, Decimal]],
) -> None:
    held, summed = RunningSum(), dict[uuid.UUID, Decimal]()
    ids = [uuid.UUID(int=i) for i in range(8)]
    for kind, call, amount in steps:
        if kind == "put":
            held[ids[call]] = summed[ids[call]] = amount
        else:
            assert held.pop(ids[call], None) == summed.pop(ids[call], None)
        total = sum(summed.values(), Decimal(0))
        assert (held.total, str(held.total)) == (total, str(total))
        assert dict(held) == summed


class Counted(Decimal):
    """A worst case that counts the sums it is added into."""

    added: ClassVar[int] = 0

    def __radd__(self, other: Any) -> Decimal:
        Counted.added += 1
        return Decimal(other) + Decimal(self)


class CountedId(uuid.UUID):
    """A call id that counts the lookups made with it."""

    __slots__ = ()
    looked_up: ClassVar[int] = 0

    def __hash__(self) -> int:
        CountedId.looked_up += 1
        return super().__hash__()


def tenant_and_teams(teams: int) -> list[BudgetConfig]:
    big = Decimal(10**8)
    return [
        BudgetConfig(name="acme", scope="tenant", value="acme", period="day", limit_usd=big),
        *(
            BudgetConfig(
                name=f"team-{i}", scope="team", value=f"t{i}", tenant="acme", limit_usd=big
            )
            for i in range(teams)
        ),
    ]


class FixedWorst:
    def cost(self, *args: Any, **kwargs: Any) -> Decimal:
        return Counted("0.0123")


def test_a_capped_call_costs_the_same_however_many_calls_are_in_flight() -> None:
    """1,000 calls in flight on a tenant's cap: each next one summed all their worst
    cases again (~45 µs a call)."""
    budgets = BudgetBook(tenant_and_teams(0), load_catalog(), default_max_tokens=4096)
    budgets.worst = FixedWorst()  # type: ignore[assignment]
    now = utcnow()
    for _ in range(1000):
        assert budgets.admit(uuid.uuid4(), Attribution(tenant="acme"), "m", 10, 10, now) is None
    Counted.added = 0
    assert budgets.admit(uuid.uuid4(), Attribution(tenant="acme"), "m", 10, 10, now) is None
    assert Counted.added <= 2
    assert budgets.held(now)["acme"] == Decimal("0.0123") * 1001


def test_ending_a_call_looks_only_at_the_budgets_it_reserved_on() -> None:
    """A call's end looked for its reservation on every hard cap that ever held one."""
    budgets = BudgetBook(tenant_and_teams(500), load_catalog(), default_max_tokens=4096)
    now = utcnow()
    for i in range(500):  # one call in flight on each team's cap
        who = Attribution(tenant="acme", team=f"t{i}")
        assert budgets.admit(uuid.uuid4(), who, "gpt-4o", 10, 10, now) is None
    call = CountedId(int=uuid.uuid4().int)
    assert budgets.admit(call, Attribution(tenant="acme", team="t7"), "gpt-4o", 10, 10, now) is None
    CountedId.looked_up = 0
    usage = Usage(input_tokens=10, output_tokens=10)
    assert budgets.settle(call, "gpt-4o", usage, now) is not None
    assert CountedId.looked_up <= 12  # two budgets' reservations, a few lookups each
    assert call not in budgets.reserved["acme"] and call not in budgets.reserved["team-7"]


def test_admitting_a_call_matches_only_the_budgets_of_its_attribution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every call was matched against every budget configured (~35 µs with 200)."""
    budgets = BudgetBook(tenant_and_teams(500), load_catalog(), default_max_tokens=4096)
    matched = []

    def counted(budget: BudgetConfig, who: Any) -> bool:
        matched.append(budget.name)
        return matches(budget, who)

    monkeypatch.setattr(budget_math, "matches", counted)
    monkeypatch.setattr(book_module, "matches", counted, raising=False)
    who = Attribution(tenant="acme", team="t7")
    assert budgets.caps(who)
    assert budgets.admit(uuid.uuid4(), who, "gpt-4o", 10, 10, utcnow()) is None
    assert len(matched) <= 4
    assert set(budgets.held(utcnow())) >= {"acme", "team-7"}
    assert [name for name, held in budgets.held(utcnow()).items() if held] == ["acme", "team-7"]


scopes = st.sampled_from(["tenant", "team", "key", "user", "feature"])
names = st.sampled_from(["a", "b", "c"])
configs = st.builds(
    lambda scope, value, tenant, cap, limit: dict(
        scope=scope,
        value=value,
        # A tenant budget naming another tenant is refused (it would count no call).
        tenant="" if scope == "tenant" and tenant != value else tenant,
        hard_cap=cap,
        limit_usd=limit,
    ),
    scopes,
    names,
    st.sampled_from(["", "a", "b"]),
    st.booleans(),
    st.sampled_from([Decimal(1), Decimal(5)]),
)
attributions = st.builds(
    Attribution,
    tenant=names,
    team=st.sampled_from(["", "a", "b"]),
    user=st.sampled_from(["", "a", "c"]),
    key_id=st.sampled_from(["", "a", "b"]),
    feature=st.sampled_from(["", "b", "c"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(configs, max_size=12), st.lists(attributions, min_size=1, max_size=6))
def test_a_call_s_budgets_are_those_matching_every_budget_finds(
    made: list[dict[str, Any]], callers: list[Attribution]
) -> None:
    configured = [BudgetConfig(name=f"b{i}", **fields) for i, fields in enumerate(made)]
    for who in callers:
        assert Matching(configured)(who) == [b for b in configured if matches(b, who)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(configs, min_size=1, max_size=8),
    st.lists(st.tuples(attributions, st.integers(1, 400), st.booleans()), max_size=40),
)
def test_what_a_book_holds_is_what_scanning_every_budget_and_call_gave(
    made: list[dict[str, Any]], steps: list[tuple[Attribution, int, bool]]
) -> None:
    """Calls admitted and ended in any order, against caps that overlap: what each cap
    holds, and which calls it refuses, are as the scan of every budget and every call
    in flight had them."""
    configured = [BudgetConfig(name=f"b{i}", period="day", **f) for i, f in enumerate(made)]
    budgets = BudgetBook(configured, load_catalog(), default_max_tokens=4096)
    now = utcnow()
    in_flight: dict[uuid.UUID, tuple[list[str], Decimal]] = {}  # the scan's bookkeeping
    for who, size, end in steps:
        if end and in_flight:
            call = next(iter(in_flight))
            in_flight.pop(call)
            budgets.settle(call, "gpt-4o", Usage(), now)  # nothing reached a model
            continue
        call = uuid.uuid4()
        capped = [b for b in configured if b.hard_cap and matches(b, who)]
        worst = budgets.worst.cost("gpt-4o", size * 1000, size, now)
        assert worst is not None
        refused = budgets.admit(call, who, "gpt-4o", size * 1000, size, now)
        held = {
            b.name: sum((w for n, w in in_flight.values() if b.name in n), Decimal(0))
            for b in configured
        }
        fits = [b for b in capped if held[b.name] + worst <= b.limit_usd]
        assert budgets.caps(who) == bool(capped)
        if refused is None:
            assert fits == capped
            if capped:
                in_flight[call] = ([b.name for b in capped], worst)
        else:
            assert refused.budget in capped and refused.budget not in fits
        scanned = {
            b.name: sum((w for n, w in in_flight.values() if b.name in n), Decimal(0))
            for b in configured
            if b.hard_cap
        }
        found = budgets.held(now)
        assert {n: (v, str(v)) for n, v in found.items()} == {
            n: (v, str(v)) for n, v in scanned.items()
        }


def test_a_capped_call_costs_the_same_however_many_replicas_announce(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each capped call looked at every other live process's announcement, per budget
    (~20 µs a call and budget with 20 replicas)."""
    budgets = BudgetBook(tenant_and_teams(1), load_catalog(), default_max_tokens=4096)
    now = utcnow()
    held = {"acme": Decimal("0.5"), "team-0": Decimal("0.25")}
    for i in range(20):
        budgets.heard(Reservations(ingress_id=f"i{i}", at=now, interval_s=10.0, held=held))
    asked = []
    live = Reservations.live

    def counted(self: Reservations, at: Any) -> bool:
        asked.append(self.ingress_id)
        return live(self, at)

    monkeypatch.setattr(Reservations, "live", counted)
    who = Attribution(tenant="acme", team="t0")
    assert budgets.admit(uuid.uuid4(), who, "gpt-4o", 10, 10, now) is None
    assert asked == []
    in_flight = budgets.reserved["acme"].total
    assert budgets.committed(budgets.budgets[0], now)[1] == in_flight + Decimal(10)


heard = st.tuples(
    st.integers(0, 5),  # which process
    st.integers(-90, 90),  # its clock against the book's, in seconds
    st.sampled_from([0.2, 1.0, 10.0]),
    st.dictionaries(st.sampled_from(["a", "b"]), amounts, max_size=2),
    st.integers(-90, 90),  # when the book is next asked
)


@settings(max_examples=80, deadline=None)
@given(st.lists(heard, max_size=60))
def test_what_the_others_hold_is_what_scanning_their_announcements_gave(
    steps: list[tuple[int, int, float, dict[str, Decimal], int]],
) -> None:
    """Processes announcing in any order, clocks ahead or behind, silent ones: what the
    book counts of theirs is the scan of every one live, digits too."""
    budgets = BudgetBook(tenant_and_teams(0), load_catalog(), default_max_tokens=4096)
    now = utcnow()
    for process, offset_s, interval_s, held, asked_s in steps:
        at = now + timedelta(seconds=offset_s)
        budgets.heard(
            Reservations(ingress_id=f"i{process}", at=at, interval_s=interval_s, held=held)
        )
        asked = now + timedelta(seconds=asked_s)
        for name in ("a", "b", "c"):
            scanned = sum(
                (
                    r.held.get(name, Decimal(0))
                    for r in budgets.held_by_others.others.values()
                    if r.live(asked)
                ),
                Decimal(0),
            )
            found = budgets.held_by_others.holding(name, asked)
            assert (found, str(found)) == (scanned, str(scanned))


step = st.one_of(
    st.tuples(st.just("admit"), st.sampled_from(["acme", "globex"]), st.integers(1, 50_000)),
    st.tuples(st.just("settle"), st.integers(0, 5), st.sampled_from(["ok", "missing", "none"])),
    st.tuples(st.just("deliver"), st.integers(0, 5), st.integers(0, 1), st.integers(0, 20)),
    st.tuples(st.just("state"), st.sampled_from(["acme-day", "acme-month"]), st.integers(0, 20)),
    st.tuples(st.just("wait"), st.sampled_from([1, 30, 61, 600, 1500])),  # minutes
)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=40))
def test_what_a_budget_holding_nothing_is_said_to_hold_is_what_working_it_out_gives(
    steps: list[tuple[Any, ...]],
) -> None:
    """held(), every 0.2 s on the event loop, gives a budget holding nothing 0 without
    working it out (it was ~3.5 µs a budget): whatever calls were admitted, ended,
    delivered, counted by states, aged past the hour or left in an earlier period, each
    budget's amount is what working it out gives, digits too."""
    configured = [
        BudgetConfig(name="acme-day", scope="tenant", value="acme", limit_usd=Decimal(100)),
        BudgetConfig(
            name="acme-month", scope="tenant", value="acme", period="month", limit_usd=Decimal(100)
        ),
        BudgetConfig(name="globex-day", scope="tenant", value="globex", limit_usd=Decimal(100)),
    ]
    budgets = BudgetBook(configured, load_catalog(), default_max_tokens=4096)
    now = datetime(2026, 11, 30, 22, tzinfo=UTC)
    open_calls: list[uuid.UUID] = []
    settled: list[Settled] = []
    usages = {
        "ok": Usage(input_tokens=10, output_tokens=1_000),
        "missing": Usage.missing(),
        "none": Usage(),
    }
    for kind, *args in steps:
        if kind == "admit":
            call = uuid.uuid4()
            who = Attribution(tenant=args[0])
            if budgets.admit(call, who, "gpt-4o", 100, args[1], now) is None:
                open_calls.append(call)
        elif kind == "settle" and open_calls:
            call = open_calls.pop(args[0] % len(open_calls))
            cost = budgets.settle(call, "gpt-4o", usages[args[1]], now)
            if cost is not None:
                settled.append(cost)
        elif kind == "deliver" and settled:
            cost = settled.pop(args[0] % len(settled))
            cost.delivered(args[1], args[2])
        elif kind == "state":
            budget = next(b for b in configured if b.name == args[0])
            state = budget_math.fresh(budget, now, now).model_copy(
                update={"last_event_at": now, "applied": {0: args[1], 1: args[1] // 2}}
            )
            budgets.update(state)
        elif kind == "wait":
            now += timedelta(minutes=args[0])
        found = budgets.held(now)
        worked_out = {
            b.name: budgets._holding(
                b.name, now, budget_math.current(b, budgets.states.get(b.name), now).period_start
            )
            for b in configured
        }
        assert {n: (v, str(v)) for n, v in found.items()} == {
            n: (v, str(v)) for n, v in worked_out.items()
        }


def test_a_budget_holding_a_free_calls_worst_case_is_said_to_hold_it_digits_too() -> None:
    """A model priced at 0 (one of your own) reserves a worst case of 0E-9; a call of
    it whose usage is unknown holds that to its period's end: 0, worked out as 0E-9.
    held() said "0" without working it out, not what the budget holds, digits and all."""
    free = ModelPrice(
        provider="self",
        prices=[Rates(effective_from=date(2020, 1, 1), input=Decimal(0), output=Decimal(0))],
    )
    budget = BudgetConfig(name="acme", scope="tenant", value="acme", limit_usd=Decimal(100))
    budgets = BudgetBook([budget], Catalog(models={"free": free}), default_max_tokens=4096)
    now, call = utcnow(), uuid.uuid4()
    assert budgets.admit(call, Attribution(tenant="acme"), "free", 100, 10, now, "self") is None
    assert budgets.settle(call, "free", Usage.missing(), now, "self") is None
    found = budgets.held(now)["acme"]
    since = budget_math.current(budget, None, now).period_start
    worked_out = budgets._holding("acme", now, since)
    assert (found, str(found)) == (worked_out, str(worked_out))  # was: "0" for "0E-9"
