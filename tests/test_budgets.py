"""Budget arithmetic: calendar periods in UTC, thresholds once per period, rollover."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TypeVar
from uuid import uuid4

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from ingress.guards.budgets import BudgetBook
from llmtap import topics
from llmtap.config_sections import BudgetConfig
from llmtap.events import (
    Alert,
    Attribution,
    BudgetPeriod,
    BudgetState,
    CostedEvent,
    ResponseEvent,
    Usage,
)
from llmtap.kafka import Kafka
from llmtap.names import Names
from llmtap.supervisor import embedded_broker
from sinks.budget_seed import publish_states, publish_until_sent, rebuilt_state, unraised
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sinks.webhooks.records import store_batch
from sql.store import Store
from stream.agents.budgets import BudgetsStep
from stream.budgets import (
    capped_alert,
    current,
    matches,
    period_bounds,
    remaining,
    spend,
    threshold_alert,
    threshold_alert_id,
    threshold_alert_id_before_limits,
)
from stream.catalog import load_catalog
from stream.ledger import Ledger
from stream.rolls import Watermark, read_past, roll_time
from tests import sample
from tests.conftest import start_broker
from tests.fake_provider import free_port
from tests.prometheus import sample as metric
from tests.test_stream_scale import PARTITIONS, stream_worker


def at(day: int, hour: int = 12, month: int = 11) -> datetime:
    return datetime(2026, month, day, hour, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "when", "start", "end"),
    [
        ("day", at(23, 23), at(23, 0), at(24, 0)),
        ("week", at(26), at(23, 0), at(30, 0)),  # 2026-11-23 is a Monday
        ("month", at(30, 23), at(1, 0), at(1, 0, month=12)),
        (
            "month",
            datetime(2026, 12, 31, tzinfo=UTC),
            at(1, 0, month=12),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
    ],
)
def test_periods_are_calendar_periods_in_utc(
    period: str, when: datetime, start: datetime, end: datetime
) -> None:
    assert period_bounds(period, when) == (start, end)  # type: ignore[arg-type]


def budget(**overrides: object) -> BudgetConfig:
    fields: dict[str, object] = {
        "name": "acme-monthly",
        "scope": "tenant",
        "value": "acme",
        "limit_usd": Decimal("10"),
    }
    return BudgetConfig.model_validate({**fields, **overrides})


def test_which_calls_count() -> None:
    assert matches(budget(), Attribution(tenant="acme"))
    assert not matches(budget(), Attribution(tenant="globex"))
    team = budget(scope="team", value="search", tenant="acme")
    assert matches(team, Attribution(tenant="acme", team="search"))
    assert not matches(team, Attribution(tenant="globex", team="search"))
    assert matches(budget(scope="key", value="key_1"), Attribution(key_id="key_1"))


def test_each_threshold_alerts_once_per_period_with_a_stable_id() -> None:
    b = budget()
    state, alerts = spend(b, None, Decimal("4.99"), at(2), at(2))
    assert state is not None and alerts == []
    state, alerts = spend(b, state, Decimal("0.01"), at(3), at(3))  # exactly 50%
    assert state is not None and [a.threshold for a in alerts] == [Decimal(50)]
    assert state.status == "warning"
    first = alerts[0]
    state, alerts = spend(b, state, Decimal("1"), at(4), at(4))
    assert alerts == []  # 60%: nothing new
    assert state is not None
    state, alerts = spend(b, state, Decimal("5"), at(5), at(5))  # 110%: 80 and 100 at once
    assert state is not None and [a.threshold for a in alerts] == [Decimal(80), Decimal(100)]
    assert state.status == "exhausted" and state.spent_usd == Decimal("11.00")
    assert alerts[1].severity == "critical"

    _, replayed = spend(b, None, Decimal("5"), at(3), at(9))  # a replay: same ids
    assert replayed[0].event_id == first.event_id


@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_a_budget_alert_names_its_period_in_its_payload(period: BudgetPeriod) -> None:
    """A receiver can tell a daily budget's alert from a monthly one's without reading
    its message: each budget alert carries its budget's ``period`` (a threshold's, as
    the stream raises it, and a hard cap's refusal), on the wire and in the payload."""
    b = budget(period=period)
    state, alerts = spend(b, None, Decimal("6"), at(3), at(3))
    assert state is not None and [a.threshold for a in alerts] == [Decimal(50)]
    capped = capped_alert(b, state, Decimal("5"), remaining(state), at(3))
    for alert in (*alerts, capped):
        assert alert.period == period
        sent = json.loads(alert.model_dump_json())
        assert sent["period"] == period
        assert Alert.model_validate(sent) == alert


def test_a_limit_raised_mid_period_is_judged_by_its_own_thresholds() -> None:
    """An operator raises a limit after its warnings (90 of 100 spent: 50% and 80%
    alerted). The state is judged by the new limit (9%: ok, nothing crossed), not left
    warning with the old limit's thresholds; and the new limit's 50%, crossed later in
    the period, raises its own alert (another id than the old limit's 50%), the same id
    again when the same calls are replayed under the same configuration. Before, the
    old limit's thresholds kept the new one's from ever alerting this period."""
    old, new = budget(limit_usd=Decimal("100")), budget(limit_usd=Decimal("1000"))
    state, alerts = spend(old, None, Decimal("90"), at(3), at(3))
    assert state is not None and state.crossed == (50, 80) and len(alerts) == 2
    now = current(new, state, at(4))
    assert (now.limit_usd, now.status, now.crossed) == (Decimal("1000"), "ok", ())
    later, raised = spend(new, state, Decimal("410"), at(5), at(5))  # 500 of 1000
    assert later is not None and (later.status, later.crossed) == ("warning", (50,))
    assert [(a.threshold, a.baseline) for a in raised] == [(Decimal(50), Decimal("1000"))]
    assert raised[0].event_id != alerts[0].event_id
    # The same calls again, counted under the new limit from the start: the same id.
    replayed, quiet = spend(new, None, Decimal("90"), at(3), at(9))
    assert quiet == []
    _, again = spend(new, replayed, Decimal("410"), at(5), at(9))
    assert [a.event_id for a in again] == [raised[0].event_id]
    # A limit spelled otherwise is the same limit: the same ids.
    same = budget(limit_usd=Decimal("1000.00"))
    assert threshold_alert(same, later, 50, at(5)).event_id == raised[0].event_id

    # The ledger: a state seeded from the topic (the worker's own, counted under the
    # old limit) is judged by the new one at its first call, not counted on as it was.
    ledger = Ledger([new])
    ledger.seed(state)
    changed, none = ledger.record(costed("1", at(4)), at(4), (0, 1))
    assert none == [] and changed == {new.name}
    judged = ledger.states[new.name]
    assert (judged.limit_usd, judged.spent_usd, judged.status, judged.crossed) == (
        Decimal("1000"),
        Decimal("91"),
        "ok",
        (),
    )
    _, raised = ledger.record(costed("409", at(5)), at(5), (0, 2))
    assert [a.event_id for a in raised] == [again[0].event_id]
    # And without a call: the roll judges it (the worker publishes it on its timer).
    ledger = Ledger([new])
    ledger.seed(state)
    [rolled], none = ledger.roll(at(4))
    assert none == [] and (rolled.status, rolled.crossed) == ("ok", ())
    assert ledger.roll(at(4)) == ([], [])


