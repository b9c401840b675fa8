"""The ingress's budget book (ingress/guards/budgets.py) on its own: what a call may
cost at worst, and what a hard cap counts across a period's rollover."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from ingress.guards.bounds import Advisor, Reach, choices, reach
from ingress.guards.budgets import BudgetBook
from ingress.guards.refusals import Exhausted, Unpriced
from ingress.routing import endpoint_geo
from llmtap import wire
from llmtap.config_sections import BudgetConfig, ProviderConfig
from llmtap.events import Attribution, PlacedCosts, Reservations, Usage, utcnow
from stream.budgets import fresh
from stream.catalog import Catalog, ModelPrice, Rates, TierRates, load_catalog
from stream.pricing import cost_of, rate

ACME = Attribution(tenant="acme")
MIDNIGHT = datetime(2026, 11, 30, tzinfo=UTC)


def book(limit: str) -> tuple[BudgetBook, BudgetConfig]:
    budget = BudgetConfig(
        name="acme-day", scope="tenant", value="acme", period="day", limit_usd=Decimal(limit)
    )
    return BudgetBook([budget], load_catalog(), default_max_tokens=4096), budget


def test_every_answer_a_call_asks_for_may_spend_max_tokens() -> None:
    budgets, _ = book("10")
    one = budgets.worst.cost("gpt-4o", 100, 1000, MIDNIGHT)
    eight = budgets.worst.cost("gpt-4o", 100, 1000, MIDNIGHT, choices=8)
    assert one is not None and eight is not None
    prompt = 100 * Decimal("2.50") / 1_000_000  # every body byte a token, at gpt-4o input
    assert eight - prompt == 8 * (one - prompt)
    assert eight - prompt == Decimal("0.08")  # 8 x 1000 tokens at $10 a million


def limited_book(**limits: int) -> BudgetBook:
    """A book over one model at $1 a million tokens in and $10 out, with ``limits``."""
    rates = Rates(effective_from=MIDNIGHT.date(), input=Decimal(1), output=Decimal(10))
    price = ModelPrice(provider="acme", prices=[rates], **limits)
    catalog = Catalog(models={"acme-1": price})
    return BudgetBook([], catalog, default_max_tokens=4096, default_context_tokens=1_000_000)


def test_a_call_without_max_tokens_may_write_the_most_its_model_writes() -> None:
    """A hard cap that assumed a fixed ceiling (4,096) for a call naming no max_tokens
    let a model that writes more (o3: 100,000) overshoot it."""
    capped = limited_book(max_output_tokens=100_000)
    unknown = limited_book()
    assert capped.worst.cost("acme-1", 0, None, MIDNIGHT) == Decimal("1.00")  # 100k at $10/M
    assert unknown.worst.cost("acme-1", 0, None, MIDNIGHT) == Decimal("0.04096")  # the default
    # A max_tokens the call names is reserved in full, past the catalog's limit too.
    assert capped.worst.cost("acme-1", 0, 500_000, MIDNIGHT) == Decimal("5.00")
    assert capped.worst.cost("acme-1", 0, 1_000, MIDNIGHT) == Decimal("0.01")
    assert capped.worst.cost("acme-1", 0, None, MIDNIGHT, choices=3) == Decimal("3.00")


def test_a_prompt_is_bounded_by_its_model_s_context_window() -> None:
    windowed = limited_book(context_window=128_000, max_output_tokens=0)
    unknown = limited_book(max_output_tokens=0)
    # A body's bytes past the window cannot all be tokens the model reads.
    assert windowed.worst.cost("acme-1", 500_000, None, MIDNIGHT) == Decimal("0.128")
    assert windowed.worst.cost("acme-1", 1_000, None, MIDNIGHT) == Decimal("0.001")
    assert unknown.worst.cost("acme-1", 500_000, None, MIDNIGHT) == Decimal("0.5")
    # A body that does not hold its input reserves the default context (1,000,000
    # tokens) at least (tools run by the provider read a window each round), or more
    # when a window is larger.
    assert windowed.worst.cost("acme-1", 10, 0, MIDNIGHT, input_unbounded=True) == Decimal(1)
    assert unknown.worst.cost("acme-1", 10, 0, MIDNIGHT, input_unbounded=True) == Decimal(1)
    wide = limited_book(context_window=2_000_000)
    assert wide.worst.cost("acme-1", 10, 0, MIDNIGHT, input_unbounded=True) == Decimal(2)


def test_after_midnight_the_cap_counts_calls_before_the_stream_rolls_the_period_over() -> None:
    """The published state is still yesterday's (the stream lags, or is down): the calls
    that ended since midnight are today's spend, call after call."""
    budgets, budget = book("1.00")
    yesterday = fresh(budget, MIDNIGHT - timedelta(hours=1), MIDNIGHT - timedelta(hours=1))
    budgets.update(yesterday.model_copy(update={"spent_usd": Decimal("0.90")}))
    usage = Usage(input_tokens=0, output_tokens=50_000)  # gpt-4o: $0.50
    admitted = 0
    for minute in range(10):
        now = MIDNIGHT + timedelta(minutes=5 + minute)
        call = uuid.uuid4()
        if budgets.admit(call, ACME, "gpt-4o", 10, 10, now) is not None:
            break
        admitted += 1
        budgets.settle(call, "gpt-4o", usage, now + timedelta(seconds=1))
    assert admitted == 2  # $0.50 + $0.50 of today's $1.00; yesterday's $0.90 is gone


def test_a_period_with_no_state_published_is_made_fresh_once_and_ends_on_time() -> None:
    """With no state of the period published (none yet, or the stream not rolled over
    past midnight), each admission made a fresh state (~15 µs a capped call and budget,
    pydantic's validation): made once a period now, and a new one at its end."""
    budgets, budget = book("1.00")
    before = MIDNIGHT - timedelta(seconds=1)
    state, committed = budgets.committed(budget, before - timedelta(hours=1))
    assert budgets.committed(budget, before)[0] is state  # was: a new one each time
    assert (state.period_start, state.spent_usd, committed) == (
        MIDNIGHT - timedelta(days=1),
        Decimal(0),
        Decimal(0),
    )
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 10, before) is None
    budgets.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=50_000), before)
    assert budgets.committed(budget, before)[1] == Decimal("0.5")
    today, committed = budgets.committed(budget, MIDNIGHT)
    assert (today.period_start, today.period_end, committed) == (
        MIDNIGHT,
        MIDNIGHT + timedelta(days=1),
        Decimal(0),
    )
    assert budgets.committed(budget, MIDNIGHT + timedelta(hours=23))[0] is today
    # Published, this period's state is the one: and past its end, a fresh one again.
    published = fresh(budget, MIDNIGHT, MIDNIGHT).model_copy(update={"spent_usd": Decimal("0.25")})
    budgets.update(published)
    assert budgets.committed(budget, MIDNIGHT + timedelta(hours=1)) == (published, Decimal("0.25"))
    tomorrow = MIDNIGHT + timedelta(days=1)
    assert budgets.committed(budget, tomorrow)[0].period_start == tomorrow
    assert budgets.committed(budget, tomorrow)[0].spent_usd == 0


def test_a_call_that_ended_before_midnight_is_not_today_s_spend() -> None:
    budgets, _ = book("1.00")
    late = uuid.uuid4()
    before = MIDNIGHT - timedelta(seconds=30)
    assert budgets.admit(late, ACME, "gpt-4o", 10, 10, before) is None
    budgets.settle(late, "gpt-4o", Usage(input_tokens=0, output_tokens=90_000), before)
    # $0.90 ended yesterday; today a $0.16 worst case still fits the $1.00.
    after = MIDNIGHT + timedelta(seconds=30)
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 16_000, after) is None


def test_the_answers_a_call_asks_for_are_read_from_n_and_best_of() -> None:
    assert choices({"model": "gpt-4o"}) == 1
    assert choices({"n": 8}) == 8
    assert choices({"n": 2, "best_of": 5}) == 5  # completions: best_of are generated
    assert choices({"n": True, "best_of": "nine"}) == 1  # not counts: refused upstream
    assert choices({"best_of": "9"}) == 9  # as a server built on pydantic reads it


