"""Anthropic's advisor tool (``advisor_20260301``): an executor model consults an advisor
model within one Messages call, and the advisor's tokens are billed at the advisor
model's rates. Anthropic reports each advisor call in ``usage.iterations`` (type
``advisor_message``, with its model), apart from the top-level counts, which are the
executor's. The ingress captures them (through the official SDK, streamed and not), the
stream prices them at the advisor model's catalog prices, and a hard cap's worst case
bounds them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from anthropic import AsyncAnthropic

from ingress.forward.usage import anthropic_usage
from ingress.guards.bounds import Advisor, reach
from ingress.guards.refusals import Exhausted
from llmtap.config import Settings
from llmtap.events import AdvisorUsage, Attribution, Usage
from stream.catalog import Rates, load_catalog
from stream.pricing import missing_price, price
from tests.conftest import Broker, FakeUpstream
from tests.test_budget_book import MIDNIGHT, book
from tests.test_ingress_ops import make_key, response_event
from tests.test_pricing import response, usd

CATALOG = load_catalog()
WHEN = datetime(2026, 11, 30, 12, tzinfo=UTC)
EXECUTOR, ADVISOR = "claude-sonnet-4-6", "claude-opus-4-6"
BETA = "advisor-tool-2026-03-01"


# -- the ingress, through the official SDK ------------------------------------------------


def test_anthropic_usage_takes_the_advisor_s_calls_from_its_iterations() -> None:
    """Only the ``advisor_message`` iterations, each with its model, normalised as the
    call's usage is (cache reads and writes within the input); the executor's own
    ``message`` iterations are already in the top-level counts."""
    usage = anthropic_usage(
        {
            "input_tokens": 412,
            "output_tokens": 531,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "iterations": [
                {"type": "message", "input_tokens": 412, "output_tokens": 89},
                {"type": "advisor_message", "model": ADVISOR, "input_tokens": 823,
                 "cache_read_input_tokens": 10, "cache_creation_input_tokens": 30,
                 "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                    "ephemeral_1h_input_tokens": 30},
                 "output_tokens": 1612},
                {"type": "message", "input_tokens": 1348, "cache_read_input_tokens": 412,
                 "output_tokens": 442},
            ],
        }
    )  # fmt: skip
    assert usage == Usage(
        input_tokens=412,
        output_tokens=531,
        advisor=(
            AdvisorUsage(
                model=ADVISOR,
                input_tokens=823 + 10 + 30,
                cached_input_tokens=10,
                cache_creation_input_tokens=30,
                cache_creation_1h_input_tokens=30,
                output_tokens=1612,
            ),
        ),
    )


ADVISOR_TOOL: Any = {"type": "advisor_20260301", "name": "advisor", "model": ADVISOR}


def expected_advice(upstream: FakeUpstream) -> tuple[AdvisorUsage, ...]:
    fake = upstream.provider
    return (
        AdvisorUsage(
            model=ADVISOR,
            input_tokens=fake.advisor_input_tokens + fake.advisor_cached_tokens,
            cached_input_tokens=fake.advisor_cached_tokens,
            output_tokens=fake.advisor_output_tokens,
        ),
    ) * fake.advisor_calls


async def test_the_ingress_captures_the_advisor_s_usage_of_an_answer(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    secret = await make_key(ingress, ingress_settings.key_file)
    async with AsyncAnthropic(base_url=ingress, api_key=secret, max_retries=0) as client:
        raw = await client.beta.messages.with_raw_response.create(
            model=EXECUTOR,
            max_tokens=100,
            betas=[BETA],
            tools=[ADVISOR_TOOL],
            messages=[{"role": "user", "content": "plan a worker pool"}],
        )
        message = await raw.parse()
    assert upstream.provider.received[-1].headers["anthropic-beta"] == BETA
    assert message.usage.iterations is not None  # reached the client as sent
    assert [i.type for i in message.usage.iterations] == ["message", "advisor_message", "message"]
    event = await response_event(broker.bootstrap, raw.headers["x-request-id"])
    assert event.usage.advisor == expected_advice(upstream)
    fake = upstream.provider
    assert event.usage.output_tokens == fake.completion_tokens  # the executor's, as before


async def test_the_ingress_captures_the_advisor_s_usage_of_a_stream(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """Streamed, the advisor's calls come in a message_delta's usage.iterations (its
    result whole in one content_block_start); message_start has none."""
    upstream.provider.advisor_calls = 2
    secret = await make_key(ingress, ingress_settings.key_file)
    try:
        async with (
            AsyncAnthropic(base_url=ingress, api_key=secret, max_retries=0) as client,
            client.beta.messages.stream(
                model=EXECUTOR,
                max_tokens=100,
                betas=[BETA],
                tools=[ADVISOR_TOOL | {"max_uses": 2}],
                messages=[{"role": "user", "content": "plan a worker pool"}],
            ) as stream,
        ):
            final = await stream.get_final_message()
            request_id = stream.response.headers["x-request-id"]
        event = await response_event(broker.bootstrap, request_id)
        assert event.usage.advisor == expected_advice(upstream)
        assert len(event.usage.advisor) == 2
    finally:
        upstream.provider.advisor_calls = 1
    assert final.usage.iterations is not None
    assert [i.type for i in final.usage.iterations].count("advisor_message") == 2
    assert event.stream and event.usage.output_tokens == upstream.provider.completion_tokens


# -- pricing ------------------------------------------------------------------------------


def rates_of(model: str) -> Rates:
    entry = CATALOG.lookup(model, "anthropic")
    assert entry is not None
    rates = entry[1].at(WHEN)
    assert rates is not None
    return rates


def test_the_advisor_s_calls_are_priced_at_the_advisor_model_s_rates() -> None:
    """Two advisor calls (one reading its cache, one writing it for an hour) on an
    Opus advisor, beside a Sonnet executor's own tokens: each part of the cost holds the
    executor's tokens at Sonnet's rates and the advisor's at Opus's."""
    usage = Usage(
        input_tokens=1000,  # 700 uncached, 200 read, 100 written
        cached_input_tokens=200,
        cache_creation_input_tokens=100,
        output_tokens=400,
        advisor=(
            AdvisorUsage(model=ADVISOR, input_tokens=1200, cached_input_tokens=300,
                         output_tokens=1500),
            AdvisorUsage(model=ADVISOR, input_tokens=5000, cache_creation_input_tokens=2000,
                         cache_creation_1h_input_tokens=2000, output_tokens=700),
        ),
    )  # fmt: skip
    costed = price(response(EXECUTOR, usage, ts=WHEN), CATALOG)
    ex, adv = rates_of(EXECUTOR), rates_of(ADVISOR)
    assert ex.cached_input and ex.cache_write and adv.cached_input and adv.cache_write_1h
    assert adv.output != ex.output  # else the test could not tell them apart
    assert costed.unpriced is False and costed.cost is not None
    cost = costed.cost
    assert cost.input == usd(700, ex.input) + usd(900, adv.input) + usd(3000, adv.input)
    assert cost.cached_input == usd(200, ex.cached_input) + usd(300, adv.cached_input)
    assert cost.cache_write == usd(100, ex.cache_write) + usd(2000, adv.cache_write_1h)
    assert cost.output == usd(400, ex.output) + usd(1500 + 700, adv.output)
    assert cost.total == cost.input + cost.cached_input + cost.cache_write + cost.output
    assert costed.pricing_model == EXECUTOR  # the call's entry: the executor's


def test_an_advisor_model_with_no_price_leaves_the_call_unpriced_never_cheaper() -> None:
    """As a call of a model with no price: cost null and unpriced, not the executor's
    tokens alone."""
    usage = Usage(
        input_tokens=10,
        output_tokens=5,
        advisor=(AdvisorUsage(model="claude-unknown-9", input_tokens=100, output_tokens=50),),
    )
    costed = price(response(EXECUTOR, usage, ts=WHEN), CATALOG)
    assert (costed.cost, costed.unpriced) == (None, True)


def test_a_call_run_in_the_us_has_its_advisor_s_calls_priced_there_too() -> None:
    """The advisor's calls are inference of the same request, run where it ran (no page
    says otherwise): at the advisor model's 1.1x too. An advisor model whose price names
    no such geography leaves the call unpriced, and is named for the operator."""
    call = AdvisorUsage(model=ADVISOR, input_tokens=1200, output_tokens=1500)
    usage = Usage(input_tokens=1000, output_tokens=400, advisor=(call,))
    us = usage.model_copy(update={"inference_geo": "us"})
    standard = price(response(EXECUTOR, usage, ts=WHEN), CATALOG).cost
    there = price(response(EXECUTOR, us, ts=WHEN), CATALOG).cost
    assert standard is not None and there is not None
    assert there.input == standard.input * Decimal("1.1")
    assert there.output == standard.output * Decimal("1.1")
    older = AdvisorUsage(model="claude-opus-4-5", input_tokens=10, output_tokens=5)
    advised = response(EXECUTOR, us.model_copy(update={"advisor": (older,)}), ts=WHEN)
    assert price(advised, CATALOG).unpriced
    assert missing_price(advised, CATALOG) == (
        f"advisor model 'claude-opus-4-5' (consulted by {EXECUTOR!r}) run in inference geo"
        " 'us': give its entry geo_multipliers for 'us'"
    )


# -- a hard cap's worst case --------------------------------------------------------------


def messages_call(**tool: Any) -> dict[str, Any]:
    return {
        "model": EXECUTOR,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "plan a worker pool"}],
        "tools": [{**ADVISOR_TOOL, **tool}],
    }


def test_what_had_no_price_is_named_for_the_operator() -> None:
    """The cost stage logs what to add to the catalog: an advisor model with no price,
    not the executor's model, which has one (before: "no price for model
    'claude-sonnet-4-6'")."""
    unknown = AdvisorUsage(model="claude-unknown-9", input_tokens=10, output_tokens=5)
    advised = response(EXECUTOR, Usage(input_tokens=10, advisor=(unknown,)), ts=MIDNIGHT)
    assert price(advised, CATALOG).unpriced
    assert missing_price(advised, CATALOG) == (
        f"advisor model 'claude-unknown-9' (consulted by {EXECUTOR!r})"
    )
    alone = response("claude-unknown-9", Usage(input_tokens=10), ts=MIDNIGHT)
    assert missing_price(alone, CATALOG) == "model 'claude-unknown-9'"