def test_a_limit_lowered_below_the_spend_alerts_at_once() -> None:
    """Lowered mid-period below what was spent (90 of 1000, nothing crossed, now a limit
    of 80): the state is exhausted, and the thresholds the spend is already past of the
    new limit are alerted at once, by the worker's roll or the first call, whichever
    comes first (the same ids: sent once), not never (a hard cap refuses the calls that
    would cross them)."""
    old, new = budget(limit_usd=Decimal("1000")), budget(limit_usd=Decimal("80"))
    state, alerts = spend(old, None, Decimal("90"), at(3), at(3))
    assert state is not None and alerts == []
    ledger = Ledger([new])
    ledger.seed(state)
    [rolled], raised = ledger.roll(at(4))
    assert (rolled.status, rolled.crossed) == ("exhausted", (50, 80, 100))
    assert [(a.threshold, a.severity) for a in raised] == [
        (Decimal(50), "info"),
        (Decimal(80), "warning"),
        (Decimal(100), "critical"),
    ]
    assert "of $80: $90 spent" in raised[2].message
    # A spend read back from ClickHouse has nine places: said unpadded.
    padded = rolled.model_copy(update={"spent_usd": Decimal("90.000000000")})
    assert "of $80: $90 spent" in threshold_alert(new, padded, 100, at(4)).message
    assert ledger.roll(at(4)) == ([], [])
    assert ledger.record(costed("1", at(4)), at(4), (0, 1))[1] == []  # alerted already
    _, at_call = spend(new, state, Decimal("0"), at(4), at(4))
    assert [a.event_id for a in at_call] == [a.event_id for a in raised]


def test_a_new_period_starts_from_zero_and_late_calls_do_not_count() -> None:
    b = budget(period="day")
    state, _ = spend(b, None, Decimal("9"), at(2, 10), at(2, 10))
    assert state is not None
    rolled, alerts = spend(b, state, Decimal("1"), at(3, 1), at(3, 1))
    assert rolled is not None and rolled.spent_usd == Decimal("1") and alerts == []
    assert rolled.period_start == at(3, 0)
    late, _ = spend(b, rolled, Decimal("1"), at(2, 23), at(3, 2))
    assert late is None
    # And without any call: the current state rolls over on its own.
    assert current(b, state, at(3, 0)).spent_usd == 0
    assert current(b, state, at(2, 23)) is state


def test_a_call_stamped_ahead_of_the_clock_counts_in_the_period_now() -> None:
    """An ingress whose clock runs 2 s fast ends a call at 00:00:01 by it, at 23:59:59
    by the worker's: it counts in the day the worker is in. It started the next day,
    the day's spend left the state (a hard cap then held calls to the next day's
    nothing), and the calls after it, stamped right, counted in no period."""
    b = budget(period="day", limit_usd=Decimal("100"))
    ledger = Ledger([b])
    midnight = at(3, 0)
    now = midnight - timedelta(seconds=2)
    ledger.roll(now)
    ledger.record(costed("10", midnight - timedelta(seconds=30)), now, (0, 0))
    ledger.record(costed("1", midnight + timedelta(seconds=1)), now, (0, 1))  # fast clock
    ledger.record(costed("5", midnight - timedelta(seconds=1)), now, (0, 2))
    state = ledger.state(b.name)
    assert (state.period_start, state.spent_usd) == (at(2, 0), Decimal("16"))
    alone, _ = spend(b, None, Decimal("1"), midnight + timedelta(seconds=1), now)
    assert alone is not None and alone.period_start == at(2, 0)
    # Once the worker's clock is past midnight, the day rolls over as before.
    rolled, _ = ledger.roll(midnight + timedelta(seconds=1))
    assert [(r.period_start, r.spent_usd) for r in rolled] == [(midnight, Decimal(0))]


def costed(cost: str, ended: datetime, team: str = "search") -> CostedEvent:
    call = sample.response(
        ended,
        usage=Usage(input_tokens=10, output_tokens=1),
        latency_ms=1,
        proxy_overhead_ms=0.1,
        attribution=Attribution(tenant="acme", team=team),
    )
    return sample.costed(call, sample.cost(cost))


def folded(
    budgets: list[BudgetConfig], calls: list[tuple[CostedEvent, datetime, tuple[int, int]]]
) -> tuple[dict[str, BudgetState], dict[str, BudgetState], list[Alert]]:
    """What the ledger must make of ``calls``: every call through :func:`spend`, one by
    one (the ledger counts most of them into running totals instead). A call of a
    closed period counts in its budget's closing one (the period a call of the next
    rolled from, no roll since), and the current state counts past its offset."""
    states: dict[str, BudgetState] = {}
    closing: dict[str, BudgetState] = {}
    alerts: list[Alert] = []
    seen = set()
    for event, now, (partition, offset) in calls:
        repeat = event.event_id in seen
        seen.add(event.event_id)
        for b in budgets:
            before = states.get(b.name)
            if not matches(b, event.response.attribution):
                continue
            if before is not None and offset < before.applied.get(partition, 0):
                continue
            # A repeat or an unpriced call adds nothing; its offset is counted past.
            cost = Decimal(0) if repeat or event.cost is None else event.cost.total
            ended = event.response.ts_end
            state, raised = spend(b, before, cost, ended, now, (partition, offset))
            old = closing.get(b.name)
            if state is None and before is not None and old is not None:
                if old.period_start <= ended < old.period_end:
                    state, raised = spend(b, old, cost, ended, now, (partition, offset))
                    assert state is not None
                    closing[b.name] = state
                    applied = {**before.applied, partition: offset + 1}
                    states[b.name] = before.model_copy(update={"applied": applied})
            elif state is not None:
                if before is not None and state.period_start != before.period_start:
                    closing[b.name] = before
                states[b.name] = state
            alerts += raised
    return states, closing, alerts