def responded(
    call: uuid.UUID,
    model: str,
    usage: Usage,
    started: datetime,
    ended: datetime,
    served: str = "",
) -> wire.Response:
    """The response event of an OpenAI chat call, as the stream prices it."""
    return wire.Response(
        request_id=call,
        ts_start=started,
        ts_end=ended,
        provider="openai",
        endpoint="chat.completions",
        model_requested=model,
        model_served=served,
        stream=False,
        status="ok",
        http_status=200,
        usage=wire.usage_of(usage),
        latency_ms=(ended - started).total_seconds() * 1000,
        proxy_overhead_ms=0.0,
    )


def test_a_call_across_a_price_change_is_held_at_the_price_it_started_at() -> None:
    """GPT-5.6 Luna's price fell 80% at midnight of 2026-07-30: a call started before
    and ended after is billed (the stream prices it) at the old price, its start's. The
    ingress held it at the new one, a fifth of its cost, until a state counted it."""
    budgets, _ = book("100")
    started = datetime(2026, 7, 29, 23, 59, 50, tzinfo=UTC)
    ended = started + timedelta(seconds=20)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-5.6-luna", 10, 1_000_000, started) is None
    usage = Usage(input_tokens=0, output_tokens=1_000_000)
    settled = budgets.settle(call, "gpt-5.6-luna", usage, ended, "openai", started=started)
    assert settled is not None and settled.cost == Decimal("6.00")  # not $1.20
    event = responded(call, "gpt-5.6-luna", usage, started, ended)
    counted = rate(event, budgets.catalog).cost
    assert counted is not None and counted["total"] == settled.cost  # the stream's


def test_a_cost_is_held_until_a_state_has_counted_its_own_event() -> None:
    """The stream reads the responses topic's partitions unevenly: a state may count a
    call that ended after ours (another partition, another ingress) before ours. Ours
    is let go only once the state's offset on our event's partition has passed it."""
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    usage = Usage(input_tokens=0, output_tokens=40_000)  # gpt-4o: $0.40
    held = []
    for seconds in (1, 2):
        call = uuid.uuid4()
        assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
        settled = budgets.settle(call, "gpt-4o", usage, now + timedelta(seconds=seconds))
        assert settled is not None and settled.cost == Decimal("0.40")
        held.append(settled)
    first, second = held
    first.delivered(0, 5)  # partition 0, offset 5
    second.delivered(1, 3)
    # A state that counted the first call and, on partition 0, a later $0.10 call of
    # another ingress; partition 1 lags: the second call is not counted yet, though it
    # ended before the last call counted.
    counted = fresh(budget, now, now).model_copy(
        update={
            "spent_usd": Decimal("0.50"),
            "last_event_at": now + timedelta(seconds=3),
            "applied": {0: 10, 1: 2},
        }
    )
    budgets.update(counted)
    # Spent $0.90 really: a $0.30 worst case does not fit the $1.00.
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 30_000, now + timedelta(seconds=4))
    assert refused is not None and refused.budget.name == "acme-day"
    assert budgets.held(now + timedelta(seconds=4)) == {"acme-day": Decimal("0.40")}
    # Partition 1 catches up: the second call is counted, and let go.
    budgets.update(
        counted.model_copy(update={"spent_usd": Decimal("0.90"), "applied": {0: 10, 1: 4}})
    )
    assert budgets.held(now + timedelta(seconds=5)) == {"acme-day": Decimal(0)}


def test_a_cost_not_yet_in_kafka_is_held_whatever_a_state_says() -> None:
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
    budgets.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=40_000), now)
    later = fresh(budget, now, now).model_copy(
        update={"last_event_at": now + timedelta(minutes=1), "applied": {0: 10**9, 1: 10**9}}
    )
    budgets.update(later)
    assert budgets.held(now + timedelta(minutes=1)) == {"acme-day": Decimal("0.40")}


def test_a_cost_is_held_past_an_hour_while_the_stream_lags_or_the_broker_is_down() -> None:
    """Costs no state has counted an hour on were let go: a stream two hours behind, or
    events in the spool through a broker outage, let the cap be spent again every hour.
    Aged, a cost Kafka has is held in its partition's sum until a state has counted past
    it; one Kafka has not (spooled, or dropped), until its period ends."""
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    usage = Usage(input_tokens=0, output_tokens=40_000)  # gpt-4o: $0.40
    costs = []
    for _ in range(2):
        call = uuid.uuid4()
        assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
        costs.append(budgets.settle(call, "gpt-4o", usage, now))
    in_kafka, spooled = costs
    assert in_kafka is not None and spooled is not None
    in_kafka.delivered(0, 7)
    later = now + timedelta(hours=2)
    assert budgets.held(later) == {"acme-day": Decimal("0.80")}
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 30_000, later) is not None
    assert len(budgets.settled["acme-day"]) == 0  # no entry a call kept past the hour
    # The stream catches up on partition 0: the cost in Kafka is counted, and let go.
    caught_up = fresh(budget, now, now).model_copy(
        update={"spent_usd": Decimal("0.40"), "last_event_at": later, "applied": {0: 8}}
    )
    budgets.update(caught_up)
    assert budgets.held(later) == {"acme-day": Decimal("0.40")}
    # The broker back, the spool replayed: Kafka has the other one's event. It is held
    # in its partition's sum, let go once counted (not held twice to the period's end).
    spooled.delivered(1, 4)
    assert budgets.held(later) == {"acme-day": Decimal("0.40")}
    budgets.update(
        caught_up.model_copy(update={"spent_usd": Decimal("0.80"), "applied": {0: 8, 1: 5}})
    )
    assert budgets.held(later) == {"acme-day": Decimal(0)}
    # One spooled past the hour and never delivered is held to the period's end.
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 10_000, later) is None
    budgets.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=10_000), later)
    assert budgets.held(later + timedelta(hours=2)) == {"acme-day": Decimal("0.10")}
    tomorrow = MIDNIGHT + timedelta(days=1, hours=1)
    assert budgets.held(tomorrow) == {"acme-day": Decimal(0)}


def test_a_call_that_reserved_nothing_holds_nothing() -> None:
    budgets, _ = book("1.00")
    usage = Usage(input_tokens=0, output_tokens=40_000)
    globex = Attribution(tenant="globex")  # no budget of its own
    call = uuid.uuid4()
    assert budgets.admit(call, globex, "gpt-4o", 10, 40_000, MIDNIGHT) is None
    assert budgets.settle(call, "gpt-4o", usage, MIDNIGHT) is None


def test_a_cost_told_where_it_went_after_the_state_that_counted_it_is_let_go() -> None:
    """Kafka acked the event's batch, the stream counted it and published its state;
    the rest of the flight was still unacked, so the publisher told the cost later."""
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
    held = budgets.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=40_000), now)
    assert held is not None
    budgets.update(
        fresh(budget, now, now).model_copy(update={"spent_usd": Decimal("0.40"), "applied": {0: 6}})
    )
    assert budgets.held(now) == {"acme-day": Decimal("0.40")}  # where it went: not known yet
    held.delivered(0, 5)
    assert budgets.held(now) == {"acme-day": Decimal(0)}
    # $0.60 left: a $0.60 worst case fits.
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 0, 60_000, now) is None