def test_a_call_naming_the_advisor_tool_reads_its_advice_back_as_input() -> None:
    """The advice is read back into the executor's prompt, as a provider-run tool's
    result is: the body's bytes do not bound the call's input."""
    seen = reach(messages_call(max_uses=2, max_tokens=2048))
    assert seen.input_unbounded
    assert seen.advisor == Advisor(ADVISOR, 2, 2048)
    assert reach(messages_call()).advisor == Advisor(ADVISOR, None, None)
    assert reach({"model": EXECUTOR, "messages": []}).advisor is None


def test_a_hard_cap_reserves_the_advisor_s_calls_at_its_model_s_prices() -> None:
    """max_uses calls, each reading at least the default context (or the advisor's
    window, if larger) at its dearest prompt rate and writing its max_tokens (else the
    advisor model's most) at its output rate; without max_uses, the default count."""
    budgets, _ = book("10")
    entry = CATALOG.lookup(ADVISOR, "anthropic")
    assert entry is not None and entry[1].max_output_tokens is not None
    adv = rates_of(ADVISOR)
    assert adv.cache_write_1h is not None
    prompt = max(budgets.worst.default_context_tokens, entry[1].context_window or 0)
    prompt_rate = max(adv.input, adv.cache_write or adv.input, adv.cache_write_1h)

    def worst(advisor: Advisor | None) -> Decimal:
        cost = budgets.worst.cost(
            EXECUTOR, 200, 100, MIDNIGHT, "anthropic", input_unbounded=True, advisor=advisor,
            geo="global",
        )  # fmt: skip
        assert cost is not None
        return cost

    alone = worst(None)
    two = worst(Advisor(ADVISOR, 2, 2048)) - alone
    assert two == 2 * (usd(prompt, prompt_rate) + usd(2048, adv.output))
    most = entry[1].max_output_tokens
    unbounded = worst(Advisor(ADVISOR, None, None)) - alone
    assert budgets.worst.default_advisor_uses == 100
    assert unbounded == 100 * (usd(prompt, prompt_rate) + usd(most, adv.output))
    # An advisor model with no price cannot be bounded, but the executor's calls can:
    # never less than the call without the advisor (before: nothing at all).
    assert budgets.worst.cost(
        EXECUTOR, 200, 100, MIDNIGHT, "anthropic", advisor=Advisor("claude-unknown-9", 1, 1)
    ) == budgets.worst.cost(EXECUTOR, 200, 100, MIDNIGHT, "anthropic")


