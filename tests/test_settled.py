"""The costs a hard cap holds until a state counts them (ingress/guards/settled.py): the
running sum is what scanning every cost at each admission gave, whatever happens in
whatever order (a property test against that scan, the code it replaced)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from ingress.guards.settled import Settled, Uncounted
from llmtap.events import BudgetState

T0 = datetime(2026, 12, 1, tzinfo=UTC)
MAX_AGE = timedelta(seconds=30)
PERIOD_S = 100
NANO = Decimal("1E-9")


BLANK = BudgetState(
    budget="b",
    scope="tenant",
    value="acme",
    period="day",
    period_start=T0,
    period_end=T0 + timedelta(days=1),
    limit_usd=Decimal(1),
    spent_usd=Decimal(0),
    status="ok",
    hard_cap=True,
    updated_at=T0,
)


def state(applied: dict[int, int]) -> BudgetState:
    return BLANK.model_copy(update={"applied": applied})


class Scanned:
    """What the book did before: every cost looked at on every question."""

    def __init__(self) -> None:
        self.costs: list[Settled] = []
        self.state: BudgetState | None = None
        self.aged: list[Settled] = []

    def total(self, since: datetime, cutoff: datetime) -> Decimal:
        kept = []
        for c in self.costs:
            if c.ended < since or (self.state is not None and c.counted_by(self.state)):
                continue
            if c.ended > cutoff:
                kept.append(c)
            else:
                self.aged.append(c)
        self.costs = kept
        return sum((c.cost for c in kept), Decimal(0))


add = st.tuples(st.just("add"), st.integers(1, 500))  # cents
deliver = st.tuples(st.just("deliver"), st.integers(0, 50), st.integers(0, 2))
count = st.tuples(st.just("state"), st.integers(0, 2), st.integers(0, 8))
wait = st.tuples(st.just("wait"), st.integers(0, 40))  # seconds
ops = st.lists(st.one_of(add, add, deliver, deliver, count, wait), max_size=120)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_running_sum_is_the_scan_s_answer_whatever_happens(
    steps: list[tuple[str, int, int]],
) -> None:
    uncounted, scanned = Uncounted(), Scanned()
    aged: list[Settled] = []
    now = T0
    undelivered: list[Settled] = []
    next_offset = {0: 0, 1: 0, 2: 0}
    applied: dict[int, int] = {}
    for step in steps:
        match step:
            case ("add", cents):
                cost = Settled(now, (Decimal(cents) / 100).quantize(NANO))  # as priced
                uncounted.add(cost)
                scanned.costs.append(cost)
                undelivered.append(cost)
            case ("deliver", pick, partition) if undelivered:
                cost = undelivered.pop(pick % len(undelivered))  # in any order
                cost.delivered(partition, next_offset[partition])
                next_offset[partition] += 1
            case ("state", partition, more):
                applied = {**applied, partition: applied.get(partition, 0) + more}
                scanned.state = state(applied)
                uncounted.counting(scanned.state)
            case ("wait", seconds):
                now += timedelta(seconds=seconds)
        since = T0 + timedelta(seconds=(now - T0).total_seconds() // PERIOD_S * PERIOD_S)
        uncounted.since(since)
        uncounted.expire(now - MAX_AGE, aged.append)
        total = scanned.total(since, now - MAX_AGE)
        assert (uncounted.total, str(uncounted.total)) == (total, str(total))
        assert sorted(map(id, aged)) == sorted(map(id, scanned.aged))
        assert {id(c) for c in uncounted.costs()} == {id(c) for c in scanned.costs}


def test_queues_stay_the_size_of_what_is_held_while_one_cost_is_never_delivered() -> None:
    """A cost whose event never reaches Kafka (dropped at the spool's limit) stays first
    in line for an hour; the costs counted behind it are not kept meanwhile."""
    uncounted = Uncounted()
    stuck = Settled(T0, Decimal(1))
    uncounted.add(stuck)
    for offset in range(10_000):
        cost = Settled(T0, Decimal(1))
        uncounted.add(cost)
        cost.delivered(0, offset)
        uncounted.counting(state({0: offset + 1}))
    assert len(uncounted) == 1 and uncounted.total == Decimal(1)
    assert uncounted._queued <= 2 * len(uncounted) + 1024 + 2