def test_a_call_whose_usage_is_unknown_holds_its_worst_case_until_its_period_ends() -> None:
    """A client that hangs up before the provider's count: the stream cannot price the
    call and counts nothing for it, so letting its worst case go once a state is past
    its event would erase its spend from the cap (calls cut short could spend without
    end). It is held until the period ends, as one sum a budget (not an entry a call:
    they could be millions)."""
    budgets, budget = book("0.015")
    now = MIDNIGHT + timedelta(hours=9)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 1000, now) is None
    worst = budgets.held(now)["acme-day"]
    assert Decimal("0.0075") < worst < Decimal("0.015")
    assert budgets.settle(call, "gpt-4o", Usage.missing(), now) is None  # nothing to locate
    past_it = fresh(budget, now, now).model_copy(update={"applied": {0: 10}, "last_event_at": now})
    budgets.update(past_it)  # the stream read the event, and counted nothing
    later = now + timedelta(hours=2)  # past SETTLED_MAX_AGE too
    assert budgets.held(later) == {"acme-day": worst}
    assert len(budgets.settled["acme-day"]) == 0
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 1000, later)
    assert refused is not None  # a second such call does not fit the cap
    tomorrow = MIDNIGHT + timedelta(days=1, hours=1)
    assert budgets.held(tomorrow) == {"acme-day": Decimal(0)}
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 1000, tomorrow) is None


@pytest.mark.parametrize(
    "cut",
    [
        Usage.missing().model_copy(update={"output_tokens": 2, "output_tokens_counted": True}),
        # Anthropic's: message_start gave the input, so it is priced, on the count
        Usage(input_tokens=12, output_tokens=2, output_tokens_counted=True),
    ],
)
def test_a_stream_cut_short_holds_its_whole_worst_case_whatever_it_streamed(cut: Usage) -> None:
    """What streamed does not bound what was billed: a reasoning model's hidden tokens
    are billed at the output rate and never streamed (o3 may bill 25,000 for a "Hello";
    Claude's thinking, omitted or summarised, is billed in full), and a background
    response goes on after the connection. So the text counted from a cut-short stream
    is no bound: the whole worst case is held, also when the input is known."""
    budgets, _ = book("10")
    now = MIDNIGHT + timedelta(hours=9)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 1_000, 100_000, now) is None
    worst = budgets.held(now)["acme-day"]
    budgets.settle(call, "gpt-4o", cut, now)
    assert budgets.held(now) == {"acme-day": worst}


def test_a_call_that_ended_before_midnight_holds_nothing_against_the_new_day() -> None:
    """Settled after the stream's state rolled over to the new day: its period is the
    day it ended in, which is over."""
    budgets, budget = book("10")
    before = MIDNIGHT - timedelta(seconds=1)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 1_000, 1_000, before) is None
    budgets.update(fresh(budget, MIDNIGHT, MIDNIGHT))  # today's state arrived first
    budgets.settle(call, "gpt-4o", Usage.missing(), before)
    assert budgets.held(MIDNIGHT + timedelta(hours=12)) == {"acme-day": Decimal(0)}


def test_a_call_whose_input_alone_passes_the_whole_limit_is_not_told_to_lower_max_tokens() -> None:
    """Refused as more than a budget's whole limit, a call is told what would make it
    fit: a smaller max_tokens when its output makes the worst case, not when its input
    alone (a conversation the body does not hold, images, searches) is past the limit."""
    budgets, _ = book("0.30")
    output_bound = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 100_000, MIDNIGHT)
    assert isinstance(output_bound, Exhausted) and output_bound.never_fits
    assert "name a smaller max_tokens" in output_bound.message()
    input_bound = budgets.admit(
        uuid.uuid4(), ACME, "gpt-4o", 10, 1, MIDNIGHT, reach=lambda: Reach(True, 0)
    )
    assert isinstance(input_bound, Exhausted) and input_bound.never_fits
    message = input_bound.message()
    assert "name a smaller max_tokens" not in message
    assert "its input and searches alone may cost $2.5" in message


# Anthropic's fast mode: every token at a premium when it serves the call.
NINE = MIDNIGHT + timedelta(hours=9)


def fast_rates(model: str) -> tuple[Rates, Decimal]:
    found = load_catalog().lookup(model, "anthropic")
    assert found is not None
    rates = found[1].at(NINE)
    assert rates is not None and rates.fast_multiplier is not None
    return rates, rates.fast_multiplier


def test_a_call_asking_for_fast_mode_reserves_its_tokens_at_the_fast_rates() -> None:
    """Its worst case is the standard one times the model's fast multiplier (its search
    fee, per search, is not). A model with no fast price is reserved at the standard
    rates: Anthropic refuses fast mode there. (Run "global": see the data residency
    tests for the rest.)"""
    budgets, _ = book("100")
    rates, times = fast_rates("claude-opus-5")
    dearest = max(r for r in (rates.input, rates.cache_write, rates.cache_write_1h) if r)
    standard = budgets.worst.cost("claude-opus-5", 2_000, 8_000, NINE, "anthropic", geo="global")
    assert standard == (2_000 * dearest + 8_000 * rates.output) / 1_000_000
    fast = budgets.worst.cost(
        "claude-opus-5", 2_000, 8_000, NINE, "anthropic", fast=True, geo="global"
    )
    assert fast == standard * times
    searching = budgets.worst.cost(
        "claude-opus-5", 2_000, 8_000, NINE, "anthropic", web_searches=3, fast=True, geo="global"
    )
    assert searching == fast + Decimal("0.03")  # $10 a thousand
    assert budgets.worst.cost(
        "claude-sonnet-5", 2_000, 8_000, NINE, "anthropic", fast=True, geo="global"
    ) == budgets.worst.cost("claude-sonnet-5", 2_000, 8_000, NINE, "anthropic", geo="global")
    # What admit reserves: the body's speed: "fast" (bounds.reach) says which.
    for asks_fast, worst in ((False, standard), (True, fast)):
        call = uuid.uuid4()
        body = functools.partial(Reach, False, 0, fast=asks_fast, geo="global")
        admitted = budgets.admit(
            call, ACME, "claude-opus-5", 2_000, 8_000, NINE, "anthropic", reach=body
        )
        assert admitted is None
        assert budgets.reserved["acme-day"].pop(call) == worst


def test_a_call_served_fast_holds_its_fast_cost_or_without_a_fast_price_its_worst_case() -> None:
    """Its real cost is at the fast rates; a model the catalog gives no fast price
    (Anthropic added fast mode to it since) cannot be priced by the stream, which counts
    nothing for it, so its worst case is held until the period ends, as for a call whose
    usage is unknown."""
    budgets, _ = book("10")
    rates, times = fast_rates("claude-opus-5")
    fast = Reach(False, 0, fast=True)
    served = Usage(input_tokens=3_000, output_tokens=1_000, speed="fast")
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "claude-opus-5", 100, 1_000, NINE, reach=lambda: fast) is None
    held = budgets.settle(call, "claude-opus-5", served, NINE, "anthropic")
    assert held is not None
    assert held.cost == (3_000 * rates.input + 1_000 * rates.output) * times / 1_000_000

    budgets, _ = book("10")
    call = uuid.uuid4()
    assert (
        budgets.admit(call, ACME, "claude-sonnet-5", 100, 1_000, NINE, reach=lambda: fast) is None
    )
    worst = budgets.reserved["acme-day"][call]
    assert budgets.settle(call, "claude-sonnet-5", served, NINE, "anthropic") is None
    assert budgets.held(NINE + timedelta(hours=2)) == {"acme-day": worst}
    assert budgets.held(MIDNIGHT + timedelta(days=1, hours=1)) == {"acme-day": Decimal(0)}


# Anthropic's data residency: every token at 1.1x when a Claude 4.6+ call runs in the US.