ledger_calls = st.lists(
    st.tuples(
        st.sampled_from(["0.5", "1.25", "3", "0.000000001", "0", "unpriced", "repeat"]),
        st.integers(min_value=0, max_value=30),  # hours from 2026-11-29 (a day rolls)
        st.sampled_from(["search", "ads"]),
        st.integers(min_value=0, max_value=1),  # partition
        st.integers(min_value=0, max_value=30),  # offset (repeats: replays)
        st.booleans(),  # the state is asked for after this call
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ledger_calls)
def test_the_ledger_makes_the_states_spend_would_call_by_call(
    calls: list[tuple[str, int, str, int, int, bool]],
) -> None:
    budgets = [
        budget(limit_usd=Decimal("6"), period="day", thresholds=[25, 50]),  # exhausted unalerted
        budget(name="search", scope="team", value="search", limit_usd=Decimal("4")),
        budget(name="acme-ads", scope="team", value="ads", tenant="acme"),
        budget(name="globex-ads", scope="team", value="ads", tenant="globex"),  # never
        budget(name="acme-weekly", period="week", limit_usd=Decimal("9"), thresholds=[10, 90]),
    ]
    ledger = Ledger(budgets)
    start = datetime(2026, 11, 29, 0, tzinfo=UTC)
    given_calls = []
    alerts: list[Alert] = []
    event: CostedEvent | None = None
    for cost, hour, team, partition, offset, ask in calls:
        ended = start + timedelta(hours=hour, minutes=offset)
        if cost == "repeat" and event is not None:  # the last event again (a retried send)
            ended = event.response.ts_end
        elif cost == "unpriced":
            event = sample.costed(costed("0", ended, team).response, None)
        else:
            event = costed("0" if cost == "repeat" else cost, ended, team)
        call = (event, ended + timedelta(seconds=1), (partition, offset))
        given_calls.append(call)
        changed, raised = ledger.record(*call)
        alerts += raised
        if ask:
            for name in changed:
                assert ledger.state(name) == folded(budgets, given_calls)[0][name]
    states, closing, expected_alerts = folded(budgets, given_calls)
    assert dict(ledger.states) == states
    assert {state.budget: state for state in ledger.closings()} == closing
    assert alerts == expected_alerts


def test_a_worker_restarted_from_older_offsets_counts_nothing_twice() -> None:
    """Killed after publishing its state, before committing: the restarted worker gets
    the same events again (same partitions and offsets) and a ledger seeded from the
    published state. It must count only what that state had not counted."""
    b = budget(limit_usd=Decimal("100"))
    events = [(costed("1.25", at(3)), (i % 2, i // 2)) for i in range(10)]  # 2 partitions
    first = Ledger([b])
    for event, position in events[:7]:
        first.record(event, at(3), position)
    published = first.states[b.name]
    assert published.spent_usd == Decimal("8.75")
    assert published.applied == {0: 4, 1: 3}  # next offsets: 0..3 and 0..2 counted

    restarted = Ledger([b])  # a new process: no memory of event ids
    restarted.seed(BudgetState.model_validate_json(published.model_dump_json()))
    for event, position in events:  # replayed from offset 0
        restarted.record(event, at(3), position)
    assert restarted.states[b.name].spent_usd == Decimal("12.50")  # 10 x 1.25, once each
    assert restarted.states[b.name].applied == {0: 5, 1: 5}


def test_a_state_published_while_the_name_was_anothers_is_not_counted_on() -> None:
    """An operator gives a budget's name to another owner mid-period: the states and
    alerts of the old one are not the new one's (its spend carried over capped acme
    for globex's calls; its alerts' ids dropped acme's as repeats)."""
    old = budget(scope="tenant", value="globex")
    new = budget(scope="tenant", value="acme", limit_usd=Decimal("10"))
    stale = Ledger([old])
    stale.record(costed("9", at(3)), at(3), (0, 1))  # not globex's: counts nothing
    globex = current(old, None, at(3)).model_copy(
        update={"spent_usd": Decimal("9"), "crossed": (50, 80)}
    )
    ledger = Ledger([new])
    ledger.seed(globex)
    _, raised = ledger.record(costed("6", at(3)), at(3), (0, 2))
    assert ledger.states[new.name].spent_usd == Decimal("6")
    assert [a.threshold for a in raised] == [Decimal(50)]
    assert raised[0].event_id != threshold_alert(old, globex, 50, at(3)).event_id
    book = BudgetBook([new], load_catalog(), default_max_tokens=4096)
    book.update(globex)
    assert new.name not in book.states
    # A team's budget given to the same team name of another tenant: the same.
    acme_eng = budget(scope="team", value="eng", tenant="acme")
    globex_eng = budget(scope="team", value="eng", tenant="globex")
    counted = current(acme_eng, None, at(3)).model_copy(update={"spent_usd": Decimal("9")})
    ledger = Ledger([globex_eng])
    ledger.seed(counted)
    assert globex_eng.name not in ledger.states
    assert threshold_alert(acme_eng, counted, 50, at(3)).event_id != (
        threshold_alert(globex_eng, counted, 50, at(3)).event_id
    )
    # Each alert names its budget's tenant: its configured one, or a tenant budget's own.
    assert threshold_alert(acme_eng, counted, 50, at(3)).tenant == "acme"
    assert raised[0].tenant == "acme"
    assert threshold_alert(budget(scope="team", value="eng"), counted, 50, at(3)).tenant == ""
    # A state from before states said their tenant is taken as it was, and says it
    # from then on (else it would match any tenant all its period).
    ledger.seed(counted.model_copy(update={"tenant": None}))
    assert ledger.states[globex_eng.name].spent_usd == Decimal("9")
    assert ledger.states[globex_eng.name].tenant == "globex"
    book = BudgetBook([globex_eng], load_catalog(), default_max_tokens=4096)
    book.update(counted.model_copy(update={"tenant": None}))
    assert book.states[globex_eng.name].tenant == "globex"


def test_a_worker_given_the_partitions_back_goes_on_from_the_holder_since() -> None:
    """Worker A counts, hands every partition to B (a rebalance), and gets them back:
    it takes up B's latest state over its own, older one, and counts nothing twice. A
    state with the same spend counted further (calls that cost nothing) moves only the
    offsets, which an ingress holding a call's cost waits for."""
    b = budget(limit_usd=Decimal("100"))
    events = [(costed("1.25", at(3)), (0, i)) for i in range(6)]
    a, other = Ledger([b]), Ledger([b])
    for event, position in events[:2]:
        a.record(event, at(3), position)
    other.seed(a.states[b.name])
    for event, position in events[:4]:  # B reads from A's last commit: offset 0
        other.record(event, at(3), position)
    a.seed(a.states[b.name])  # its own, read back: no change
    a.seed(other.states[b.name])
    assert a.states[b.name] == other.states[b.name]
    assert a.states[b.name].spent_usd == Decimal("5") and a.states[b.name].applied == {0: 4}
    free = costed("0", at(3))
    other.record(free, at(3), (0, 4))
    a.seed(other.states[b.name])
    assert a.states[b.name].spent_usd == Decimal("5") and a.states[b.name].applied == {0: 5}
    a.seed(other.states[b.name].model_copy(update={"applied": {0: 3}}))  # an older one
    assert a.states[b.name].applied == {0: 5}
    for event, position in events:  # read again from B's checkpoint, and on
        a.record(event, at(3), position)
    assert a.states[b.name].spent_usd == Decimal("6.25") and a.states[b.name].applied == {0: 6}


def test_offsets_carry_into_a_new_period() -> None:
    b = budget(limit_usd=Decimal("100"), period="day")
    ledger = Ledger([b])
    ledger.record(costed("1", at(3)), at(3), (0, 41))
    [rolled], alerts = ledger.roll(at(4))
    assert alerts == []
    assert rolled.spent_usd == 0 and rolled.applied == {0: 42}
    ledger.record(costed("2", at(4)), at(4), (0, 41))  # a replay of an old offset
    assert ledger.states[b.name].spent_usd == 0


def test_a_state_rebuilt_from_clickhouse_is_one_every_reader_accepts(store: Store) -> None:
    """After a full restart the store publishes each budget's period-to-date spend, read
    from ClickHouse; the ingress and the stream validate what they read from the topic."""
    b = budget(limit_usd=Decimal("10"), period="day")
    now = datetime.now(UTC)
    calls = [costed("3.5", now - timedelta(minutes=m)) for m in (1, 2)]
    write_batch(store, Batch(events=calls))
    state = rebuilt_state(store, b, now)
    assert state.spent_usd == Decimal("7.0") and state.crossed == (50,)
    assert state.last_event_at is not None and state.last_event_at.tzinfo is not None
    again = BudgetState.model_validate_json(state.model_dump_json())
    assert again == state


def test_thresholds_a_rebuilt_state_crossed_unalerted_are_raised_once(store: Store) -> None:
    """A budget configured when its spend is already past thresholds: the store raises
    their alerts at start (the stream only raises a threshold as a call crosses it, and
    a hard cap refuses those calls), with the ids the stream would give them, and not
    again once they are stored."""
    b = budget(name="late-added", limit_usd=Decimal("4"), period="day")
    now = datetime.now(UTC)
    write_batch(store, Batch(events=[costed("3.5", now - timedelta(minutes=1))]))
    state = rebuilt_state(store, b, now)
    assert state.crossed == (50, 80)
    raised = unraised(store, b, state)
    assert [(a.threshold, a.severity) for a in raised] == [
        (Decimal(50), "info"),
        (Decimal(80), "warning"),
    ]
    assert [a.event_id for a in raised] == [
        threshold_alert(b, state, t, now).event_id for t in (50, 80)
    ]
    assert raised[1].observed == Decimal("3.5") and "passed 80%" in raised[1].message
    assert {a.period for a in raised} == {"day"}  # as the stream's alerts say it

    store_batch(store, raised[:1], [], [])  # the first one was delivered and stored
    assert unraised(store, b, state) == raised[1:]
    assert unraised(store, b, rebuilt_state(store, budget(name="untouched"), now)) == []


def test_an_alert_the_store_raises_is_first_seen_within_its_period(store: Store) -> None:
    """A call stamped by an ingress whose clock runs ahead ends after midnight by it; the
    store, rebuilding at 23:59:59, counts it in its day (as the stream does), so the
    alerts it raises are that day's: seen within it, not after its window_end."""
    b = budget(name="ahead", limit_usd=Decimal("4"), period="day")
    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    now = midnight - timedelta(seconds=1)
    write_batch(store, Batch(events=[costed("3.5", midnight + timedelta(seconds=1))]))
    state = rebuilt_state(store, b, now)
    raised = unraised(store, b, state)
    assert [a.threshold for a in raised] == [Decimal(50), Decimal(80)]
    for alert in raised:
        assert alert.window_start <= alert.first_seen < alert.window_end


def test_an_alert_stored_before_ids_named_the_limit_is_not_raised_again(store: Store) -> None:
    """Threshold alerts' ids name the limit since a limit changed mid-period must raise
    its own. One stored under the id it had before (an upgrade within the period) is
    raised already if it was of the limit in force (its baseline), and not if of
    another."""
    b = budget(name="upgraded", limit_usd=Decimal("4"), period="day")
    now = datetime.now(UTC)
    write_batch(store, Batch(events=[costed("3.5", now - timedelta(minutes=1))]))
    state = rebuilt_state(store, b, now)
    assert state.crossed == (50, 80)

    def stored_before(threshold: int, limit: str) -> Alert:
        alert = threshold_alert(b, state, threshold, now)
        return alert.model_copy(
            update={
                "event_id": threshold_alert_id_before_limits(b, state.period_start, threshold),
                "baseline": Decimal(limit),
            }
        )

    store_batch(store, [stored_before(50, "4"), stored_before(80, "10")], [], [])
    assert [a.threshold for a in unraised(store, b, state)] == [Decimal(80)]


def test_a_repeat_or_an_unpriced_call_adds_nothing_but_is_counted_past() -> None:
    """An ingress holds a call's cost until a state's offset passes the call's event:
    one the stream reads but cannot count (a repeat, an unknown cost) must move it too."""
    b = budget(limit_usd=Decimal("100"))
    ledger = Ledger([b])
    first = costed("1.25", at(3))
    ledger.record(first, at(3), (0, 5))
    assert (ledger.states[b.name].spent_usd, ledger.states[b.name].applied) == (
        Decimal("1.25"),
        {0: 6},
    )
    unpriced = sample.costed(costed("0", at(3)).response, None)
    changed, _ = ledger.record(unpriced, at(3), (0, 9))
    assert changed == {b.name}
    assert ledger.states[b.name].applied == {0: 10}
    ledger.record(first, at(3), (1, 3))  # the same event, sent again: another offset
    state = ledger.states[b.name]
    assert (state.spent_usd, state.applied) == (Decimal("1.25"), {0: 10, 1: 4})


async def test_rebuilt_states_and_alerts_wait_for_a_broker_that_is_down(store: Store) -> None:
    """The store rebuilds budget states at start; with the broker down then, it keeps
    publishing them, and the alerts of thresholds crossed, until the broker is back
    (a hard cap could otherwise refuse calls with nobody told, until the next start)."""
    b = budget(name="seed-retry", limit_usd=Decimal("4"), period="day")
    now = datetime.now(UTC)
    write_batch(store, Batch(events=[costed("3.5", now - timedelta(minutes=1))]))
    state = rebuilt_state(store, b, now)
    alerts = unraised(store, b, state)
    assert len(alerts) == 2

    kafka = Kafka(f"127.0.0.1:{free_port()}")  # no broker there yet
    assert not await publish_states(kafka, [state], alerts)
    retrying = asyncio.create_task(
        publish_until_sent(kafka, [state], alerts, backoff=0.05, max_backoff=0.2)
    )
    try:
        async with embedded_broker(kafka.bootstrap, 1):
            async with asyncio.timeout(60):
                await retrying
            published = await topic_values(kafka.bootstrap, kafka.names.budgets, 1)
            assert [BudgetState.model_validate_json(v) for v in published] == [state]
            raised = await topic_values(kafka.bootstrap, kafka.names.alerts, 2)
            got = [Alert.model_validate_json(v) for v in raised]  # across partitions: any order
            assert sorted(got, key=lambda a: a.threshold or 0) == alerts
    finally:
        retrying.cancel()


async def topic_values(bootstrap: str, topic: str, n: int) -> list[bytes]:
    """The first ``n`` values on ``topic``, read from its start."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return values[:n]


T = TypeVar("T")


class _App:
    """What the budgets step asks of the Faust app here: its topics and a timer."""

    def topic(self, *args: object, **kwargs: object) -> object:
        return object()

    def timer(self, seconds: float) -> Callable[[T], T]:
        return lambda f: f


class _Followed:
    """A follower already caught up with the budgets topic."""

    async def caught_up(self) -> None:
        return None


@pytest.mark.parametrize("stood_by", [False, True])
async def test_a_worker_that_lost_the_partitions_unaware_takes_up_what_the_next_counted(
    stood_by: bool,
) -> None:
    """Worker A holds the partitions and counts two calls; its membership lapses while it
    lives (a network cut, a paused process), so the group gives the partitions to B,
    which counts on from A's commit. A, still holding as far as it knows, follows B's
    state. Then A is given the partitions back: at once (as partitions it held: no new
    ones), or after standing by. Either way it goes on from B's state: reading from B's
    checkpoint (offset 3), it counts every call once. Before, it passed over B's state
    for good and counted on from its own: the call B alone counted was lost."""
    b = budget(limit_usd=Decimal("100"))
    events = [(costed("1.25", at(3)), (0, i)) for i in range(6)]
    step = BudgetsStep(_App(), Ledger([b]), Kafka("127.0.0.1:1"))  # type: ignore[arg-type]
    step._follower = _Followed()  # type: ignore[assignment]
    await step.taken({0})
    for event, position in events[:2]:
        step.ledger.record(event, at(3), position)
    other = Ledger([b])
    other.seed(step.ledger.states[b.name])
    for event, position in events[:5]:  # B reads from A's last commit: offset 0
        other.record(event, at(3), position)
    step._followed(other.states[b.name])
    if stood_by:
        await step.taken(set())
        await step.taken({0})
    else:
        await step.taken({0})
    assert step.ledger.states[b.name] == other.states[b.name]
    for event, position in events[3:]:  # from B's checkpoint's hold, and on
        step.ledger.record(event, at(3), position)
    assert step.ledger.states[b.name].spent_usd == Decimal("7.50")


def test_two_states_with_the_same_spend_by_chance_are_not_merged() -> None:
    """Two workers counted on from one state for a while (one of them unaware that it
    had lost the partitions): each a call of the same cost, on another partition. Their
    states have the same spend, but neither counted the other's call: a worker seeded
    with both keeps one, and counts the other's call when it reads it again. Merging
    their offsets, it passed over both calls with the cost of one."""
    b = budget(limit_usd=Decimal("100"))
    base = Ledger([b])
    base.record(costed("1.00", at(3)), at(3), (0, 0))
    base.record(costed("1.00", at(3)), at(3), (1, 0))
    calls = [(costed("0.50", at(3)), (0, 1)), (costed("0.50", at(3)), (1, 1))]
    one, other = Ledger([b]), Ledger([b])
    for ledger, (event, position) in zip((one, other), calls, strict=True):
        ledger.seed(base.states[b.name])
        ledger.record(event, at(3), position)
    assert one.states[b.name].spent_usd == other.states[b.name].spent_usd
    standby = Ledger([b])
    standby.seed(one.states[b.name])
    standby.seed(other.states[b.name])
    for event, position in calls:  # read again from the partitions' checkpoints
        standby.record(event, at(3), position)
    assert standby.states[b.name].spent_usd == Decimal("3.00")


def on_topic(raw: list[bytes]) -> dict[str, BudgetState]:
    """The latest state of each budget among ``raw`` (the budgets topic, keyed by budget:
    each one's states in the order published)."""
    states = [BudgetState.model_validate_json(value) for value in raw]
    return {s.budget: s for s in states}


def search_call(now: datetime) -> ResponseEvent:
    """A call of acme's team search: $0.000021 (gpt-4o-mini, 100 tokens in, 10 out)."""
    return sample.response(
        now,
        model_requested="gpt-4o-mini",
        usage=Usage(input_tokens=100, output_tokens=10),
        attribution=Attribution(tenant="acme", team="search"),
    )


async def send_calls(kafka: Kafka, calls: list[ResponseEvent], key: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        for call in calls:
            await producer.send_and_wait(
                kafka.names.responses, call.model_dump_json().encode(), key=key
            )
    finally:
        await producer.stop()


async def published(
    kafka: Kafka, done: Callable[[dict[str, BudgetState]], bool]
) -> dict[str, BudgetState]:
    """The latest state of each budget on the topic, once ``done`` holds of them."""
    async with asyncio.timeout(60):
        while not done(states := on_topic(await topics.read_all(kafka, kafka.names.budgets))):
            await asyncio.sleep(0.2)
    return states


async def test_a_worker_given_a_changed_limit_judges_and_alerts_by_it(tmp_path: Path) -> None:
    """A real `llmtap worker` restarted with changed limits, on a real broker holding
    the states it published before: "raised" (90% of its old limit spent, 50% and 80%
    alerted) publishes itself judged by its new limit (9%: ok), and alerts the new
    limit's 50% once calls cross it; "lowered" (below its spend) is published exhausted,
    its three thresholds alerted at once, with no call."""
    now = datetime.now(UTC)
    old_raised = budget(
        name="raised", scope="team", value="search", tenant="acme", limit_usd=Decimal("0.00001")
    )
    new_raised = old_raised.model_copy(update={"limit_usd": Decimal("0.0001")})
    old_lowered = budget(
        name="lowered", scope="team", value="ads", tenant="acme", limit_usd=Decimal("0.001")
    )
    new_lowered = old_lowered.model_copy(update={"limit_usd": Decimal("0.000008")})
    before: list[BudgetState] = []
    for b in (old_raised, old_lowered):
        state, _ = spend(b, None, Decimal("0.000009"), now, now)
        assert state is not None
        before.append(state)
    assert (before[0].status, before[0].crossed) == ("warning", (50, 80))
    configured = [json.loads(b.model_dump_json()) for b in (new_raised, new_lowered)]
    async with start_broker(PARTITIONS) as broker:
        kafka = Kafka(broker.bootstrap)
        assert await publish_states(kafka, before)
        env = {"LLMTAP_BUDGETS": json.dumps(configured)}
        async with stream_worker(broker.bootstrap, tmp_path / "w", extra_env=env):
            judged = await published(kafka, lambda s: s["raised"].limit_usd == new_raised.limit_usd)
            assert (judged["raised"].status, judged["raised"].crossed) == ("ok", ())
            assert (judged["lowered"].status, judged["lowered"].crossed) == (
                "exhausted",
                (50, 80, 100),
            )
            # Two calls of $0.000021: 51% of the new limit.
            await send_calls(kafka, [search_call(now) for _ in range(2)], key=b"limits")
            await published(kafka, lambda s: s["raised"].spent_usd == Decimal("0.000051"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15  # the alerts go out with the states, maybe later
            while True:
                raw = await topics.read_all(kafka, kafka.names.alerts)
                alerts = [Alert.model_validate_json(value) for value in raw]
                if len(alerts) >= 4 or loop.time() > deadline:
                    break
                await asyncio.sleep(0.2)
    by_budget = {
        name: sorted((int(a.threshold or 0), a.event_id) for a in alerts if a.rule == name)
        for name in ("raised", "lowered")
    }
    start = before[0].period_start
    assert by_budget["raised"] == [(50, threshold_alert_id(new_raised, start, 50))]
    assert by_budget["raised"][0][1] != threshold_alert_id(old_raised, start, 50)
    assert by_budget["lowered"] == [
        (t, threshold_alert_id(new_lowered, start, t)) for t in (50, 80, 100)
    ]


def test_a_call_counts_in_the_period_it_ended_in_from_midnight_on() -> None:
    """A period is [start, end): a call that started in November and ended at the
    stroke of midnight is December's spend, counted on a running November state too."""
    b = budget(limit_usd=Decimal("100"))
    ledger = Ledger([b])
    ledger.record(costed("1.00", at(30, 23)), at(30, 23), (0, 0))
    december = datetime(2026, 12, 1, tzinfo=UTC)
    call = sample.costed(
        sample.response(
            december,
            ts_start=december - timedelta(minutes=5),
            usage=Usage(input_tokens=10, output_tokens=1),
            latency_ms=1,
            proxy_overhead_ms=0.1,
            attribution=Attribution(tenant="acme", team="search"),
        ),
        sample.cost("2.00"),
    )
    ledger.record(call, december + timedelta(seconds=1), (0, 1))
    state = ledger.states[b.name]
    assert state.period_start == december
    assert state.spent_usd == Decimal("2.00")
    assert state.applied == {0: 2}


def test_a_budget_new_to_a_worker_is_partial_until_the_store_s_rebuild_reaches_it() -> None:
    """A worker given a budget it has no state of (added to the configuration, the
    store's rebuild not published yet) counts it from its first roll or call: a state
    without the period's spend before, said ``partial`` (an ingress judges no hard cap
    on it). The store's rebuild makes it whole, larger or not (the largest spend seen
    wins), published at the next roll with or without a call; so does a new period."""
    b = budget(limit_usd=Decimal("100"))
    ledger = Ledger([b])
    (first,), _ = ledger.roll(at(3))
    assert (first.spent_usd, first.partial) == (Decimal(0), True)
    assert ledger.roll(at(3)) == ([], [])
    assert not ledger.rebuilt(first)  # its own, read back: no rebuild
    ledger.record(costed("0.70", at(3)), at(3), (0, 0))
    counted = ledger.states[b.name]
    assert counted.partial
    rebuild = current(b, None, at(3)).model_copy(update={"spent_usd": Decimal("0.60")})
    assert ledger.rebuilt(rebuild)
    (whole,), _ = ledger.roll(at(3))
    assert (whole.spent_usd, whole.partial, whole.applied) == (Decimal("0.70"), False, {0: 1})
    # Said only when true: a whole state is read by an llmtap that knows no `partial`.
    assert "partial" not in whole.model_dump_json()
    assert BudgetState.model_validate_json(first.model_dump_json()) == first
    # A standby seeded with the holder's partial state, then the (smaller) rebuild.
    standby = Ledger([b])
    standby.seed(counted)
    standby.seed(rebuild)
    assert (standby.states[b.name].spent_usd, standby.states[b.name].partial) == (
        Decimal("0.70"),
        False,
    )
    # The rebuild reaching a worker before its first roll: its first state, whole.
    holder = Ledger([b])
    assert holder.rebuilt(rebuild)
    assert holder.states[b.name] == rebuild
    # A first call counted from nothing is partial; a period rolled into is whole.
    ledger = Ledger([b])
    ledger.record(costed("1", at(30, 23)), at(30, 23), (0, 0))
    assert ledger.states[b.name].partial
    (december,), _ = ledger.roll(at(1, month=12))
    assert (december.spent_usd, december.partial) == (Decimal(0), False)


def test_a_seeded_state_takes_offsets_only_with_the_same_spend_counted_further() -> None:
    b = budget(limit_usd=Decimal("100"))
    ledger = Ledger([b])
    ledger.record(costed("1.00", at(3)), at(3), (0, 0))
    ledger.record(costed("1.00", at(3)), at(3), (1, 0))
    mine = ledger.states[b.name]
    assert mine.applied == {0: 1, 1: 1}
    # Less spend, further offsets (a worker behind on spend, ahead on a partition): its
    # offsets are not taken, or the calls it had not counted are passed over.
    ledger.seed(mine.model_copy(update={"spent_usd": Decimal("1.00"), "applied": {0: 5, 1: 1}}))
    assert ledger.states[b.name].applied == {0: 1, 1: 1}
    # The same spend, counted further on one partition and as far on the other (past
    # calls that cost nothing): taken.
    ledger.seed(mine.model_copy(update={"applied": {0: 4, 1: 1}}))
    assert ledger.states[b.name].applied == {0: 4, 1: 1}
    ledger.record(costed("0.50", at(3)), at(3), (1, 1))
    assert ledger.states[b.name].spent_usd == Decimal("2.50")


async def test_a_worker_given_a_changed_period_counts_on_from_the_new_period_s_spend(
    tmp_path: Path,
) -> None:
    """An operator turns a daily budget into a monthly one mid-month and restarts. The
    budgets topic holds the daily state the worker published before (today's spend) and
    then the monthly one the store rebuilt from ClickHouse (the month's spend so far).
    The worker must count on from the month's spend: it kept the daily state (its period
    starts later than the month's), judged it another period's, and started the month
    from $0 (a hard cap lifted, thresholds alerted again). (On the 1st both periods
    start together: the larger, the month's, was kept anyway.)"""
    now = datetime.now(UTC)
    daily = budget(
        name="to-monthly",
        scope="team",
        value="search",
        tenant="acme",
        limit_usd=Decimal("1"),
        period="day",
    )
    monthly = daily.model_copy(update={"period": "month"})
    today = current(daily, None, now).model_copy(update={"spent_usd": Decimal("0.2")})
    month = current(monthly, None, now).model_copy(
        update={"spent_usd": Decimal("0.6"), "crossed": (50,)}
    )
    async with start_broker(PARTITIONS) as broker:
        kafka = Kafka(broker.bootstrap)
        assert await publish_states(kafka, [today])  # the worker's, before the change
        assert await publish_states(kafka, [month])  # the store's rebuild, at its start
        env = {"LLMTAP_BUDGETS": json.dumps([json.loads(monthly.model_dump_json())])}
        async with stream_worker(broker.bootstrap, tmp_path / "w", extra_env=env):
            await send_calls(kafka, [search_call(now)], key=b"period")
            states = await published(kafka, lambda s: bool(s["to-monthly"].applied))
    state = states["to-monthly"]
    assert (state.period, state.period_start) == ("month", month.period_start)
    assert state.spent_usd == Decimal("0.600021")


async def test_a_budget_added_mid_period_counts_on_from_the_store_s_rebuild_published_late(
    tmp_path: Path,
) -> None:
    """A budget added mid-period (docker-compose: the worker does not wait for the store).
    The worker starts first and counts the new budget from $0; the store, started
    beside it, then publishes the month's spend so far, read from ClickHouse. The
    worker must count on from that spend ("within a period, the largest spend seen
    wins"): it kept the rebuild aside while it held the partitions and counted on from
    its own $0, and the ingress, taking the larger state, dropped to the worker's once
    it passed the rebuild's: the spend before the budget was added, lost to the cap.
    Until the rebuild, its states say they are ``partial`` (a hard cap is not judged on
    them); taken, it publishes its state whole, without waiting for a call (an ingress
    started later may find only the worker's latest on the compacted topic)."""
    now = datetime.now(UTC)
    added = budget(
        name="added", scope="team", value="search", tenant="acme", limit_usd=Decimal("1")
    )
    env = {"LLMTAP_BUDGETS": json.dumps([json.loads(added.model_dump_json())])}
    port = free_port()
    followed = "llmtap_worker_budget_states_followed_total"
    async with (
        start_broker(PARTITIONS) as broker,
        stream_worker(broker.bootstrap, tmp_path / "w", metrics_port=port, extra_env=env),
        aiohttp.ClientSession() as session,
    ):
        kafka = Kafka(broker.bootstrap)

        async def states_followed() -> float:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                return metric(await response.text(), followed)

        first = await published(kafka, lambda s: "added" in s)  # the worker holds it
        assert (first["added"].spent_usd, first["added"].partial) == (Decimal(0), True)
        # Every state on the topic followed (its own): the next one followed is the store's.
        async with asyncio.timeout(60):
            while await states_followed() < len(await topics.read_all(kafka, kafka.names.budgets)):
                await asyncio.sleep(0.1)
        before = await states_followed()
        rebuilt = current(added, None, now).model_copy(
            update={"spent_usd": Decimal("0.6"), "crossed": (50,), "status": "warning"}
        )
        assert await publish_states(kafka, [rebuilt])  # the store's, as it starts
        async with asyncio.timeout(60):
            while await states_followed() <= before:
                await asyncio.sleep(0.1)

        async def whole() -> int:  # states of the rebuild's spend, whole: its and the worker's
            raw = await topics.read_all(kafka, kafka.names.budgets)
            states = map(BudgetState.model_validate_json, raw)
            return sum(s.spent_usd == Decimal("0.6") and not s.partial for s in states)

        async with asyncio.timeout(60):  # the worker's own, after the rebuild, no call
            while await whole() < 2:
                await asyncio.sleep(0.1)
        await send_calls(kafka, [search_call(now)], key=b"added")
        states = await published(kafka, lambda s: bool(s["added"].applied))
    assert (states["added"].spent_usd, states["added"].partial) == (Decimal("0.600021"), False)


def test_periods_roll_only_once_the_calls_appended_before_their_end_are_read() -> None:
    """A worker down from 23:30 to 00:30 takes over a backlog with calls of 23:40 and
    23:50 in it. Its roll timer rolls no period before the stage has read up to a
    snapshot of the end offsets taken after midnight (stream/rolls.py): the late calls
    count on the closing day (70% to 120%), raising its 80% and 100% alerts; the day
    then rolls. Before, the timer rolled the day at once and both calls counted in no
    period. A worker caught up rolls at the tick after midnight, as by the clock."""
    b = budget(period="day", limit_usd=Decimal("10"))
    ledger = Ledger([b])
    midnight = at(1, 0, month=12)
    ledger.roll(at(30, 22))
    ledger.record(costed("7", at(30, 22)), at(30, 22), (0, 0))  # 70%: 50% alerted
    mark = Watermark()
    takeover = midnight + timedelta(minutes=30)
    read = {0: 1}  # from the checkpoint: offsets 1 and 2 are the backlog
    mark.taken(takeover, {0: 3})
    assert roll_time(takeover, mark.reached(read, {0: 3})) is None  # nothing known read: no roll
    raised = []
    for offset, (cost, ended) in enumerate(
        [("2", midnight - timedelta(minutes=20)), ("3", midnight - timedelta(minutes=10))], 1
    ):
        raised += ledger.record(costed(cost, ended), takeover, (0, offset))[1]
        read[0] = offset + 1
    assert [a.threshold for a in raised] == [80, 100]
    assert ledger.states[b.name].spent_usd == Decimal("12")
    at_ = roll_time(takeover + timedelta(seconds=1), mark.reached(read, read))
    assert at_ == takeover
    rolled, _ = ledger.roll(at_)
    assert [(s.period_start, s.spent_usd, s.applied) for s in rolled] == [
        (midnight, Decimal(0), {0: 3})
    ]
    # One appended after the snapshot that rolled the day: counted nowhere, said so.
    assert ledger.late == 0
    assert ledger.record(costed("1", midnight - timedelta(seconds=1)), takeover, (0, 3)) == (
        set(),
        [],
    )
    assert ledger.late == 1
    # Caught up: a snapshot reached as it is taken; one not reached yet is waited for
    # (not replaced: a stage never quite caught up would never reach the newest).
    mark.taken(takeover + timedelta(seconds=2), {0: 3})
    assert mark.reached(read, read) == takeover + timedelta(seconds=2)
    mark.taken(takeover + timedelta(seconds=3), {0: 5})
    assert mark.waiting and mark.reached(read, read) == takeover + timedelta(seconds=2)
    assert roll_time(takeover + timedelta(seconds=4), mark.at) == takeover + timedelta(seconds=2)
    assert read_past({0: 5, 1: 2}, {0: 5, 1: 2}) and not read_past({0: 5}, {0: 5, 1: 1})


def test_a_call_of_the_closing_day_read_after_one_of_the_next_counts_in_it() -> None:
    """A backlog across midnight on two partitions, read one after the other (review
    R2, finding 1): a call of today on partition 0 starts today for the budget; the day
    before's calls on partition 1, read after, count in the day before until the
    watermark passes its end (its 80% and 100% alerts raised, with the ids they would
    have had), today's state counting past their offsets (a restart from it skips them,
    a repeat adds nothing). The day before's state is published before today's (final as
    today started, then as counted into). Once rolled at or past midnight, the day
    before is final: a call of it read after counts in no period. Before, all of them
    counted in no period."""
    b = budget(period="day", limit_usd=Decimal("10"))
    ledger = Ledger([b])
    midnight = at(1, 0, month=12)
    takeover = midnight + timedelta(minutes=30)
    ledger.roll(at(30, 22))
    ledger.record(costed("7", at(30, 22)), at(30, 22), (1, 0))  # 70%: 50% alerted
    assert ledger.record(costed("1", midnight + timedelta(minutes=1)), takeover, (0, 0)) == (
        {b.name},
        [],
    )
    day_before = ledger.closings()
    assert [(s.period_start, s.spent_usd) for s in day_before] == [(at(30, 0), Decimal("7"))]
    late = costed("3", midnight - timedelta(minutes=5))
    changed, raised = ledger.record(late, takeover, (1, 1))
    assert changed == {b.name}
    assert [(a.event_id, a.window_end) for a in raised] == [
        (threshold_alert_id(b, at(30, 0), t), midnight) for t in (80, 100)
    ]
    assert ledger.record(late, takeover, (1, 2)) == ({b.name}, [])  # a repeat: offset only
    assert [(s.period_start, s.spent_usd, s.status) for s in ledger.closings()] == [
        (at(30, 0), Decimal("10"), "exhausted")
    ]
    today = ledger.states[b.name]
    assert (today.period_start, today.spent_usd, today.applied) == (
        midnight,
        Decimal("1"),
        {0: 1, 1: 3},
    )
    assert ledger.late == 0
    # Restarted from today's state and older offsets: the day before's calls skipped.
    again = Ledger([b])
    again.seed(today)
    assert again.record(late, takeover, (1, 1)) == (set(), [])
    assert again.late == 0
    # The watermark past midnight: the day before is final.
    ledger.roll(midnight)
    assert ledger.record(costed("1", midnight - timedelta(minutes=1)), takeover, (1, 3)) == (
        set(),
        [],
    )
    assert ledger.late == 1 and ledger.closings() == []


async def test_the_watermark_is_not_reached_inside_tansu_s_last_record_batch() -> None:
    """Three record batches of 50 on a real Tansu partition, read at most 101 records:
    Tansu's end offset is the last batch's first offset plus one (101), so offsets 101
    to 149, appended before the snapshot, were unread when the watermark counted as
    reached (review R2, finding 2). It now waits for the fetch answers' high watermark
    (150), and is reached once the batch is read."""
    async with start_broker(2) as broker:
        tp = TopicPartition(Names().responses, 0)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=200)
        await producer.start()
        try:
            for _ in range(3):
                batch = [await producer.send(tp.topic, b"{}", partition=0) for _ in range(50)]
                await asyncio.gather(*batch)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            got = await consumer.getmany(tp, timeout_ms=5000, max_records=101)
            read = {0: got[tp][-1].offset + 1}
            mark = Watermark()
            snapshot = datetime.now(UTC)
            ends = await consumer.end_offsets([tp])
            mark.taken(snapshot, {0: ends[tp]})
            assert read[0] >= ends[tp]  # Tansu's end offset: inside the last batch
            assert mark.reached(read, {0: consumer.highwater(tp)}) is None
            while read[0] < 150:
                rest = await consumer.getmany(tp, timeout_ms=5000)
                read[0] = max([read[0]] + [r.offset + 1 for r in rest.get(tp, [])])
            assert mark.reached(read, {0: consumer.highwater(tp)}) == snapshot
        finally:
            await consumer.stop()


def test_the_store_s_rebuild_seeded_keeps_the_offsets_counted() -> None:
    """A worker starting takes up its own last state ($10, offsets to 10, committed at
    5), then the store's rebuild ($11, no offsets): it counts on from the rebuild's
    spend with its state's offsets, as a worker holding the partitions does
    (Ledger.rebuilt), so offsets 5 to 9, read again, count nothing twice. Before, the
    rebuild was taken whole, its offsets none: $17 for $11 spent."""
    b = budget(limit_usd=Decimal("100"))
    now = at(20)
    mine = current(b, None, now).model_copy(
        update={"spent_usd": Decimal("10"), "applied": {0: 10}, "last_event_at": now}
    )
    rebuild = current(b, None, now).model_copy(update={"spent_usd": Decimal("11")})
    for take in ("seed", "rebuilt"):
        ledger = Ledger([b])
        ledger.seed(mine)
        getattr(ledger, take)(rebuild)
        assert ledger.states[b.name].applied == {0: 10}
        for offset in range(5, 11):  # offset 10: the call the rebuild has too, read on
            ledger.record(costed("1", now), now + timedelta(minutes=1), (0, offset))
        assert ledger.states[b.name].spent_usd == Decimal("12"), take


def midnight_backlog() -> tuple[
    datetime, datetime, datetime, BudgetConfig, BudgetState, ResponseEvent
]:
    """Now, today's midnight, 23:55 the day before, a $0.0001 day budget of team search,
    its state of the day before at 40%, and a call of another team's (the backlog)."""
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    late = today - timedelta(minutes=5)
    b = budget(
        name="daily",
        scope="team",
        value="search",
        tenant="acme",
        period="day",
        limit_usd=Decimal("0.0001"),
        hard_cap=False,
    )
    before = current(b, None, late).model_copy(update={"spent_usd": Decimal("0.00004")})
    filler = sample.response(
        late,
        model_requested="gpt-4o-mini",
        usage=Usage(input_tokens=1, output_tokens=1),
        attribution=Attribution(tenant="other", team="x"),
    )
    return now, today, late, b, before, filler


async def test_a_worker_back_after_midnight_counts_the_day_before_s_backlog_in_it(
    tmp_path: Path,
) -> None:
    """A real `llmtap worker` started after midnight (down across it) with the day
    before's last calls behind a backlog on llmtap.responses (read a record at a time:
    seconds of it). Its state of the day before is at 40%; four calls of 23:55 take it
    to 124%, alerted at 50%, 80% and 100%; then the new day rolls and counts a call of
    today. Before, the worker rolled the day within a second, before reading the
    backlog: the day before stayed at 40%, no alert came."""
    now, today, late, b, before, filler = midnight_backlog()
    async with start_broker(PARTITIONS) as broker:
        kafka = Kafka(broker.bootstrap)
        assert await publish_states(kafka, [before])
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
        await producer.start()
        try:
            calls = [filler.model_copy(update={"request_id": uuid4()}) for _ in range(6000)]
            calls += [search_call(late) for _ in range(4)] + [search_call(now)]
            sent = [
                await producer.send(
                    kafka.names.responses, call.model_dump_json().encode(), key=b"backlog"
                )
                for call in calls
            ]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        env = {
            "LLMTAP_BUDGETS": json.dumps([json.loads(b.model_dump_json())]),
            "LLMTAP_STREAM_BATCH_RECORDS": "1",
        }
        async with stream_worker(broker.bootstrap, tmp_path / "w", extra_env=env):
            await published(
                kafka, lambda s: s["daily"].period_start == today and s["daily"].spent_usd > 0
            )
            raw = await topics.read_all(kafka, kafka.names.budgets)
            alerts = [
                Alert.model_validate_json(value)
                for value in await topics.read_all(kafka, kafka.names.alerts)
            ]
    spent = {
        (s.period_start, s.spent_usd)
        for s in map(BudgetState.model_validate_json, raw)
        if s.budget == "daily"
    }
    assert (late.replace(hour=0, minute=0), Decimal("0.000124")) in spent
    assert (today, Decimal("0.000021")) in spent
    assert sorted(int(a.threshold or 0) for a in alerts if a.window_end == today) == [50, 80, 100]


async def test_a_worker_back_after_midnight_counts_the_day_before_s_calls_on_other_partitions(
    tmp_path: Path,
) -> None:
    """As above, the backlog spread over partitions (review R2, findings 1 and 3): the
    day before's four calls of 23:55 on partition 1 behind 6000 others, a call of today
    on partition 0, read first. Today's call starts the day for the budget; the day
    before's, read after, count in it (40% to 124%, alerted at 50%, 80% and 100%), and
    its state is published, before today's (the topic's latest, counted past them).
    Before, the day before stayed at 40%, no alert came, "counted in no period"."""
    now, today, late, b, before, filler = midnight_backlog()
    async with start_broker(PARTITIONS) as broker:
        kafka = Kafka(broker.bootstrap)
        assert await publish_states(kafka, [before])
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
        await producer.start()
        try:
            calls = [(filler.model_copy(update={"request_id": uuid4()}), 1) for _ in range(6000)]
            calls += [(search_call(late), 1) for _ in range(4)] + [(search_call(now), 0)]
            sent = [
                await producer.send(
                    kafka.names.responses, call.model_dump_json().encode(), partition=partition
                )
                for call, partition in calls
            ]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        env = {"LLMTAP_BUDGETS": json.dumps([json.loads(b.model_dump_json())])}
        async with stream_worker(broker.bootstrap, tmp_path / "w", extra_env=env):
            latest = await published(
                kafka,
                lambda s: s["daily"].period_start == today and s["daily"].applied.get(1) == 6004,
            )
            raw = await topics.read_all(kafka, kafka.names.budgets)
            alerts = [
                Alert.model_validate_json(value)
                for value in await topics.read_all(kafka, kafka.names.alerts)
            ]
        log = (tmp_path / "w" / "worker.log").read_text()
    assert (latest["daily"].spent_usd, latest["daily"].applied) == (
        Decimal("0.000021"),
        {0: 1, 1: 6004},
    )
    spent = {
        (s.period_start, s.spent_usd)
        for s in map(BudgetState.model_validate_json, raw)
        if s.budget == "daily"
    }
    assert (late.replace(hour=0, minute=0), Decimal("0.000124")) in spent
    assert sorted(int(a.threshold or 0) for a in alerts if a.window_end == today) == [50, 80, 100]
    assert "counted in no period" not in log