def test_a_call_whose_advisor_has_no_price_holds_its_worst_case_for_the_period() -> None:
    """The stream cannot price such a call (cost null, unpriced): once it ends, the cap
    holds its worst case until the period ends, as a call whose usage is unknown, rather
    than let it go (before: reserved nothing and held nothing, the executor's tokens
    free against the cap)."""
    budgets, _ = book("10")
    who = Attribution(tenant="acme")
    call = messages_call(max_uses=1, max_tokens=1024)
    call["tools"][0]["model"] = "claude-unknown-9"
    call_id = uuid.uuid4()
    assert (
        budgets.admit(
            call_id, who, EXECUTOR, 200, 100, MIDNIGHT, "anthropic", reach=lambda: reach(call)
        )
        is None
    )
    worst = budgets.worst.cost(EXECUTOR, 200, 100, MIDNIGHT, "anthropic", input_unbounded=True)
    assert worst is not None and worst > 0
    assert sum(sum(held.values()) for held in budgets.reserved.values()) == worst
    usage = Usage(
        input_tokens=100,
        output_tokens=50,
        advisor=(AdvisorUsage(model="claude-unknown-9", input_tokens=2000, output_tokens=900),),
    )
    assert budgets.settle(call_id, EXECUTOR, usage, MIDNIGHT, "anthropic") is None
    assert price(response(EXECUTOR, usage, ts=MIDNIGHT), CATALOG).unpriced
    _, committed = budgets.committed(budgets.budgets[0], MIDNIGHT)
    assert committed == worst