def test_a_call_that_may_run_in_the_us_reserves_its_tokens_at_1_1x() -> None:
    """Asking inference_geo "us", 1.1x the standard worst case (search fees apart);
    "global", the standard one. Asking none, the workspace's default_inference_geo
    decides, which llmtap cannot see: 1.1x too, as the call can be billed so. A model
    with no geography priced (before Claude 4.6) is at the standard rates. It stacks
    with fast mode's."""
    budgets, _ = book("100")
    rates, _ = fast_rates("claude-opus-5")
    times = Decimal("1.1")
    dearest = max(r for r in (rates.input, rates.cache_write, rates.cache_write_1h) if r)
    standard = (2_000 * dearest + 8_000 * rates.output) / 1_000_000

    def worst(model: str = "claude-opus-5", **asked: Any) -> Decimal | None:
        return budgets.worst.cost(model, 2_000, 8_000, NINE, "anthropic", **asked)

    assert worst(geo="global") == standard
    assert worst(geo="us") == worst(geo=None) == worst() == standard * times
    assert worst(geo="eu") == standard * times  # no price for it: the dearest named
    assert worst(geo="us", web_searches=3) == standard * times + Decimal("0.03")
    assert worst(geo="us", fast=True) == standard * 2 * times
    older = worst("claude-opus-4-5", geo="global")
    assert (
        older is not None
        and worst("claude-opus-4-5", geo="us") == worst("claude-opus-4-5") == older
    )
    # What admit reserves: the body's inference_geo (bounds.reach) says which.
    for geo, reserved in (("global", standard), ("us", standard * times), (None, standard * times)):
        call = uuid.uuid4()
        body = functools.partial(Reach, False, 0, geo=geo)
        admitted = budgets.admit(
            call, ACME, "claude-opus-5", 2_000, 8_000, NINE, "anthropic", reach=body
        )
        assert admitted is None
        assert budgets.reserved["acme-day"].pop(call) == reserved


def test_a_call_run_in_the_us_holds_its_cost_at_1_1x_or_in_an_unpriced_geo_its_worst_case() -> None:
    """Its real cost is at 1.1x; one run in a geography its price names no multiplier
    for cannot be priced by the stream, which counts nothing for it, so its worst case
    is held until the period ends, as for a call whose usage is unknown."""
    budgets, _ = book("10")
    rates, _ = fast_rates("claude-opus-5")
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "claude-opus-5", 100, 1_000, NINE) is None
    served = Usage(input_tokens=3_000, output_tokens=1_000, inference_geo="us")
    held = budgets.settle(call, "claude-opus-5", served, NINE, "anthropic")
    assert held is not None
    assert held.cost == (3_000 * rates.input + 1_000 * rates.output) * Decimal("1.1") / 1_000_000

    budgets, _ = book("10")
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "claude-opus-5", 100, 1_000, NINE) is None
    worst = budgets.reserved["acme-day"][call]
    elsewhere = served.model_copy(update={"inference_geo": "eu"})
    assert budgets.settle(call, "claude-opus-5", elsewhere, NINE, "anthropic") is None
    assert budgets.held(NINE + timedelta(hours=2)) == {"acme-day": worst}
    assert budgets.held(MIDNIGHT + timedelta(days=1, hours=1)) == {"acme-day": Decimal(0)}


# OpenAI's priority tier: each token at the model's priority rate when it serves the call.


def test_a_call_openai_may_serve_at_priority_reserves_the_priority_rates() -> None:
    """Asked (service_tier "priority"), or named by no tier on a provider whose project's
    own tier is priority: GPT-4.1's worst case at $3.50 in and $14 out, not $2 and $8. A
    call asking for flex or the default tier, or none on a standard project, reserves the
    standard rates (flex can only cost less). A model with no priority price reserves
    the standard ones."""
    budgets, _ = book("100")
    standard = budgets.worst.cost("gpt-4.1", 2_000, 8_000, NINE, "openai")
    assert standard == (2_000 * Decimal("2.00") + 8_000 * Decimal("8.00")) / 1_000_000
    priority = budgets.worst.cost("gpt-4.1", 2_000, 8_000, NINE, "openai", priority=True)
    assert priority == (2_000 * Decimal("3.50") + 8_000 * Decimal("14.00")) / 1_000_000
    assert budgets.worst.cost(
        "gpt-5-nano", 2_000, 8_000, NINE, "openai", priority=True
    ) == budgets.worst.cost("gpt-5-nano", 2_000, 8_000, NINE, "openai")
    # A prompt past GPT-5.4's 272K threshold may be served at standard, at its
    # long-context rates ($22.50 out, not priority's $30 but more than its $15).
    long = budgets.worst.cost(
        "gpt-5.4", 300_000, 1_000, NINE, "openai", priority=True, geo="global"
    )
    assert long == (300_000 * Decimal("5.00") + 1_000 * Decimal("30.00")) / 1_000_000
    asked: list[tuple[dict[str, str], str, Decimal | None]] = [
        ({"service_tier": "priority"}, "standard", priority),
        ({"service_tier": "fast"}, "standard", priority),  # Fast mode: priority's new name
        ({}, "priority", priority),
        ({"service_tier": "auto"}, "priority", priority),
        ({"service_tier": "default"}, "priority", standard),
        ({"service_tier": "flex"}, "priority", standard),
        ({}, "standard", standard),
        ({"service_tier": "auto"}, "standard", standard),
        ({"service_tier": "flex"}, "standard", standard),
    ]
    for body, project, worst in asked:
        call = uuid.uuid4()
        bounded = functools.partial(reach, {"model": "gpt-4.1", **body}, project_tier=project)
        admitted = budgets.admit(call, ACME, "gpt-4.1", 2_000, 8_000, NINE, "openai", reach=bounded)
        assert admitted is None
        assert budgets.reserved["acme-day"].pop(call) == worst, (body, project)


def test_a_call_asking_for_ultrafast_reserves_the_ultrafast_rates() -> None:
    """GPT-6.2 Sol's Ultrafast tier "costs 3 times the Standard rate through February
    28, 2027, and 6 times" after: a call asking for it (service_tier "ultrafast") is
    reserved at those rates (its dearest input, a cache write: $7.50, then $15; output
    $30, then $60), not the standard $5 and $10 it was reserved at. (Sent to
    api.openai.com: "global", no data-residency uplift.)"""
    budgets, _ = book("100")
    # Its dearest standard input: a 12-hour cache write, $5.
    standard = budgets.worst.cost("gpt-6.2-sol", 2_000, 8_000, NINE, "openai", geo="global")
    assert standard == (2_000 * Decimal("5.00") + 8_000 * Decimal("10.00")) / 1_000_000
    ultrafast = (2_000 * Decimal("7.50") + 8_000 * Decimal("30.00")) / 1_000_000
    assert (
        budgets.worst.cost(
            "gpt-6.2-sol", 2_000, 8_000, NINE, "openai", geo="global", ultrafast=True
        )
        == ultrafast
    )
    march = datetime(2027, 3, 1, 9, tzinfo=UTC)
    assert (
        budgets.worst.cost(
            "gpt-6.2-sol", 2_000, 8_000, march, "openai", geo="global", ultrafast=True
        )
        == 2 * ultrafast
    )
    for body, worst in (({"service_tier": "ultrafast"}, ultrafast), ({}, standard)):
        call = uuid.uuid4()
        bounded = functools.partial(reach, {"model": "gpt-6.2-sol", **body}, geo="global")
        admitted = budgets.admit(
            call, ACME, "gpt-6.2-sol", 2_000, 8_000, NINE, "openai", reach=bounded
        )
        assert admitted is None
        assert budgets.reserved["acme-day"].pop(call) == worst, body


def test_a_call_to_an_openai_data_residency_endpoint_reserves_its_uplift() -> None:
    """A provider on eu.api.openai.com: "a 10% uplift for models released on or after
    March 5, 2026" (GPT-6.2 Sol), none before (GPT-4o); on api.openai.com, none. It
    was reserved at the standard rates wherever it was sent."""
    budgets, _ = book("100")
    eu = ProviderConfig(kind="openai", base_url="https://eu.api.openai.com/v1")
    own = ProviderConfig(kind="openai", base_url="https://api.openai.com/v1")
    standard = (2_000 * Decimal("5.00") + 8_000 * Decimal("10.00")) / 1_000_000
    gpt_4o = (2_000 * Decimal("2.50") + 8_000 * Decimal("10.00")) / 1_000_000
    for model, config, worst in (
        ("gpt-6.2-sol", eu, standard * Decimal("1.1")),
        ("gpt-6.2-sol", own, standard),
        ("gpt-4o", eu, gpt_4o),
    ):
        call = uuid.uuid4()
        bounded = functools.partial(reach, {"model": model}, geo=endpoint_geo(config))
        assert budgets.admit(call, ACME, model, 2_000, 8_000, NINE, "openai", reach=bounded) is None
        assert budgets.reserved["acme-day"].pop(call) == worst, (model, config.base_url)


def test_a_priority_worst_case_covers_the_tier_s_cache_writes() -> None:
    """A priority price whose cache writes cost more than its input (GPT-5.6 bills
    writes at 1.25x input; a pricing_file may give its priority tier so): a call served
    at priority, its whole prompt written to the cache, cost 25% more than its worst
    case, which took the tier's input but not its writes."""
    rates = Rates(
        effective_from=MIDNIGHT.date(),
        input=Decimal("5.00"),
        cached_input=Decimal("0.50"),
        cache_write=Decimal("6.25"),
        output=Decimal("30.00"),
        priority=TierRates(
            input=Decimal("10.00"),
            cached_input=Decimal("1.00"),
            cache_write=Decimal("12.50"),
            output=Decimal("60.00"),
        ),
    )
    price = ModelPrice(provider="openai", prices=[rates], context_window=10**6)
    budgets = BudgetBook([], Catalog(models={"gpt-x": price}), default_max_tokens=1000)
    prompt = 100_000  # bytes: at most as many tokens
    reserved = budgets.worst.cost("gpt-x", prompt, 0, NINE, "openai", priority=True)
    served = Usage(input_tokens=prompt, cache_creation_input_tokens=prompt, service_tier="priority")
    billed = cost_of(served, rates).total
    assert reserved == billed == prompt * Decimal("12.50") / 1_000_000


def test_a_call_served_at_a_tier_holds_its_cost_or_without_a_price_its_worst_case() -> None:
    """Its real cost is at the tier that served it (priority dearer, flex cheaper); a
    model the catalog gives no price for that tier cannot be priced by the stream, which
    counts nothing for it, so its worst case is held until the period ends."""
    for tier, rate_in, rate_out in (("priority", "3.50", "14.00"), ("flex", "0.625", "5.00")):
        budgets, _ = book("10")
        model = "gpt-4.1" if tier == "priority" else "gpt-5"
        call = uuid.uuid4()
        assert budgets.admit(call, ACME, model, 100, 1_000, NINE, "openai") is None
        served = Usage(input_tokens=3_000, output_tokens=1_000, service_tier=tier)
        held = budgets.settle(call, model, served, NINE, "openai")
        assert held is not None, tier
        assert held.cost == (3_000 * Decimal(rate_in) + 1_000 * Decimal(rate_out)) / 1_000_000

    budgets, _ = book("10")
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4.1", 100, 1_000, NINE, "openai") is None
    worst = budgets.reserved["acme-day"][call]
    flex = Usage(input_tokens=3_000, output_tokens=1_000, service_tier="flex")
    assert budgets.settle(call, "gpt-4.1", flex, NINE, "openai") is None  # no flex price
    assert budgets.held(NINE + timedelta(hours=2)) == {"acme-day": worst}
    assert budgets.held(MIDNIGHT + timedelta(days=1, hours=1)) == {"acme-day": Decimal(0)}


def test_a_call_served_under_a_name_with_no_price_holds_its_worst_case() -> None:
    """Admitted at the price of the model asked for, answered under a name the catalog
    has none for (an OpenAI-compatible server's own id, a deployment's name): the stream
    prices by that name and cannot, so it counts nothing, and the cap holds the worst
    case until the period ends (let go, the call's spend vanished from the cap). One
    that spent no tokens is let go: the stream counts it as zero at any price."""
    budgets, _ = book("10")
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 100, 1_000, NINE, "openai") is None
    worst = budgets.reserved["acme-day"][call]
    usage = Usage(input_tokens=3_000, output_tokens=1_000)
    event = responded(call, "gpt-4o", usage, NINE, NINE, served="my-gpt-4o-deployment")
    assert rate(event, load_catalog()).unpriced
    assert budgets.settle(call, event.model, usage, NINE, "openai") is None
    assert budgets.held(NINE + timedelta(hours=2)) == {"acme-day": worst}
    assert budgets.held(MIDNIGHT + timedelta(days=1, hours=1)) == {"acme-day": Decimal(0)}

    budgets, _ = book("10")
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 100, 1_000, NINE, "openai") is None
    assert budgets.settle(call, "my-gpt-4o-deployment", Usage(), NINE, "openai") is None
    assert budgets.held(NINE + timedelta(hours=2)) == {"acme-day": Decimal(0)}


def test_a_model_with_no_price_is_refused_under_a_hard_cap_with_nothing_reserved() -> None:
    budget = BudgetConfig(
        name="acme-day", scope="tenant", value="acme", period="day", limit_usd=Decimal(100)
    )
    strict = BudgetBook([budget], load_catalog(), default_max_tokens=4096)
    refused = strict.admit(uuid.uuid4(), ACME, "no-such-model", 100, 10, NINE)
    assert isinstance(refused, Unpriced) and refused.budget == budget
    assert "'no-such-model'" in refused.message() and "'acme-day'" in refused.message()
    assert not strict.reserved["acme-day"]
    elsewhere = Attribution(tenant="other")  # no hard cap counts it: no price needed
    assert strict.admit(uuid.uuid4(), elsewhere, "no-such-model", 100, 10, NINE) is None
    lax = BudgetBook([budget], load_catalog(), default_max_tokens=4096, admit_unpriced=True)
    assert lax.admit(uuid.uuid4(), ACME, "no-such-model", 100, 10, NINE) is None
    # The call's provider's word wins over the book's.
    assert (
        strict.admit(uuid.uuid4(), ACME, "no-such-model", 100, 10, NINE, unpriced="admit") is None
    )
    by_provider = lax.admit(uuid.uuid4(), ACME, "no-such-model", 100, 10, NINE, unpriced="refuse")
    assert isinstance(by_provider, Unpriced)


def test_a_refusal_for_what_is_held_until_the_period_ends_is_not_told_to_retry_soon() -> None:
    """A call whose usage never came (its client hung up) holds its worst case until the
    period ends: a refusal for it will not clear as calls in flight settle, so it is no
    "held back" refusal (retry-after: 1, retried by the SDKs, no alert) but one for the
    spend: retry-after until the reset, and the cap's alert."""
    budgets, _ = book("0.015")
    now = MIDNIGHT + timedelta(hours=9)
    cut = uuid.uuid4()
    assert budgets.admit(cut, ACME, "gpt-4o", 10, 1000, now) is None
    budgets.settle(cut, "gpt-4o", Usage.missing(), now)  # held until midnight
    later = now + timedelta(minutes=5)
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 1000, later)
    assert isinstance(refused, Exhausted)
    assert not refused.held_back  # nothing in flight: it will not fit until the reset
    assert budgets.capped(refused, later) is not None


def test_a_refusal_says_what_is_held_beyond_the_published_spend() -> None:
    """A refusal's message adds what this ingress holds (calls in flight, costs not
    counted yet) to the spend: "$0 of $0.015 spent" and a $0.01025 call refused read as
    if $0.015 were left."""
    budgets, _ = book("0.015")
    first = uuid.uuid4()
    assert budgets.admit(first, ACME, "gpt-4o", 100, 1_000, NINE) is None
    held = budgets.reserved["acme-day"][first]
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 100, 1_000, NINE)
    assert isinstance(refused, Exhausted) and refused.held == held == Decimal("0.01025")
    message = refused.message()
    assert "$0 of $0.015 spent this day, $0.01025 held for calls in flight" in message
    assert "worst case of this call $0.01025;" in message