def test_a_hard_cap_refuses_a_call_whose_advisor_could_overshoot_it() -> None:
    """$20 covers the executor's worst case, not two Opus advisor calls on top; once the
    call ends it holds what it cost, the advisor's calls included."""
    budgets, _ = book("20")
    who = Attribution(tenant="acme")
    plain = {"model": EXECUTOR, "max_tokens": 100, "messages": [], "tools": [
        {"type": "web_fetch_20250910", "name": "web_fetch"}]}  # fmt: skip
    call = messages_call(max_uses=2, max_tokens=2048)
    refused = budgets.admit(
        uuid.uuid4(), who, EXECUTOR, 200, 100, MIDNIGHT, "anthropic", reach=lambda: reach(call)
    )
    assert isinstance(refused, Exhausted) and refused.worst_case > Decimal(20)
    call_id = uuid.uuid4()
    assert (
        budgets.admit(
            call_id, who, EXECUTOR, 200, 100, MIDNIGHT, "anthropic", reach=lambda: reach(plain)
        )
        is None
    )
    usage = Usage(
        input_tokens=100,
        output_tokens=50,
        advisor=(AdvisorUsage(model=ADVISOR, input_tokens=2000, output_tokens=900),),
    )
    held = budgets.settle(call_id, EXECUTOR, usage, MIDNIGHT, "anthropic")
    costed = price(response(EXECUTOR, usage, ts=MIDNIGHT), CATALOG)
    assert held is not None and costed.cost is not None
    assert held.cost == costed.cost.total
    alone = Usage(input_tokens=100, output_tokens=50)
    executor_alone = price(response(EXECUTOR, alone, ts=MIDNIGHT), CATALOG)
    assert executor_alone.cost is not None and held.cost > executor_alone.cost.total


def test_a_hard_cap_holds_the_advisor_s_calls_in_an_ended_call_s_cost() -> None:
    """Settled, a call's cost is held until a state counts it: its advisor's calls
    included, as the stream prices them (else the cap forgets them meanwhile)."""
    budgets, _ = book("10")
    call = uuid.uuid4()
    acme = Attribution(tenant="acme")
    assert budgets.admit(call, acme, EXECUTOR, 200, 100, WHEN, "anthropic") is None
    advice = AdvisorUsage(model=ADVISOR, input_tokens=5_000, output_tokens=500)
    usage = Usage(input_tokens=1_000, output_tokens=100, advisor=(advice,))
    held = budgets.settle(call, EXECUTOR, usage, WHEN, "anthropic")
    ex, adv = rates_of(EXECUTOR), rates_of(ADVISOR)
    expected = usd(1_000, ex.input) + usd(100, ex.output) + usd(5_000, adv.input)
    expected += usd(500, adv.output)
    assert held is not None and held.cost == expected
    assert budgets.held(WHEN) == {"acme-day": expected}