def test_a_cap_s_alert_is_raised_once_a_period_and_only_for_its_spend() -> None:
    """The first refusal for the published spend raises it; later ones in the period do
    not; a refusal that calls in flight caused (it may fit within seconds), or of a
    call no period could cover, raises none; the next period raises its own."""
    budgets, budget = book("1")
    today = fresh(budget, MIDNIGHT, MIDNIGHT).model_copy(
        update={"spent_usd": Decimal("0.99"), "crossed": (50, 80)}
    )
    spent = Exhausted(budget, today, worst_case=Decimal("0.02"))
    in_flight = Exhausted(
        budget,
        today.model_copy(update={"spent_usd": Decimal("0.5")}),
        Decimal("0.02"),
        held=Decimal("0.49"),
    )
    too_large = Exhausted(budget, today, worst_case=Decimal(2))
    assert budgets.capped(in_flight, MIDNIGHT) is None
    assert budgets.capped(too_large, MIDNIGHT) is None
    alert = budgets.capped(spent, MIDNIGHT)
    assert alert is not None and alert.window_start == MIDNIGHT
    assert budgets.capped(spent, MIDNIGHT + timedelta(hours=1)) is None
    tomorrow = fresh(budget, MIDNIGHT + timedelta(days=1), MIDNIGHT).model_copy(
        update={"spent_usd": Decimal("0.99"), "crossed": (50, 80)}
    )
    again = budgets.capped(Exhausted(budget, tomorrow, Decimal("0.02")), MIDNIGHT)
    assert again is not None and again.event_id != alert.event_id
    # Another process (a replica) raises the very same id: stored and sent once.
    replica, _ = book("1")
    other = replica.capped(spent, MIDNIGHT + timedelta(minutes=5))
    assert other is not None and other.event_id == alert.event_id
    assert alert.severity == "critical"
    # A large call refused early, then the lock-out near the top: one alert each (the
    # highest threshold crossed names it), the first a warning.
    fresh_book, _ = book("1")
    early = today.model_copy(update={"spent_usd": Decimal("0.25"), "crossed": ()})
    first = fresh_book.capped(Exhausted(budget, early, Decimal("0.9")), MIDNIGHT)
    assert first is not None and first.severity == "warning"
    assert "its worst case $0.9 is more than the $0.75 left of $1" in first.message
    assert fresh_book.capped(Exhausted(budget, early, Decimal("0.8")), MIDNIGHT) is None
    lockout = fresh_book.capped(spent, MIDNIGHT)
    assert lockout is not None and lockout.event_id == alert.event_id != first.event_id


def test_a_cap_counts_what_the_other_live_replicas_hold() -> None:
    """The others' announcements count against the cap (not this process's own, which
    it counts already, nor one from a process silent for three announcements)."""
    budgets, budget = book("1")
    budgets.ingress_id = "ingress-me"
    now = MIDNIGHT + timedelta(hours=1)

    def said(ingress_id: str, at: datetime, held: str) -> Reservations:
        return Reservations(
            ingress_id=ingress_id, at=at, interval_s=10, held={budget.name: Decimal(held)}
        )

    budgets.heard(said("ingress-gone", now - timedelta(seconds=31), "0.5"))
    budgets.heard(said("ingress-me", now, "0.5"))  # its own: counted as reserved already
    budgets.heard(said("ingress-b", now - timedelta(seconds=5), "0.25"))
    budgets.heard(said("ingress-b", now - timedelta(seconds=9), "0.75"))  # older: passed over
    assert budgets.committed(budget, now)[1] == Decimal("0.25")
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 75_000, now) is not None  # $0.75
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 70_000, now) is None
    # b stops (it says it holds nothing): forgotten, and so is the one gone silent.
    budgets.heard(Reservations(ingress_id="ingress-b", at=now, interval_s=10))
    assert budgets.held_by_others.others == {}


def test_a_live_replica_is_kept_when_a_long_gone_one_is_read_after_it() -> None:
    """The reservations topic is read a partition at a time: a process gone for ten
    minutes, read after a live one on another partition, made the live one look ten
    minutes ahead of it, and dropped it (a replica just started, as in a burst, then did
    not count what the live one held). The gone one counts for nothing."""
    budgets, budget = book("1")
    budgets.ingress_id = "ingress-me"
    now = utcnow()

    def said(ingress_id: str, at: datetime, held: str) -> Reservations:
        return Reservations(
            ingress_id=ingress_id, at=at, interval_s=10, held={budget.name: Decimal(held)}
        )

    budgets.heard(said("ingress-live", now, "0.25"))
    budgets.heard(said("ingress-gone", now - timedelta(minutes=10), "0.5"))
    assert set(budgets.held_by_others.others) == {"ingress-live"}
    assert budgets.committed(budget, now)[1] == Decimal("0.25")


def test_a_live_replica_s_old_entry_deleted_on_another_partition_leaves_it_counted() -> None:
    """Partitions added to the reservations topic: a replica's announcement replayed from
    its spool went by its key, to another partition than the one it writes on, and is
    deleted there by a reaper an hour on. That tombstone is of that entry, not of the
    replica, which lives: what it holds stays counted until its own partition says
    otherwise."""
    budgets, budget = book("1")
    budgets.ingress_id = "ingress-me"
    now = utcnow()
    live = Reservations(
        ingress_id="ingress-b", at=now, interval_s=10, held={budget.name: Decimal("0.25")}
    )
    budgets.heard(live, 1)
    budgets.gone(b"ingress-b", 0)  # its stale entry, deleted where it was left
    assert budgets.committed(budget, now)[1] == Decimal("0.25")
    budgets.gone(b"ingress-b", 1)  # its own, as it stops: forgotten
    assert budgets.held_by_others.others == {}
    assert budgets.committed(budget, now)[1] == Decimal(0)


def priced_book(**entries: Rates | tuple[Rates, dict[str, Any]]) -> BudgetBook:
    """A book over the models ``entries`` (their rates, and ModelPrice fields)."""
    models = {}
    for name, entry in entries.items():
        rates, limits = entry if isinstance(entry, tuple) else (entry, {})
        models[name] = ModelPrice(provider="acme", prices=[rates], **limits)
    return BudgetBook([], Catalog(models=models), default_max_tokens=4096)


def test_a_worst_case_bills_every_output_token_at_the_reasoning_rate_when_dearer() -> None:
    rates = Rates(
        effective_from=MIDNIGHT.date(), input=Decimal(1), output=Decimal(10), reasoning=Decimal(30)
    )
    budgets = priced_book(m=rates)
    # all 1,000 output tokens may be reasoning, at $30 a million (not the $10 output rate)
    assert budgets.worst.cost("m", 0, 1_000, MIDNIGHT) == Decimal("0.03")


def test_a_worst_case_prices_a_prompt_past_the_threshold_at_the_long_context_rates() -> None:
    long_context = {"above_input_tokens": 1_000, "input": "2", "output": "40"}
    priority = TierRates(input=Decimal(3), output=Decimal(20))
    rates = Rates(
        effective_from=MIDNIGHT.date(),
        input=Decimal(1),
        output=Decimal(10),
        long_context=long_context,
        priority=priority,
    )
    budgets = priced_book(m=rates)
    # 5,000 body bytes may be 5,000 prompt tokens: past 1,000, every token at the tier's
    assert budgets.worst.cost("m", 5_000, 100, MIDNIGHT) == Decimal("0.014")  # 5k x 2 + 100 x 40
    assert budgets.worst.cost("m", 500, 100, MIDNIGHT) == Decimal("0.0015")  # 500 x 1 + 100 x 10
    # at priority: each token at the dearer of the tier's rate and the standard one,
    # long-context included (OpenAI serves a long prompt at the standard tier)
    assert budgets.worst.cost("m", 5_000, 100, MIDNIGHT, priority=True) == Decimal("0.019")
    assert budgets.worst.cost("m", 500, 100, MIDNIGHT, priority=True) == Decimal("0.0035")


def test_a_call_whose_input_is_unbounded_reserves_a_window_for_each_prompt() -> None:
    rates = Rates(effective_from=MIDNIGHT.date(), input=Decimal(1), output=Decimal(10))
    budgets = priced_book(m=(rates, {"context_window": 400_000}))
    # three prompts, a 400k window each, past the 1M default context: 1.2M tokens at $1/M
    worst = budgets.worst.cost("m", 0, 0, MIDNIGHT, input_unbounded=True, prompts=3)
    assert worst == Decimal("1.2")


def test_an_advisor_s_worst_case_is_at_its_long_context_and_geo_rates_plus_the_fees() -> None:
    day = MIDNIGHT.date()
    executor = Rates(
        effective_from=day, input=Decimal(1), output=Decimal(10), web_search=Decimal(10)
    )
    advisor_rates = Rates(
        effective_from=day,
        input=Decimal(1),
        output=Decimal(10),
        long_context={"above_input_tokens": 500_000, "input": "2", "output": "20"},
        geo_multipliers={"us": Decimal("1.5")},
    )
    budgets = priced_book(ex=executor, adv=advisor_rates)
    one_call = Advisor("adv", 1, 0)
    # searches: 10 at $10 a thousand = 0.1; the advisor's one call reads at least the
    # default context (1M tokens), past its threshold: 1M x $2/M = 2.0
    worst = functools.partial(budgets.worst.cost, "ex", 0, 0, MIDNIGHT, web_searches=10)
    assert worst(advisor=one_call, geo="global") == Decimal("2.1")
    # run in the US (or anywhere the call does not name): the advisor's tokens at 1.5x,
    # the searches' fee not
    assert worst(advisor=one_call, geo="us") == Decimal("3.1")
    assert worst(advisor=one_call) == Decimal("3.1")


def test_a_state_whose_offset_reaches_a_cost_s_event_has_not_counted_it() -> None:
    """A state's ``applied`` is the next offset it has not counted: equal to a cost's
    event's offset, it has not counted it yet (held fresh, or aged in its partition's
    sum); past it, it has."""
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    later = now + timedelta(hours=2)
    usage = Usage(input_tokens=0, output_tokens=40_000)  # gpt-4o: $0.40
    costs = []
    for ended in (now, later):  # the first aged past the hour by `later`
        call = uuid.uuid4()
        assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, ended) is None
        costs.append(budgets.settle(call, "gpt-4o", usage, ended))
    aged, recent = costs
    assert aged is not None and recent is not None
    aged.delivered(1, 5)
    recent.delivered(0, 5)
    reached = fresh(budget, now, now).model_copy(
        update={"spent_usd": Decimal("0.10"), "last_event_at": later, "applied": {0: 5, 1: 5}}
    )
    budgets.update(reached)
    assert budgets.held(later) == {"acme-day": Decimal("0.80")}
    budgets.update(
        reached.model_copy(update={"spent_usd": Decimal("0.90"), "applied": {0: 6, 1: 6}})
    )
    assert budgets.held(later) == {"acme-day": Decimal(0)}


def test_an_aged_sum_is_held_until_a_state_passes_the_latest_of_its_events() -> None:
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    usage = Usage(input_tokens=0, output_tokens=40_000)  # gpt-4o: $0.40
    for offset in (9, 4):  # delivered out of offset order
        call = uuid.uuid4()
        assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
        settled = budgets.settle(call, "gpt-4o", usage, now)
        assert settled is not None
        settled.delivered(0, offset)
    later = now + timedelta(hours=2)
    assert budgets.held(later) == {"acme-day": Decimal("0.80")}  # both aged into one sum
    # A state past offset 4 only: the call at offset 9 is not counted, the sum is held.
    past_4 = fresh(budget, now, now).model_copy(
        update={"spent_usd": Decimal("0.40"), "last_event_at": later, "applied": {0: 5}}
    )
    budgets.update(past_4)
    assert budgets.held(later) == {"acme-day": Decimal("0.80")}
    budgets.update(past_4.model_copy(update={"spent_usd": Decimal("0.80"), "applied": {0: 10}}))
    assert budgets.held(later) == {"acme-day": Decimal(0)}


def test_a_call_that_ended_at_midnight_is_today_s_spend() -> None:
    budgets, _ = book("1.00")
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 90_000, MIDNIGHT - timedelta(minutes=1)) is None
    budgets.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=90_000), MIDNIGHT)
    assert budgets.held(MIDNIGHT + timedelta(seconds=30)) == {"acme-day": Decimal("0.90")}
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 16_000, MIDNIGHT)
    assert refused is not None  # $0.90 + a $0.16 worst case pass today's $1.00


def two_caps(day_limit: str, month_limit: str) -> tuple[BudgetBook, BudgetConfig, BudgetConfig]:
    day = BudgetConfig(
        name="acme-day", scope="tenant", value="acme", period="day", limit_usd=Decimal(day_limit)
    )
    month = BudgetConfig(
        name="acme-month",
        scope="tenant",
        value="acme",
        period="month",
        limit_usd=Decimal(month_limit),
    )
    return BudgetBook([day, month], load_catalog(), default_max_tokens=4096), day, month


def test_a_call_reserves_its_worst_case_on_every_hard_cap_that_counts_it() -> None:
    budgets, _, _ = two_caps("1.00", "1.00")
    now = MIDNIGHT + timedelta(hours=9)
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 60_000, now) is None
    held = budgets.held(now)
    assert held["acme-day"] == held["acme-month"] > Decimal("0.60")
    # the month's cap counts it too: a second one fits neither
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 60_000, now)
    assert refused is not None


def test_a_cap_the_call_can_never_fit_is_named_before_one_it_fits_once_reset() -> None:
    budgets, day, _ = two_caps("1.00", "0.01")
    now = MIDNIGHT + timedelta(hours=9)
    spent = fresh(day, now, now).model_copy(update={"spent_usd": Decimal("0.99")})
    budgets.update(spent)
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 2_000, now)  # ~$0.02
    assert isinstance(refused, Exhausted)
    assert refused.budget.name == "acme-month"
    assert refused.never_fits


def test_what_is_held_to_a_period_s_end_is_that_period_s_alone() -> None:
    budgets, _ = book("10")
    yesterday = MIDNIGHT - timedelta(hours=1)
    today = MIDNIGHT + timedelta(hours=1)
    first = uuid.uuid4()
    assert budgets.admit(first, ACME, "gpt-4o", 1_000, 1_000, yesterday) is None
    worst = budgets.held(yesterday)["acme-day"]
    budgets.settle(first, "gpt-4o", Usage.missing(), yesterday)
    second = uuid.uuid4()
    assert budgets.admit(second, ACME, "gpt-4o", 1_000, 1_000, today) is None
    budgets.settle(second, "gpt-4o", Usage.missing(), today)
    assert budgets.held(today) == {"acme-day": worst}  # yesterday's is not today's
    # A call that ended yesterday, settled only now, holds nothing against today, and
    # does not let go of what today holds.
    late = uuid.uuid4()
    assert budgets.admit(late, ACME, "gpt-4o", 1_000, 1_000, yesterday) is None
    budgets.settle(late, "gpt-4o", Usage.missing(), yesterday)
    assert budgets.held(today) == {"acme-day": worst}


def test_a_budget_of_every_tenant_tells_no_tenant_what_the_others_spent() -> None:
    """A budget with no tenant (team `search` of every tenant) counts globex's calls too:
    the budgets endpoint shows its spend to admins only. Its refusal of an acme call
    named the spend and what was held: globex's spend, read off by acme (less its own,
    which the API shows it)."""
    budget = BudgetConfig(
        name="search-day", scope="team", value="search", period="day", limit_usd=Decimal("1")
    )
    budgets = BudgetBook([budget], load_catalog(), default_max_tokens=4096)
    budgets.update(fresh(budget, NINE, NINE).model_copy(update={"spent_usd": Decimal("0.876543")}))
    globex = Attribution(tenant="globex", team="search")
    assert budgets.admit(uuid.uuid4(), globex, "gpt-4o", 100, 10_000, NINE) is None
    acme = Attribution(tenant="acme", team="search")
    refused = budgets.admit(uuid.uuid4(), acme, "gpt-4o", 100, 4_000, NINE)
    assert isinstance(refused, Exhausted)
    message = refused.message()
    assert "'search-day'" in message and "resets at" in message  # still told why, and when
    assert "0.876543" not in message  # every tenant's spend
    assert "held" not in message  # globex's call in flight


def test_a_budget_full_of_ended_calls_costs_is_spent_not_held_back() -> None:
    """With the stream down, the costs of ended calls no state has counted fill the
    budget: they are spent (counted, they would move to the published spend, the sum the
    same), so the refusal is for the spend (retry at the reset) and the cap's alert is
    raised, not "held back" (retry-after: 1, no alert) for as long as the stream is down.
    Calls in flight, which settle at their real cost, still hold it back."""
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    counted = {"spent_usd": Decimal("0.10"), "applied": {0: 100}}
    budgets.update(fresh(budget, now, now).model_copy(update=counted))
    for i in range(2):  # $0.40 each, worst case and cost
        call = uuid.uuid4()
        assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
        usage = Usage(input_tokens=0, output_tokens=40_000)
        settled = budgets.settle(call, "gpt-4o", usage, now)
        assert settled is not None
        settled.delivered(0, 100 + i)
    for later in (now + timedelta(seconds=1), now + timedelta(hours=2)):  # fresh, and aged
        refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, later)
        assert isinstance(refused, Exhausted) and refused.held == Decimal("0.8")
        assert not refused.held_back and refused.ended == refused.held
        assert "($0.8 of it ended calls' costs)" in refused.message()
        alert = budgets.capped(refused, later)  # raised once: at the first refusal
        assert (alert is not None) == (later == now + timedelta(seconds=1))
        if alert is not None:
            assert alert.severity == "critical"
            assert "($0.9 spent this day, 90.0%)" in alert.message
    # A call in flight is what holds back one that the ended calls leave room for.
    small, other = uuid.uuid4(), uuid.uuid4()
    assert budgets.admit(small, ACME, "gpt-4o", 10, 5_000, later) is None  # $0.05 held
    waits = budgets.admit(other, ACME, "gpt-4o", 10, 6_000, later)  # $0.06: fits once it ends
    assert isinstance(waits, Exhausted) and waits.held_back and waits.ended == Decimal("0.8")


def test_other_processes_ended_calls_costs_are_spent_once_announced_a_while() -> None:
    """Another ingress's placed costs (ended calls, events in Kafka) filling the budget
    are spent once announced unchanged for PLACED_SETTLE (a state may have counted
    them the moment before: it says so within 0.2 s); a stopped one's too."""
    budgets, budget = book("1.00")
    now = MIDNIGHT + timedelta(hours=9)
    budgets.update(fresh(budget, now, now).model_copy(update={"applied": {0: 100}}))
    placed = PlacedCosts(
        budget="acme-day", period_start=MIDNIGHT, partition=0, through=120, usd=Decimal("0.9")
    )

    def said(at: datetime) -> Reservations:
        held = {"acme-day": Decimal("0.9")}
        return Reservations(ingress_id="b", at=at, interval_s=10, held=held, placed=(placed,))

    def refused(at: datetime) -> Exhausted:
        answer = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, at)
        assert isinstance(answer, Exhausted) and answer.held == Decimal("0.9")
        return answer

    budgets.heard(said(now))
    assert refused(now).held_back  # just announced
    for seconds in (10, 20, 31):
        budgets.heard(said(now + timedelta(seconds=seconds)))
    assert not refused(now + timedelta(seconds=31)).held_back
    gone = now + timedelta(seconds=32)
    budgets.heard(Reservations(ingress_id="b", at=gone, interval_s=10, placed=(placed,)))
    assert "b" not in budgets.held_by_others.others and not refused(gone).held_back
    # A state counting past them: let go, spent and published.
    budgets.update(
        fresh(budget, now, gone).model_copy(
            update={"spent_usd": Decimal("0.9"), "applied": {0: 121}}
        )
    )
    answer = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, gone)
    assert isinstance(answer, Exhausted) and not answer.held and not answer.held_back


def test_a_state_of_a_period_this_clock_has_not_reached_waits_for_it() -> None:
    """The worker's clock runs ahead: its new day's state arrives at 23:59:58 by this
    ingress's clock. Yesterday's calls are judged on yesterday's state still (applied,
    yesterday's $0.95 spent was forgotten: they were judged against $0, and their costs
    let go), until this clock reaches midnight."""
    budgets, budget = book("1.00")
    yesterday = MIDNIGHT - timedelta(hours=1)
    spent = {"spent_usd": Decimal("0.50"), "applied": {0: 50}}
    budgets.update(fresh(budget, yesterday, yesterday).model_copy(update=spent))
    budgets.update(fresh(budget, MIDNIGHT, MIDNIGHT).model_copy(update={"applied": {0: 50}}))
    early = MIDNIGHT - timedelta(seconds=2)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, early) is None  # $0.90 of $1
    usage = Usage(input_tokens=0, output_tokens=40_000)
    settled = budgets.settle(call, "gpt-4o", usage, early)
    assert settled is not None
    settled.delivered(0, 60)
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, early)
    assert isinstance(refused, Exhausted) and refused.state.spent_usd == Decimal("0.50")
    assert refused.held == Decimal("0.4") and refused.state.period_end == MIDNIGHT
    # At midnight by this clock, the new day's state, and nothing of yesterday's held.
    assert budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, MIDNIGHT) is None
    assert budgets.held(MIDNIGHT)["acme-day"] == Decimal("0.400025")


def test_a_later_period_s_state_does_not_let_go_what_this_clock_s_period_holds() -> None:
    """Its clock behind, the ingress judges on yesterday's state; the worker, past
    midnight, drops the calls it admits then (stamped yesterday: late), and its new
    day's states count past their offsets. They let go what the ingress held for them,
    yesterday's state never counting them: a second $0.40 call was admitted ($1.30
    spent on a $1.00 cap). Let go against a state of the period this clock is in, or
    once it reaches the new one."""
    budgets, budget = book("1.00")
    yesterday = MIDNIGHT - timedelta(hours=1)
    spent = {"spent_usd": Decimal("0.50"), "applied": {0: 50}}
    budgets.update(fresh(budget, yesterday, yesterday).model_copy(update=spent))
    budgets.update(fresh(budget, MIDNIGHT, MIDNIGHT).model_copy(update={"applied": {0: 50}}))
    early = MIDNIGHT - timedelta(seconds=2)
    call = uuid.uuid4()
    assert budgets.admit(call, ACME, "gpt-4o", 10, 40_000, early) is None
    settled = budgets.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=40_000), early)
    assert settled is not None
    settled.delivered(0, 60)
    budgets.update(fresh(budget, MIDNIGHT, MIDNIGHT).model_copy(update={"applied": {0: 61}}))
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, early)
    assert isinstance(refused, Exhausted) and refused.held == Decimal("0.4")
    # Yesterday's, late, counting it: let go.
    counted = {"spent_usd": Decimal("0.90"), "applied": {0: 61}}
    budgets.update(fresh(budget, yesterday, yesterday).model_copy(update=counted))
    assert budgets.committed(budget, early) == (
        budgets._current(budget, early),
        Decimal("0.90"),
    )
    # At midnight by this clock, the new day's state, nothing of yesterday's held.
    assert budgets.committed(budget, MIDNIGHT)[1] == Decimal(0)


def test_an_earlier_period_s_state_of_the_same_spend_does_not_replace_the_current() -> None:
    """The stream publishes a closing day's state (counted into after the new day began)
    before the current one; one of the same spend as the current's replaced it, and the
    cap was judged on a fresh $0 day until the next state (review R4)."""
    budgets, budget = book("1.00")
    today = fresh(budget, MIDNIGHT, MIDNIGHT).model_copy(update={"spent_usd": Decimal("0.90")})
    yesterday = fresh(budget, MIDNIGHT - timedelta(hours=1), MIDNIGHT - timedelta(hours=1))
    budgets.update(today)
    budgets.update(yesterday.model_copy(update={"spent_usd": Decimal("0.90")}))
    assert budgets.states[budget.name].period_start == MIDNIGHT
    refused = budgets.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 16_000, MIDNIGHT + timedelta(hours=1))
    assert isinstance(refused, Exhausted)  # $0.16 at most: $0.10 left
