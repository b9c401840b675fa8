"""Cost arithmetic: exact decimals, no token charged twice, catalog resolution."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from ingress.forward.usage import anthropic_usage
from llmtap import wire
from llmtap.events import AdvisorUsage, Cost, ResponseEvent, Usage
from stream.catalog import Catalog, ModelPrice, Rates, load_catalog
from stream.pricing import cost_of, missing_price, price, priced_as_served
from tests import sample

MILLION = Decimal(1_000_000)
NANO = Decimal("0.000000001")
COST_FIELDS = ("input", "cached_input", "cache_write", "output", "reasoning", "web_search", "total")


def usd(tokens: int, per_million: Decimal) -> Decimal:
    """Expected money, by hand (every case here is exact at 9 decimal places)."""
    return Decimal(tokens) * per_million / MILLION


def response(
    model: str,
    usage: Usage,
    *,
    ts: datetime | None = None,
    model_served: str = "",
    **extra: Any,
) -> ResponseEvent:
    fields: dict[str, Any] = {"latency_ms": 1, "proxy_overhead_ms": 0.1} | extra
    return sample.response(
        ts, model_requested=model, model_served=model_served, usage=usage, **fields
    )


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def with_operator_file(tmp_path: Path, text: str) -> Catalog:
    """The shipped catalog merged with an operator's ``pricing_file`` holding ``text``."""
    extra = tmp_path / "prices.yaml"
    extra.write_text(text)
    return load_catalog(extra=extra)


def assert_all_decimal(cost: Cost) -> None:
    for name in COST_FIELDS:
        value = getattr(cost, name)
        assert type(value) is Decimal, (name, type(value))
        assert value.as_tuple().exponent == -9, (name, value)  # quantised to nano-dollars
    assert cost.total == cost.input + cost.cached_input + cost.cache_write + cost.output + (
        cost.reasoning + cost.web_search
    )


def priced(event: ResponseEvent, catalog: Catalog) -> Cost:
    costed = price(event, catalog)
    assert costed.unpriced is False
    assert costed.cost is not None
    assert_all_decimal(costed.cost)
    return costed.cost


# -- arithmetic ---------------------------------------------------------------------------


def test_gpt_4o_with_cached_input(catalog: Catalog) -> None:
    input_rate, cached_rate, output_rate = Decimal("2.50"), Decimal("1.25"), Decimal("10.00")
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200)
    costed = price(response("gpt-4o", usage), catalog)
    assert costed.pricing_model == "gpt-4o"
    cost = priced(response("gpt-4o", usage), catalog)

    assert cost.input == usd(600, input_rate) == Decimal("0.0015")
    assert cost.cached_input == usd(400, cached_rate) == Decimal("0.0005")
    assert cost.cache_write == 0
    assert cost.output == usd(200, output_rate) == Decimal("0.002")
    assert cost.reasoning == 0
    expected_total = usd(600, input_rate) + usd(400, cached_rate) + usd(200, output_rate)
    assert cost.total == expected_total == Decimal("0.004")


@pytest.mark.parametrize("field", ["output_tokens", "input_tokens", "reasoning_tokens"])
def test_a_count_no_call_can_have_is_an_unknown_cost(catalog: Catalog, field: str) -> None:
    """An event that holds a count past 2^32-1 (an earlier ingress recorded a provider's
    -1 sent unsigned, 2^64-1, as one) is priced as a call whose usage is missing: its
    cost unknown, its model priced, never $10^14 in a budget; one count short of it is
    priced as any."""
    counts = {"input_tokens": 10, "output_tokens": 10, field: 2**64 - 1}
    costed = price(response("gpt-4o", Usage(**counts)), catalog)
    assert (costed.cost, costed.unpriced, costed.pricing_model) == (None, False, "gpt-4o")
    counts[field] = 2**32 - 1
    assert priced(response("gpt-4o", Usage(**counts)), catalog).total > 0


def test_money_is_a_json_string_never_a_float(catalog: Catalog) -> None:
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200)
    costed = price(response("gpt-4o", usage), catalog)
    wire = orjson.loads(costed.model_dump_json())["cost"]
    for name in COST_FIELDS:
        assert isinstance(wire[name], str), (name, wire[name])
        assert not isinstance(wire[name], float)
    assert Decimal(wire["total"]) == Decimal("0.004")


def test_cached_tokens_are_not_also_charged_at_the_input_rate(catalog: Catalog) -> None:
    # every input token read from the cache: nothing at the full input rate
    usage = Usage(input_tokens=1000, cached_input_tokens=1000, output_tokens=0)
    cost = priced(response("gpt-4o", usage), catalog)
    assert cost.input == 0
    assert cost.cached_input == usd(1000, Decimal("1.25"))
    assert cost.total == usd(1000, Decimal("1.25"))


def test_anthropic_cache_reads_and_writes_are_each_charged_once(catalog: Catalog) -> None:
    input_rate, cached_rate, write_rate, output_rate = (
        Decimal("3.00"),
        Decimal("0.30"),
        Decimal("3.75"),
        Decimal("15.00"),
    )
    # 1000 prompt tokens: 300 read from the cache, 200 written to it, 500 plain
    usage = Usage(
        input_tokens=1000,
        cached_input_tokens=300,
        cache_creation_input_tokens=200,
        output_tokens=100,
    )
    event = response("claude-3-5-sonnet-20241022", usage, provider="anthropic")
    assert price(event, catalog).pricing_model == "claude-3-5-sonnet"
    cost = priced(event, catalog)
    assert cost.input == usd(500, input_rate)
    assert cost.cached_input == usd(300, cached_rate)
    assert cost.cache_write == usd(200, write_rate)
    assert cost.output == usd(100, output_rate)
    assert cost.reasoning == 0
    assert cost.total == (
        usd(500, input_rate) + usd(300, cached_rate) + usd(200, write_rate) + usd(100, output_rate)
    )
    assert cost.total == Decimal("0.00384")


def test_reasoning_tokens_are_charged_once_at_the_output_rate(catalog: Catalog) -> None:
    # o3-mini has no separate reasoning rate: 300 of 500 output tokens are reasoning
    usage = Usage(input_tokens=100, output_tokens=500, reasoning_tokens=300)
    cost = priced(response("o3-mini", usage), catalog)
    assert cost.output == usd(500, Decimal("4.40"))
    assert cost.reasoning == 0
    assert cost.total == usd(100, Decimal("1.10")) + usd(500, Decimal("4.40"))


def test_reasoning_tokens_priced_apart_are_carved_out_of_output() -> None:
    rates = Rates(
        effective_from=date(2024, 1, 1),
        input=Decimal("1.00"),
        output=Decimal("4.00"),
        reasoning=Decimal("20.00"),
    )
    usage = Usage(input_tokens=100, output_tokens=500, reasoning_tokens=300)
    cost = cost_of(usage, rates)
    assert_all_decimal(cost)
    assert cost.input == usd(100, Decimal("1.00"))
    assert cost.output == usd(200, Decimal("4.00"))
    assert cost.reasoning == usd(300, Decimal("20.00"))
    assert cost.total == usd(100, Decimal("1.00")) + usd(200, Decimal("4.00")) + usd(
        300, Decimal("20.00")
    )


def test_omitted_cache_rates_fall_back_to_the_input_rate() -> None:
    rates = Rates(effective_from=date(2024, 1, 1), input=Decimal("2.00"), output=Decimal("8.00"))
    usage = Usage(
        input_tokens=1000, cached_input_tokens=300, cache_creation_input_tokens=200, output_tokens=0
    )
    cost = cost_of(usage, rates)
    assert cost.input == usd(500, Decimal("2.00"))
    assert cost.cached_input == usd(300, Decimal("2.00"))
    assert cost.cache_write == usd(200, Decimal("2.00"))
    assert cost.total == usd(1000, Decimal("2.00"))


def test_money_is_quantised_to_nine_decimal_places(catalog: Catalog) -> None:
    # one cached token on gpt-4o-mini: 0.075 USD per million
    usage = Usage(input_tokens=1, cached_input_tokens=1)
    cost = priced(response("gpt-4o-mini", usage), catalog)
    assert cost.cached_input == Decimal("0.000000075")
    assert f"{cost.cached_input:f}" == "0.000000075"
    assert cost.total == Decimal("0.000000075")
    assert cost.input == 0


def test_sub_nano_amounts_are_rounded_to_a_nano_dollar() -> None:
    rates = Rates(effective_from=date(2024, 1, 1), input=Decimal("0.0007"), output=Decimal("0"))
    cost = cost_of(Usage(input_tokens=1), rates)  # 0.0000000007 USD
    assert_all_decimal(cost)
    assert cost.input == cost.input.quantize(NANO)
    assert abs(cost.input - usd(1, Decimal("0.0007"))) <= NANO / 2


# -- catalog resolution -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-20240718", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("gpt-4o", "gpt-4o"),
        ("GPT-4o-2024-11-20", "gpt-4o"),  # names match case-insensitively
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # a snapshot priced apart: exact first
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-chat-latest", "gpt-5-chat"),
        ("gpt-5.5-2026-04-23", "gpt-5.5"),  # not gpt-5, nor gpt-5.5-pro
        ("gpt-5.5-pro-2026-04-23", "gpt-5.5-pro"),
        ("gpt-5.4-pro-2026-03-05", "gpt-5.4-pro"),
        ("gpt-5.2-pro-2025-12-11", "gpt-5.2-pro"),
        ("openai/gpt-5.3-codex", "gpt-5.3-codex"),
        ("gpt-5.1-codex-max", "gpt-5.1-codex-max"),
        ("o3-2025-04-16", "o3"),
        ("o1-preview", "o1"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("codex-mini-latest", "codex-mini"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5", "claude-sonnet-4-5"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-0", "claude-opus-4-0"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro"),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
        ("gemini-2.5-flash-lite-preview-09-2025", "gemini-2.5-flash-lite"),
        ("gemini-3-pro-preview", "gemini-3-pro-preview"),
        ("mistral-small-latest", "mistral-small"),
        ("mistral-small-2503", "mistral-small"),
        ("mistral-small-2409", "mistral-small-2409"),
        ("mistral-large-2411", "mistral-large-2411"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),  # a provider prefix (OpenRouter style)
        ("anthropic/claude-opus-4-1-20250805", "claude-opus-4-1"),
    ],
)
def test_dated_snapshots_resolve_to_their_family(catalog: Catalog, model: str, family: str) -> None:
    found = catalog.lookup(model)
    assert found is not None
    assert found[0] == family
    costed = price(response(model, Usage(input_tokens=10, output_tokens=10)), catalog)
    assert costed.pricing_model == family
    assert costed.unpriced is False
    assert costed.cost is not None


def test_the_served_snapshot_is_priced(catalog: Catalog) -> None:
    usage = Usage(input_tokens=1_000_000)
    event = response("gpt-4o", usage, model_served="gpt-4o-mini-2024-07-18")
    costed = price(event, catalog)
    assert costed.pricing_model == "gpt-4o-mini"
    assert costed.cost is not None
    assert costed.cost.total == Decimal("0.15")


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("no-such-model", "openai"),
        ("gpt-4o-turbo-pro", "openai"),
        ("gpt-4o-mini-tts", "openai"),
        ("mistral-large-latest", "mistral"),  # an alias Mistral repoints: not priced
        ("llama-3.3-70b-versatile", "together"),  # Groq's price is Groq's only
        ("meta-llama/llama-4-scout-17b-16e-instruct", "fireworks"),
        ("models/", "google"),
        ("-latest", "openai"),
    ],
)
def test_an_unknown_model_is_unpriced_never_zero(
    catalog: Catalog, model: str, provider: str
) -> None:
    usage = Usage(input_tokens=10, output_tokens=10)
    costed = price(response(model, usage, provider=provider), catalog)
    assert costed.cost is None
    assert costed.unpriced is True
    assert costed.pricing_model == ""


def test_missing_usage_has_no_cost(catalog: Catalog) -> None:
    costed = price(response("gpt-4o", Usage.missing()), catalog)
    assert costed.cost is None
    assert costed.unpriced is False  # the model is known; the tokens are not
    assert costed.pricing_model == "gpt-4o"

    unknown = price(response("no-such-model", Usage.missing()), catalog)
    assert unknown.cost is None


def test_a_call_with_no_tokens_costs_exactly_zero(catalog: Catalog) -> None:
    event = response("", Usage(), status="bad_request", http_status=400)
    costed = price(event, catalog)
    assert costed.unpriced is False
    assert costed.cost is not None
    assert costed.cost.total == Decimal(0)
    assert type(costed.cost.total) is Decimal
    for name in COST_FIELDS:
        assert getattr(costed.cost, name) == 0


def _dated_catalog() -> Catalog:
    old = Rates(effective_from=date(2024, 1, 1), input=Decimal("1.00"), output=Decimal("2.00"))
    new = Rates(effective_from=date(2024, 6, 1), input=Decimal("0.50"), output=Decimal("1.00"))
    # listed newest first: order in the file must not matter
    return Catalog(models={"acme-1": ModelPrice(provider="acme", prices=[new, old])})


@pytest.mark.parametrize(
    ("ts_start", "input_rate", "output_rate"),
    [
        (datetime(2024, 1, 1, 0, 0, tzinfo=UTC), Decimal("1.00"), Decimal("2.00")),
        (datetime(2024, 5, 31, 23, 59, 59, 999999, tzinfo=UTC), Decimal("1.00"), Decimal("2.00")),
        (datetime(2024, 6, 1, 0, 0, tzinfo=UTC), Decimal("0.50"), Decimal("1.00")),
        (datetime(2025, 3, 1, 12, 0, tzinfo=UTC), Decimal("0.50"), Decimal("1.00")),
    ],
)
def test_the_price_in_force_at_the_call_start_applies(
    ts_start: datetime, input_rate: Decimal, output_rate: Decimal
) -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000)
    cost = priced(response("acme-1", usage, ts=ts_start), _dated_catalog())
    assert cost.input == usd(1000, input_rate)
    assert cost.output == usd(1000, output_rate)
    assert cost.total == usd(1000, input_rate) + usd(1000, output_rate)


def test_a_call_before_any_price_is_unpriced() -> None:
    ts = datetime(2023, 12, 31, 23, 59, 59, tzinfo=UTC)
    costed = price(response("acme-1", Usage(input_tokens=1), ts=ts), _dated_catalog())
    assert costed.cost is None
    assert costed.unpriced is True


# -- determinism and the operator's file --------------------------------------------------


def test_price_is_deterministic(catalog: Catalog) -> None:
    usage = Usage(input_tokens=10, output_tokens=5)
    event = response("gpt-4o", usage)
    first, second = price(event, catalog), price(event, catalog)
    assert first.event_id == second.event_id
    assert first == second
    replayed = ResponseEvent.model_validate_json(event.model_dump_json())
    assert price(replayed, catalog).event_id == first.event_id

    other = response("gpt-4o", usage)
    assert other.event_id != event.event_id
    assert price(other, catalog).event_id != first.event_id
    assert first.event_id not in (event.event_id, other.event_id)


def test_an_operator_file_overrides_and_adds_models(tmp_path: Path) -> None:
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  gpt-4o:\n"
        "    provider: openai\n"
        "    prices:\n"
        '      - {effective_from: 2024-01-01, input: "5.00", cached_input: "2.00",'
        ' output: "20.00"}\n'
        "  acme-large:\n"
        "    provider: acme\n"
        "    prices:\n"
        '      - {effective_from: 2024-01-01, input: "0.70", output: "2.10"}\n',
    )
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200)

    overridden = priced(response("gpt-4o-2024-08-06", usage), catalog)
    assert overridden.input == usd(600, Decimal("5.00"))
    assert overridden.cached_input == usd(400, Decimal("2.00"))
    assert overridden.output == usd(200, Decimal("20.00"))

    added = priced(response("acme-large", usage, provider="acme"), catalog)
    assert added.input == usd(600, Decimal("0.70"))
    assert added.cached_input == usd(400, Decimal("0.70"))  # no cached rate: full input rate
    assert added.output == usd(200, Decimal("2.10"))

    # the rest of the shipped catalog is still there, unchanged
    sonnet = priced(response("claude-3-5-sonnet", Usage(input_tokens=1_000_000)), catalog)
    assert sonnet.total == Decimal("3.00")
    # and the shipped catalog itself is untouched
    shipped = priced(response("gpt-4o", usage), load_catalog())
    assert shipped.total == Decimal("0.004")


def test_an_override_keeps_the_limits_it_does_not_name(tmp_path: Path) -> None:
    """An entry copied to change a price keeps the shipped limits a hard cap's worst
    case rests on; limits it names replace them, and a null drops one."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  GPT-4o:\n"  # matched case-insensitively, as lookups are
        "    provider: openai\n"
        '    prices: [{effective_from: 2024-01-01, input: "5.00", output: "20.00"}]\n'
        "  o3:\n"
        "    provider: openai\n"
        "    max_output_tokens: 2000\n"
        '    prices: [{effective_from: 2024-01-01, input: "2.00", output: "8.00"}]\n'
        "  o4-mini:\n"
        "    provider: openai\n"
        "    context_window: null\n"
        '    prices: [{effective_from: 2024-01-01, input: "1.10", output: "4.40"}]\n',
    )
    shipped = load_catalog()

    def limits(cat: Catalog, model: str) -> tuple[int | None, int | None]:
        found = cat.lookup(model)
        assert found is not None
        return found[1].context_window, found[1].max_output_tokens

    assert limits(catalog, "gpt-4o") == limits(shipped, "gpt-4o")
    assert limits(catalog, "gpt-4o")[1] == 16_384
    assert limits(catalog, "o3") == (limits(shipped, "o3")[0], 2000)
    assert limits(catalog, "o4-mini") == (None, limits(shipped, "o4-mini")[1])
    # the price itself is the operator's
    found = catalog.lookup("gpt-4o")
    assert found is not None and found[1].prices[0].input == Decimal("5.00")


def test_the_shipped_catalog_loads_and_every_entry_is_in_force_today(catalog: Catalog) -> None:
    assert catalog.models
    now = datetime.now(UTC)
    for name, entry in catalog.models.items():
        assert entry.at(now) is not None, name


# -- golden costs per provider, from the shipped catalog ----------------------------------
# Every expected amount is worked out by hand in the comment beside it: tokens times the
# rate per million tokens, from stream/pricing.yaml.

LATE_2026 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def costed_at(
    catalog: Catalog, model: str, usage: Usage, provider: str, ts: datetime = LATE_2026
) -> tuple[Cost, str]:
    event = response(model, usage, ts=ts, provider=provider)
    costed = price(event, catalog)
    assert costed.unpriced is False, model
    assert costed.cost is not None, model
    assert_all_decimal(costed.cost)
    return costed.cost, costed.pricing_model


def test_openai_cached_input_is_not_also_charged_at_the_input_rate(catalog: Catalog) -> None:
    # gpt-5: 100,000 prompt tokens of which 90,000 cached, 2,000 output
    usage = Usage(input_tokens=100_000, cached_input_tokens=90_000, output_tokens=2_000)
    cost, family = costed_at(catalog, "gpt-5-2025-08-07", usage, "openai")
    assert family == "gpt-5"
    assert cost.input == Decimal("0.0125")  # 10,000 x 1.25
    assert cost.cached_input == Decimal("0.01125")  # 90,000 x 0.125
    assert cost.cache_write == 0
    assert cost.output == Decimal("0.02")  # 2,000 x 10.00
    assert cost.reasoning == 0
    assert cost.total == Decimal("0.04375")
    # charging the cached tokens at the input rate too would have cost 0.1575


def test_gpt_3_5_turbo_1106_is_priced_apart_from_its_family(catalog: Catalog) -> None:
    """gpt-3.5-turbo-1106 kept its launch price ($1 input, $2 output a million, beside
    gpt-3.5-turbo-0125 at $0.50 / $1.50): its "-1106" is no date, and it resolved to
    the family, billed at half its input price."""
    usage = Usage(input_tokens=1_000, output_tokens=1_000)
    cost, family = costed_at(catalog, "gpt-3.5-turbo-1106", usage, "openai")
    assert (family, cost.total) == ("gpt-3.5-turbo-1106", Decimal("0.003"))
    cost, family = costed_at(catalog, "gpt-3.5-turbo-0125", usage, "openai")
    assert (family, cost.total) == ("gpt-3.5-turbo", Decimal("0.002"))


def test_openai_snapshot_priced_apart_from_its_family(catalog: Catalog) -> None:
    usage = Usage(input_tokens=1_000, output_tokens=1_000)
    old, old_family = costed_at(catalog, "gpt-4o-2024-05-13", usage, "openai")
    assert old_family == "gpt-4o-2024-05-13"
    assert old.total == Decimal("0.02")  # 1,000 x 5.00 + 1,000 x 15.00
    new, new_family = costed_at(catalog, "gpt-4o-2024-08-06", usage, "openai")
    assert new_family == "gpt-4o"
    assert new.total == Decimal("0.0125")  # 1,000 x 2.50 + 1,000 x 10.00


def test_o_series_reasoning_tokens_are_output_tokens_charged_once(catalog: Catalog) -> None:
    # o4-mini: 2,000 prompt tokens, 5,000 output tokens of which 4,000 reasoning
    usage = Usage(input_tokens=2_000, output_tokens=5_000, reasoning_tokens=4_000)
    cost, family = costed_at(catalog, "o4-mini-2025-04-16", usage, "openai")
    assert family == "o4-mini"
    assert cost.input == Decimal("0.0022")  # 2,000 x 1.10
    assert cost.output == Decimal("0.022")  # 5,000 x 4.40 (reasoning included, once)
    assert cost.reasoning == 0  # no separate reasoning rate
    assert cost.total == Decimal("0.0242")


def test_o3_price_cut_does_not_reprice_earlier_calls(catalog: Catalog) -> None:
    usage = Usage(input_tokens=1_000, cached_input_tokens=0, output_tokens=1_000)
    before, _ = costed_at(
        catalog, "o3", usage, "openai", ts=datetime(2025, 6, 9, 23, 59, tzinfo=UTC)
    )
    assert before.total == Decimal("0.05")  # 1,000 x 10.00 + 1,000 x 40.00
    after, _ = costed_at(catalog, "o3", usage, "openai", ts=datetime(2025, 6, 10, tzinfo=UTC))
    assert after.total == Decimal("0.01")  # 1,000 x 2.00 + 1,000 x 8.00


def test_anthropic_5m_and_1h_cache_writes_and_reads_each_charged_once(catalog: Catalog) -> None:
    # As Anthropic reports it: 1,000 uncached, 20,000 read from the cache, 5,000 written
    # to it (3,000 for 5 minutes, 2,000 for 1 hour), 800 output.
    usage = anthropic_usage(
        {
            "input_tokens": 1_000,
            "cache_read_input_tokens": 20_000,
            "cache_creation_input_tokens": 5_000,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 3_000,
                "ephemeral_1h_input_tokens": 2_000,
            },
            "output_tokens": 800,
        }
    )
    assert usage is not None
    cost, family = costed_at(catalog, "claude-sonnet-4-5-20250929", usage, "anthropic")
    assert family == "claude-sonnet-4-5"
    assert cost.input == Decimal("0.003")  # 1,000 x 3.00
    assert cost.cached_input == Decimal("0.006")  # 20,000 x 0.30
    assert cost.cache_write == Decimal("0.02325")  # 3,000 x 3.75 + 2,000 x 6.00
    assert cost.output == Decimal("0.012")  # 800 x 15.00
    assert cost.reasoning == 0
    assert cost.total == Decimal("0.04425")


def test_anthropic_all_writes_for_one_hour(catalog: Catalog) -> None:
    # claude-haiku-4-5: 10,000 prompt tokens, all written to the 1-hour cache
    usage = Usage(
        input_tokens=10_000,
        cache_creation_input_tokens=10_000,
        cache_creation_1h_input_tokens=10_000,
        output_tokens=0,
    )
    cost, _ = costed_at(catalog, "claude-haiku-4-5", usage, "anthropic")
    assert cost.input == 0
    assert cost.cache_write == Decimal("0.02")  # 10,000 x 2.00
    assert cost.total == Decimal("0.02")


def test_one_hour_cache_write_rate_falls_back_to_cache_write_then_input() -> None:
    usage = Usage(
        input_tokens=1_000,
        cache_creation_input_tokens=600,
        cache_creation_1h_input_tokens=200,
        output_tokens=0,
    )
    day = date(2024, 1, 1)
    with_write = Rates(
        effective_from=day, input=Decimal("1.00"), output=Decimal("0"), cache_write=Decimal("2.00")
    )
    cost = cost_of(usage, with_write)
    assert cost.input == Decimal("0.0004")  # 400 x 1.00
    assert cost.cache_write == Decimal("0.0012")  # 400 x 2.00 + 200 x 2.00
    assert cost.total == Decimal("0.0016")
    bare = Rates(effective_from=day, input=Decimal("1.00"), output=Decimal("0"))
    assert cost_of(usage, bare).cache_write == Decimal("0.0006")  # 600 x 1.00
    assert cost_of(usage, bare).total == Decimal("0.001")  # every token at the input rate


def test_one_hour_writes_never_exceed_the_writes() -> None:
    # a malformed Usage (more 1-hour writes than writes) cannot charge a token twice
    usage = Usage(
        input_tokens=1_000,
        cache_creation_input_tokens=100,
        cache_creation_1h_input_tokens=900,
        output_tokens=0,
    )
    rates = Rates(
        effective_from=date(2024, 1, 1),
        input=Decimal("1.00"),
        output=Decimal("0"),
        cache_write=Decimal("2.00"),
        cache_write_1h=Decimal("4.00"),
    )
    cost = cost_of(usage, rates)
    assert cost.input == Decimal("0.0009")  # 900 x 1.00
    assert cost.cache_write == Decimal("0.0004")  # 100 x 4.00
    assert cost.total == Decimal("0.0013")


def test_anthropic_long_context_prices_the_whole_call_higher(catalog: Catalog) -> None:
    # claude-sonnet-4 with 1M context: 250,000 prompt tokens (over 200,000), 1,000 output
    usage = Usage(input_tokens=250_000, output_tokens=1_000)
    cost, _ = costed_at(catalog, "claude-sonnet-4-20250514", usage, "anthropic")
    assert cost.input == Decimal("1.5")  # 250,000 x 6.00
    assert cost.output == Decimal("0.0225")  # 1,000 x 22.50
    assert cost.total == Decimal("1.5225")


@pytest.mark.parametrize(
    ("model", "fresh", "write", "hour", "read", "out"),
    [
        ("claude-opus-4-6", "10.00", "12.50", "20.00", "1.00", "37.50"),
        ("claude-sonnet-4-6", "6.00", "7.50", "12.00", "0.60", "22.50"),
    ],
)
def test_claude_4_6_priced_past_200k_higher_until_its_1m_context_went_ga(
    catalog: Catalog, model: str, fresh: str, write: str, hour: str, read: str, out: str
) -> None:
    """Opus and Sonnet 4.6's 1M context was a beta with "long context pricing" past 200K
    prompt tokens (they were priced at the standard rates); from 2026-03-13, GA at
    standard pricing across the whole window."""
    usage = Usage(input_tokens=250_000, cached_input_tokens=100_000,
                  cache_creation_input_tokens=50_000, cache_creation_1h_input_tokens=20_000,
                  output_tokens=1_000)  # fmt: skip
    beta = datetime(2026, 3, 12, 23, tzinfo=UTC)
    cost, _ = costed_at(catalog, model, usage, "anthropic", ts=beta)
    assert cost.input == usd(100_000, Decimal(fresh))
    assert cost.cached_input == usd(100_000, Decimal(read))
    assert cost.cache_write == usd(30_000, Decimal(write)) + usd(20_000, Decimal(hour))
    assert cost.output == usd(1_000, Decimal(out))
    short, _ = costed_at(catalog, model, usage.model_copy(update={"input_tokens": 200_000}),
                         "anthropic", ts=beta)  # fmt: skip
    ga, _ = costed_at(catalog, model, usage, "anthropic", ts=datetime(2026, 3, 13, tzinfo=UTC))
    assert ga.input == usd(100_000, Decimal(fresh) / 2)
    assert ga.output == usd(1_000, Decimal(out) / Decimal("1.5"))
    assert short.output == ga.output  # exactly 200,000: the base tier


@pytest.mark.parametrize(
    ("prompt", "cached", "expected"),
    [
        # exactly 100,000: the base tier. 100,000 x 0.10 + 1,000 x 0.50
        (100_000, 0, Decimal("0.0105")),
        # 150,000 of which 100,000 read from the cache: the long tier for every token.
        # 50,000 x 0.50 + 100,000 x 0.05 + 1,000 x 2.50
        (150_000, 100_000, Decimal("0.0325")),
    ],
)
def test_anthropic_prompt_length_tiers(
    catalog: Catalog, prompt: int, cached: int, expected: Decimal
) -> None:
    usage = Usage(input_tokens=prompt, cached_input_tokens=cached, output_tokens=1_000)
    cost, _ = costed_at(catalog, "claude-haiku-5-5", usage, "anthropic")
    assert cost.total == expected


def test_anthropic_cache_read_cut_applies_from_its_day(catalog: Catalog) -> None:
    usage = Usage(input_tokens=1_000_000, cached_input_tokens=1_000_000)
    before, _ = costed_at(
        catalog, "claude-sonnet-5-5", usage, "anthropic", ts=datetime(2026, 10, 6, 23, tzinfo=UTC)
    )
    assert before.total == Decimal("0.2")  # 1,000,000 x 0.20
    after, _ = costed_at(
        catalog, "claude-sonnet-5-5", usage, "anthropic", ts=datetime(2026, 10, 7, tzinfo=UTC)
    )
    assert after.total == Decimal("0.1")  # 1,000,000 x 0.10


def test_gemini_cached_input_and_long_context(catalog: Catalog) -> None:
    # gemini-2.5-pro: 100,000 prompt tokens of which 40,000 cached, 2,000 output (thinking
    # included)
    usage = Usage(input_tokens=100_000, cached_input_tokens=40_000, output_tokens=2_000)
    cost, family = costed_at(catalog, "models/gemini-2.5-pro", usage, "gemini")
    assert family == "gemini-2.5-pro"
    assert cost.input == Decimal("0.075")  # 60,000 x 1.25
    assert cost.cached_input == Decimal("0.005")  # 40,000 x 0.125
    assert cost.output == Decimal("0.02")  # 2,000 x 10.00
    assert cost.total == Decimal("0.1")
    # 300,000 prompt tokens: over 200,000, every token at the long-context rates
    long_usage = Usage(input_tokens=300_000, output_tokens=1_000)
    long_cost, _ = costed_at(catalog, "gemini-2.5-pro", long_usage, "gemini")
    assert long_cost.input == Decimal("0.75")  # 300,000 x 2.50
    assert long_cost.output == Decimal("0.015")  # 1,000 x 15.00
    assert long_cost.total == Decimal("0.765")


def test_gemini_flash(catalog: Catalog) -> None:
    usage = Usage(input_tokens=10_000, output_tokens=1_000)
    cost, family = costed_at(catalog, "gemini-2.5-flash", usage, "google")
    assert family == "gemini-2.5-flash"
    assert cost.total == Decimal("0.0055")  # 10,000 x 0.30 + 1,000 x 2.50


def test_mistral(catalog: Catalog) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000)
    small, family = costed_at(catalog, "mistral-small-latest", usage, "mistral")
    assert family == "mistral-small"
    assert small.input == Decimal("0.1")  # 1,000,000 x 0.10
    assert small.output == Decimal("0.03")  # 100,000 x 0.30
    assert small.total == Decimal("0.13")
    large, family = costed_at(catalog, "mistral-large-2411", usage, "mistral")
    assert family == "mistral-large-2411"
    assert large.total == Decimal("2.6")  # 1,000,000 x 2.00 + 100,000 x 6.00


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        # 20,000 cache misses, 80,000 cache hits, 1,000 output; the rates in force then:
        # 20,000 x 0.27 + 80,000 x 0.07 + 1,000 x 1.10
        (datetime(2025, 3, 1, tzinfo=UTC), Decimal("0.0121")),
        # 20,000 x 0.56 + 80,000 x 0.07 + 1,000 x 1.68
        (datetime(2025, 9, 10, tzinfo=UTC), Decimal("0.01848")),
        # 20,000 x 0.28 + 80,000 x 0.028 + 1,000 x 0.42
        (datetime(2025, 10, 15, tzinfo=UTC), Decimal("0.00826")),
    ],
)
def test_deepseek_cache_hits_at_the_price_in_force(
    catalog: Catalog, ts: datetime, expected: Decimal
) -> None:
    usage = Usage(input_tokens=100_000, cached_input_tokens=80_000, output_tokens=1_000)
    cost, family = costed_at(catalog, "deepseek-chat", usage, "deepseek", ts=ts)
    assert family == "deepseek-chat"
    assert cost.total == expected
    assert cost.input + cost.cached_input + cost.output == expected


@pytest.mark.parametrize(
    ("model", "ts", "rates"),
    [
        # cache miss, cache hit, output (the peak rates from 2026-08-16 16:00 UTC on)
        ("deepseek-v4-pro", datetime(2026, 7, 1, tzinfo=UTC), ("0.435", "0.003625", "0.87")),
        ("deepseek-v4-pro", datetime(2026, 8, 20, tzinfo=UTC), ("1.32", "0.044", "3.96")),
        ("deepseek-v4-flash", datetime(2026, 7, 1, tzinfo=UTC), ("0.14", "0.0028", "0.28")),
        ("deepseek-v4-flash", datetime(2026, 8, 20, tzinfo=UTC), ("0.44", "0.014", "1.32")),
        ("deepseek-v4-flash", datetime(2026, 10, 1, tzinfo=UTC), ("0.30", "0.006", "1.20")),
        ("deepseek-flash", datetime(2026, 10, 1, tzinfo=UTC), ("0.30", "0.006", "1.20")),
    ],
)
def test_deepseek_v4_at_the_price_in_force(
    catalog: Catalog, model: str, ts: datetime, rates: tuple[str, str, str]
) -> None:
    """V4 Pro's launch price held until the peak/off-peak prices of 2026-08-16 (the
    official page still listed it in August); Flash went to V4.1 Flash's price."""
    miss, hit, out = (Decimal(r) for r in rates)
    usage = Usage(input_tokens=100_000, cached_input_tokens=80_000, output_tokens=1_000)
    cost, family = costed_at(catalog, model, usage, "deepseek", ts=ts)
    assert family == model
    assert cost.input == usd(20_000, miss)
    assert cost.cached_input == usd(80_000, hit)
    assert cost.output == usd(1_000, out)


def test_deepseek_before_its_first_listed_price_is_unpriced(catalog: Catalog) -> None:
    event = response(
        "deepseek-chat",
        Usage(input_tokens=10, output_tokens=10),
        ts=datetime(2025, 2, 7, tzinfo=UTC),
        provider="deepseek",
    )
    costed = price(event, catalog)
    assert costed.cost is None
    assert costed.unpriced is True


@pytest.mark.parametrize(
    ("provider", "model", "family", "expected"),
    [
        # the same open model, 1M input and 1M output tokens, priced by who served it
        (
            "groq",
            "meta-llama/llama-4-scout-17b-16e-instruct",
            "groq/meta-llama/llama-4-scout-17b-16e-instruct",
            Decimal("0.45"),  # 0.11 + 0.34
        ),
        (
            "together",
            "meta-llama/Llama-4-Scout-17B-16E-Instruct",
            "together/meta-llama/Llama-4-Scout-17B-16E-Instruct",
            Decimal("0.77"),  # 0.18 + 0.59
        ),
        (
            "together",
            "meta-llama/llama-4-scout-17b-16e-instruct",  # names match whatever their case
            "together/meta-llama/Llama-4-Scout-17B-16E-Instruct",
            Decimal("0.77"),
        ),
        (
            "groq",
            "llama-3.3-70b-versatile",
            "groq/llama-3.3-70b-versatile",
            Decimal("1.38"),  # 0.59 + 0.79
        ),
        (
            "groq",
            "groq/llama-3.1-8b-instant",  # as requested through llmtap
            "groq/llama-3.1-8b-instant",
            Decimal("0.13"),  # 0.05 + 0.08
        ),
        (
            "groq",
            "llama-3.1-8b-instant-2025-01-01",
            "groq/llama-3.1-8b-instant",
            Decimal("0.13"),
        ),
        (
            "together",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
            Decimal("1.76"),  # 0.88 + 0.88
        ),
    ],
)
def test_llama_is_priced_by_the_provider_that_served_it(
    catalog: Catalog, provider: str, model: str, family: str, expected: Decimal
) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    cost, pricing_model = costed_at(catalog, model, usage, provider)
    assert pricing_model == family
    assert cost.total == expected


def test_the_model_served_is_priced_with_the_provider_recorded(catalog: Catalog) -> None:
    usage = Usage(input_tokens=1_000_000)
    event = response(
        "groq/llama-3.3-70b-versatile",
        usage,
        ts=LATE_2026,
        provider="groq",
        model_served="llama-3.3-70b-versatile",
    )
    costed = price(event, catalog)
    assert costed.pricing_model == "groq/llama-3.3-70b-versatile"
    assert costed.cost is not None
    assert costed.cost.total == Decimal("0.59")


# -- the catalog itself -------------------------------------------------------------------


def test_every_catalog_entry_has_rates_and_dates_in_order(catalog: Catalog) -> None:
    providers = {entry.provider for entry in catalog.models.values()}
    assert {"openai", "anthropic", "google", "mistral", "deepseek", "groq", "together"} <= (
        providers
    )
    for name, entry in catalog.models.items():
        assert entry.prices, name
        days = [rates.effective_from for rates in entry.prices]
        assert days == sorted(days), name
        assert len(set(days)) == len(days), name
        for rates in entry.prices:
            assert type(rates.input) is Decimal and type(rates.output) is Decimal, name
            assert rates.input >= 0 and rates.output >= 0, name
            tier = rates.long_context
            if tier is not None:
                assert tier.above_input_tokens > 0, name
                assert tier.input >= rates.input and tier.output >= rates.output, name
        head, slash, _ = name.partition("/")
        if slash and head in providers:  # a provider-scoped key is that provider's
            assert entry.provider == head, name


def test_catalog_keys_must_differ_by_more_than_case() -> None:
    one = ModelPrice(
        provider="acme",
        prices=[Rates(effective_from=date(2024, 1, 1), input=Decimal(1), output=Decimal(1))],
    )
    with pytest.raises(ValueError, match="differ only in case"):
        Catalog(models={"acme-1": one, "ACME-1": one})


@pytest.mark.parametrize(
    ("multipliers", "error"),
    [({"US": "1.1"}, "should match pattern"), ({"global": "1.1"}, "standard")],
)
def test_a_geography_is_named_as_answers_name_it(multipliers: dict[str, str], error: str) -> None:
    """geo_multipliers' keys are matched against the answer's usage.inference_geo, which
    is lower case: a key "US" never matched, and its calls went unpriced; "global" is
    the standard rates. Both are refused where the catalog is read."""
    with pytest.raises(ValueError, match=error):
        Rates(effective_from=date(2026, 1, 1), input=1, output=1, geo_multipliers=multipliers)


def test_two_prices_on_one_day_are_refused() -> None:
    rates = Rates(effective_from=date(2024, 1, 1), input=Decimal(1), output=Decimal(1))
    with pytest.raises(ValueError, match="same day"):
        ModelPrice(provider="acme", prices=[rates, rates])


def test_an_operator_file_overrides_per_provider_and_adds_providers(tmp_path: Path) -> None:
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  GROQ/llama-3.3-70b-versatile:\n"  # replaces the shipped entry, whatever the case
        "    provider: groq\n"
        "    prices:\n"
        '      - {effective_from: 2024-01-01, input: "0.50", output: "0.70"}\n'
        "  fireworks/meta-llama/llama-4-scout-17b-16e-instruct:\n"
        "    provider: fireworks\n"
        "    prices:\n"
        '      - {effective_from: 2024-01-01, input: "0.15", output: "0.60"}\n',
    )
    assert "groq/llama-3.3-70b-versatile" not in catalog.models
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    groq, family = costed_at(catalog, "llama-3.3-70b-versatile", usage, "groq")
    assert family == "GROQ/llama-3.3-70b-versatile"
    assert groq.total == Decimal("1.2")  # 0.50 + 0.70
    scout = "meta-llama/llama-4-scout-17b-16e-instruct"
    fireworks, _ = costed_at(catalog, scout, usage, "fireworks")
    assert fireworks.total == Decimal("0.75")  # 0.15 + 0.60
    together, _ = costed_at(catalog, scout, usage, "together")
    assert together.total == Decimal("0.77")  # shipped, untouched


def test_an_operator_file_can_date_a_new_price_without_repricing_history(
    tmp_path: Path,
) -> None:
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  gpt-4.1:\n"
        "    provider: openai\n"
        "    prices:\n"
        '      - {effective_from: 2025-04-14, input: "2.00", cached_input: "0.50",'
        ' output: "8.00"}\n'
        '      - {effective_from: 2026-12-01, input: "1.00", cached_input: "0.25",'
        ' output: "4.00"}\n',
    )
    usage = Usage(input_tokens=1_000, output_tokens=1_000)
    old, _ = costed_at(catalog, "gpt-4.1", usage, "openai", ts=datetime(2026, 11, 30, tzinfo=UTC))
    assert old.total == Decimal("0.01")  # 1,000 x 2.00 + 1,000 x 8.00
    new, _ = costed_at(catalog, "gpt-4.1", usage, "openai", ts=datetime(2026, 12, 1, tzinfo=UTC))
    assert new.total == Decimal("0.005")  # 1,000 x 1.00 + 1,000 x 4.00


def test_every_shipped_model_says_how_much_a_call_can_read_and_write() -> None:
    """A hard cap's worst case reads these (ingress/guards/budgets.py); a model without
    them falls back to settings that may be too small for it."""
    for key, entry in load_catalog().models.items():
        assert entry.context_window is not None and entry.max_output_tokens is not None, key
        embeds = "embed" in key
        assert (entry.max_output_tokens == 0) == embeds, key


# -- web searches ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider"), [("claude-sonnet-4-5", "anthropic"), ("gpt-5", "openai")]
)
def test_web_searches_are_billed_per_search_on_top_of_the_tokens(
    catalog: Catalog, model: str, provider: str
) -> None:
    tokens = Usage(input_tokens=12_000, output_tokens=400)
    plain = priced(response(model, tokens, provider=provider), catalog)
    searched = priced(
        response(model, tokens.model_copy(update={"web_search_requests": 3}), provider=provider),
        catalog,
    )
    assert plain.web_search == Decimal(0)
    assert searched.web_search == Decimal("0.03")  # $10 per 1,000
    assert searched.total == plain.total + Decimal("0.03")
    parts = ("input", "cached_input", "cache_write", "output", "reasoning", "web_search")
    assert sum(getattr(searched, p) for p in parts) == searched.total


def test_web_search_preview_searches_cost_their_own_fee_where_the_model_gives_one(
    catalog: Catalog,
) -> None:
    """OpenAI bills the older web_search_preview tool $25 a thousand on non-reasoning
    models (gpt-4o, gpt-4.1), $10 on reasoning ones (as web_search)."""

    def fee(model: str, searches: int, preview: int) -> Decimal:
        usage = Usage(
            input_tokens=1000, web_search_requests=searches, web_search_preview_requests=preview
        )
        return priced(response(model, usage, provider="openai"), catalog).web_search

    assert fee("gpt-4o-2024-08-06", 3, 0) == Decimal("0.03")
    assert fee("gpt-4o-2024-08-06", 3, 3) == Decimal("0.075")
    assert fee("gpt-4.1-mini", 3, 2) == Decimal("0.06")  # 1 x $10 + 2 x $25 a thousand
    assert fee("gpt-4o-mini", 1, 5) == Decimal("0.025")  # never more than the searches
    assert fee("gpt-5", 3, 3) == Decimal("0.03")  # no preview fee: web_search's
    assert fee("o3", 2, 2) == Decimal("0.02")


def test_an_entry_with_a_preview_fee_alone_prices_those_searches_alone(tmp_path: Path) -> None:
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  acme-search:\n"
        "    provider: acme\n"
        '    prices: [{effective_from: 2025-01-01, input: "1.00", output: "1.00",'
        ' web_search_preview: "20.00"}]\n',
    )
    usage = Usage(web_search_requests=5, web_search_preview_requests=2)
    cost = priced(response("acme-search", usage, provider="acme"), catalog)
    assert (cost.web_search, cost.total) == (Decimal("0.04"), Decimal("0.04"))


def test_an_override_that_makes_searches_free_makes_preview_searches_free(
    tmp_path: Path,
) -> None:
    """``web_search: null`` in an override (written before the preview fee existed,
    meaning: searches cost nothing here) does not leave the shipped $25 preview fee."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  gpt-4o-mini:\n"
        "    provider: openai\n"
        '    prices: [{effective_from: 2024-07-18, input: "0.15", output: "0.60",'
        " web_search: null}]\n",
    )
    usage = Usage(web_search_requests=4, web_search_preview_requests=4)
    assert priced(response("gpt-4o-mini", usage, provider="openai"), catalog).total == 0


def test_a_call_that_only_searched_is_priced(catalog: Catalog) -> None:
    # A search that found nothing the model read still costs its fee.
    usage = Usage(web_search_requests=1)
    assert priced(response("claude-sonnet-4-5", usage, provider="anthropic"), catalog).total == (
        Decimal("0.01")
    )


def test_searches_without_a_fee_in_the_catalog_are_counted_at_no_fee(tmp_path: Path) -> None:
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  vllm/my-model:\n"
        "    provider: vllm\n"
        '    prices: [{effective_from: 2025-01-01, input: "1.00", output: "1.00"}]\n'
        "  acme-search:\n"
        "    provider: acme\n"
        '    prices: [{effective_from: 2025-01-01, input: "1.00", output: "1.00",'
        ' web_search: "5.00"}]\n',
    )
    usage = Usage(input_tokens=1_000_000, web_search_requests=7)
    assert priced(response("my-model", usage, provider="vllm"), catalog).total == Decimal("1.00")
    cost = priced(response("acme-search", usage, provider="acme"), catalog)
    assert (cost.web_search, cost.total) == (Decimal("0.035"), Decimal("1.035"))


def test_an_override_keeps_the_search_fee_and_limits_of_the_entry_it_shadows(
    tmp_path: Path,
) -> None:
    """An override of a token price (by its name, or scoped to its provider, which is
    looked up first) keeps the shipped search fee on each of its prices, and the
    shipped limits; a fee it names (null included) is its own."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  gpt-4o:\n"
        "    provider: openai\n"
        "    prices:\n"
        '      - {effective_from: 2020-01-01, input: "2.00", output: "8.00"}\n'
        '      - {effective_from: 2027-01-01, input: "1.00", output: "4.00", web_search: "5.00"}\n'
        "  anthropic/claude-haiku-4-5:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2025-10-01, input: "0.80", output: "4.00"}]\n'
        "  claude-sonnet-4-5:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2025-09-29, input: "3.00", output: "15.00",'
        " web_search: null}]\n",
    )
    shipped = load_catalog()

    def entry(cat: Catalog, model: str, provider: str) -> ModelPrice:
        found = cat.lookup(model, provider)
        assert found is not None
        return found[1]

    gpt = entry(catalog, "gpt-4o", "openai")
    assert [r.web_search for r in gpt.prices] == [Decimal("10.00"), Decimal("5.00")]
    # naming one search fee names both: a preview search costs the $5 it names
    assert [r.web_search_preview for r in gpt.prices] == [Decimal("25.00"), None]
    haiku = entry(catalog, "claude-haiku-4-5-20251001", "anthropic")
    assert haiku.prices[0].input == Decimal("0.80")  # the operator's entry, found first
    assert haiku.prices[0].web_search == Decimal("10.00")
    shipped_haiku = entry(shipped, "claude-haiku-4-5", "anthropic")
    assert (haiku.context_window, haiku.max_output_tokens) == (
        shipped_haiku.context_window,
        shipped_haiku.max_output_tokens,
    )
    sonnet = entry(catalog, "claude-sonnet-4-5", "anthropic").prices[0]
    assert (sonnet.web_search, sonnet.web_search_preview) == (None, None)
    later = Usage(input_tokens=1000, web_search_requests=4, web_search_preview_requests=4)
    cost = priced(
        response("gpt-4o", later, provider="openai", ts=datetime(2027, 2, 1, tzinfo=UTC)), catalog
    )
    assert cost.web_search == Decimal("0.02")  # the $5 the override names, not $25
    searched = Usage(input_tokens=1000, web_search_requests=4)
    cost = priced(response("gpt-4o", searched, provider="openai"), catalog)
    assert cost.web_search == Decimal("0.04")


# -- Anthropic's fast mode ---------------------------------------------------------------

# Every kind of token (uncached, cache reads, 5-minute and 1-hour writes, output) and
# two searches, as Anthropic reports them.
FAST_USAGE = {
    "input_tokens": 1_000,
    "cache_read_input_tokens": 20_000,
    "cache_creation_input_tokens": 5_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 3_000, "ephemeral_1h_input_tokens": 2_000},
    "output_tokens": 800,
    "server_tool_use": {"web_search_requests": 2},
}


def anthropic_call(speed: str | None) -> Usage:
    usage = anthropic_usage({**FAST_USAGE, "speed": speed})
    assert usage is not None
    return usage


@pytest.mark.parametrize(
    "model", ["claude-opus-4-6", "claude-opus-4-7", "claude-opus-4-8", "claude-opus-5",
              "claude-opus-5-5-20260922"],
)  # fmt: skip
def test_a_call_served_in_fast_mode_costs_every_token_at_the_fast_rates(
    catalog: Catalog, model: str
) -> None:
    """Fast mode multiplies every token rate, cache reads and writes included; the
    search fee is per search and stays. Billing follows the speed that served the call:
    a fast request served at standard speed costs the standard rates."""
    fast = priced(response(model, anthropic_call("fast"), provider="anthropic"), catalog)
    standard = priced(response(model, anthropic_call("standard"), provider="anthropic"), catalog)
    assert standard == priced(response(model, anthropic_call(None), provider="anthropic"), catalog)
    found = catalog.lookup(model, "anthropic")
    assert found is not None
    rates = found[1].at(datetime.now(UTC))
    assert rates is not None and rates.cached_input and rates.cache_write and rates.cache_write_1h
    times = rates.fast_multiplier
    assert times is not None and times > 1
    assert fast.input == usd(1_000, rates.input * times)
    assert fast.cached_input == usd(20_000, rates.cached_input * times)
    assert fast.cache_write == usd(3_000, rates.cache_write * times) + usd(
        2_000, rates.cache_write_1h * times
    )
    assert fast.output == usd(800, rates.output * times)
    assert fast.web_search == standard.web_search == Decimal("0.02")  # $10 per 1,000
    for part in ("input", "cached_input", "cache_write", "output"):
        assert getattr(fast, part) == getattr(standard, part) * times
    assert fast.total == (standard.total - standard.web_search) * times + fast.web_search


def test_the_fast_rates_are_anthropic_s(catalog: Catalog) -> None:
    """The fast mode page's table: Opus 5.5 $8/$40, Opus 5 and Opus 4.8 $10/$50 a
    million; Claude Code's: Opus 4.7 and 4.6 $30/$150."""
    table = {
        "claude-opus-5-5": ("8", "40"),
        "claude-opus-5": ("10", "50"),
        "claude-opus-4-8": ("10", "50"),
        "claude-opus-4-7": ("30", "150"),
        "claude-opus-4-6": ("30", "150"),
    }
    for model, (fast_in, fast_out) in table.items():
        rates = catalog.models[model].prices[-1]
        assert rates.fast_multiplier is not None
        assert rates.input * rates.fast_multiplier == Decimal(fast_in), model
        assert rates.output * rates.fast_multiplier == Decimal(fast_out), model


def test_a_call_served_fast_on_a_model_with_no_fast_price_is_unpriced(catalog: Catalog) -> None:
    """Not a standard-rate guess: its cost is unknown, and counted as such."""
    costed = price(
        response("claude-sonnet-5", anthropic_call("fast"), provider="anthropic"), catalog
    )
    assert (costed.cost, costed.unpriced, costed.pricing_model) == (None, True, "")
    standard = price(
        response("claude-sonnet-5", anthropic_call("standard"), provider="anthropic"), catalog
    )
    assert standard.cost is not None and not standard.unpriced


def test_fast_mode_multiplies_the_long_context_rates_too(tmp_path: Path) -> None:
    """ "Across the full context window": a prompt past the tier's threshold is priced at
    the long-context rates, times the multiplier."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  acme-opus:\n"
        "    provider: acme\n"
        '    prices: [{effective_from: 2025-01-01, input: "2.00", output: "10.00",'
        ' fast_multiplier: "2.5", long_context: {above_input_tokens: 1000, input: "4.00",'
        ' cached_input: "0.40", output: "15.00"}}]\n',
    )
    usage = Usage(input_tokens=3_000, cached_input_tokens=1_000, output_tokens=100, speed="fast")
    tier = catalog.models["acme-opus"].prices[0].long_context
    assert tier is not None and tier.cached_input is not None
    cost = priced(response("acme-opus", usage, provider="acme"), catalog)
    times = Decimal("2.5")
    assert cost.input == usd(2_000, tier.input * times)
    assert cost.cached_input == usd(1_000, tier.cached_input * times)
    assert cost.output == usd(100, tier.output * times)


def test_an_override_keeps_the_fast_multiplier_it_does_not_name(tmp_path: Path) -> None:
    """A negotiated rate is still dearer in fast mode; ``fast_multiplier: null`` says
    the override knows no fast price (a call served fast is then unpriced)."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  claude-opus-5:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-07-24, input: "4.00", output: "20.00"}]\n'
        "  claude-opus-4-8:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-05-01, input: "4.00", output: "20.00",'
        " fast_multiplier: null}]\n",
    )
    shipped = load_catalog().models["claude-opus-5"].prices[0].fast_multiplier
    assert catalog.models["claude-opus-5"].prices[0].fast_multiplier == shipped
    usage = Usage(input_tokens=1_000, output_tokens=1_000, speed="fast")
    assert shipped is not None
    cost = priced(response("claude-opus-5", usage, provider="anthropic"), catalog)
    assert cost.total == usd(1_000, Decimal("4.00") * shipped) + usd(
        1_000, Decimal("20.00") * shipped
    )
    assert price(response("claude-opus-4-8", usage, provider="anthropic"), catalog).unpriced


def test_an_override_prices_1_hour_writes_at_the_shipped_multiple_of_its_input(
    tmp_path: Path,
) -> None:
    """A negotiated Claude price naming input, cache and output rates but not the 1-hour
    writes' was priced, before 12-hour writes made a missing rate unpriced, at its
    5-minute writes' rate: its 1-hour writes are the shipped multiple of its own input
    (Anthropic's: twice it), not a reason to leave every such call unpriced.
    ``cache_write_1h: null`` still says the override knows no such price."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  claude-opus-5:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-07-24, input: "4.00", cache_write: "5.00",'
        ' output: "20.00"}]\n'
        "  claude-opus-4-8:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-05-01, input: "4.00", output: "20.00",'
        " cache_write_1h: null}]\n",
    )
    shipped = load_catalog().models["claude-opus-5"].prices[0]
    assert shipped.cache_write_1h is not None
    multiple = shipped.cache_write_1h / shipped.input
    assert catalog.models["claude-opus-5"].prices[0].cache_write_1h == Decimal("4.00") * multiple
    usage = Usage(
        input_tokens=3_000,
        cache_creation_input_tokens=2_000,
        cache_creation_1h_input_tokens=1_000,
        output_tokens=100,
    )
    cost = priced(response("claude-opus-5", usage, provider="anthropic"), catalog)
    assert cost.cache_write == usd(1_000, Decimal("5.00")) + usd(1_000, Decimal("4.00") * multiple)
    assert price(response("claude-opus-4-8", usage, provider="anthropic"), catalog).unpriced


def test_an_advisor_s_1_hour_writes_on_rates_without_their_price_leave_the_call_unpriced(
    tmp_path: Path,
) -> None:
    """An advisor's (or a compaction's) calls are priced as calls of their own model: a
    1-hour write on rates that give no 1-hour price is no more guessed at the 5-minute
    rate there than on the call itself (before: priced at it, the call priced). The
    operator is told what to add."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  claude-opus-4-8:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-05-01, input: "4.00", cache_write: "5.00",'
        ' output: "20.00", cache_write_1h: null}]\n',
    )
    when = datetime(2026, 11, 30, 12, tzinfo=UTC)
    call = AdvisorUsage(model="claude-opus-4-8", input_tokens=3_000, output_tokens=100,
                        cache_creation_input_tokens=2_000)  # fmt: skip
    usage = Usage(input_tokens=1_000, output_tokens=50, advisor=(call,))
    assert not price(response("claude-sonnet-4-6", usage, ts=when), catalog).unpriced
    hour = call.model_copy(update={"cache_creation_1h_input_tokens": 1_000})
    advised = response("claude-sonnet-4-6", usage.model_copy(update={"advisor": (hour,)}), ts=when)
    costed = price(advised, catalog)
    assert (costed.cost, costed.unpriced) == (None, True)
    assert missing_price(advised, catalog) == (
        "advisor model 'claude-opus-4-8' (consulted by 'claude-sonnet-4-6') writing to the"
        " longer-lived cache (Anthropic's 1-hour) at the rates that served it: give them a"
        " cache_write_1h"
    )


# -- Anthropic's data residency (inference_geo) --------------------------------------------

# "For Claude 4.6 and later models": the catalog's entries of those, and no others.
US_PREMIUM = (
    "claude-opus-4-6", "claude-sonnet-4-6", "claude-opus-4-7", "claude-opus-4-8",
    "claude-sonnet-5", "claude-opus-5", "claude-opus-5-5", "claude-sonnet-5-5",
    "claude-haiku-5-5", "claude-fable-5", "claude-mythos-5", "claude-fable-5-1",
    "claude-mythos-5-1",
)  # fmt: skip


def anthropic_geo(geo: str | None, speed: str | None = None) -> Usage:
    usage = anthropic_usage({**FAST_USAGE, "inference_geo": geo, "speed": speed})
    assert usage is not None
    return usage


def test_every_claude_4_6_or_later_price_and_only_those_bill_us_inference_at_1_1x(
    catalog: Catalog,
) -> None:
    premium = {
        key
        for key, entry in catalog.models.items()
        if entry.provider != "openai"  # its regional endpoints': see OPENAI_REGIONS
        and any(r.geo_multipliers is not None for r in entry.prices)
    }
    assert premium == set(US_PREMIUM)
    for key in US_PREMIUM:
        for rates in catalog.models[key].prices:
            assert rates.geo_multipliers == {"us": Decimal("1.1")}, key


# OpenAI's data-residency endpoints: "a 10% uplift for models released on or after March
# 5, 2026"; us., eu., au., in. and jp.api.openai.com.
OPENAI_REGIONS = ("us", "eu", "au", "in", "jp")
UPLIFTED = (
    "gpt-5.4", "gpt-5.4-mini", "gpt-5.4-nano", "gpt-5.4-pro", "gpt-5.5", "gpt-5.5-pro",
    "gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna", "gpt-6-sol", "gpt-6-luna",
    "gpt-6-astra", "gpt-6.1-sol", "gpt-6.1-terra", "gpt-6.2-sol",
)  # fmt: skip


def test_openai_s_regional_endpoints_cost_10_percent_more_on_models_from_march_2026(
    catalog: Catalog,
) -> None:
    """Each region at 1.1 on the models released on or after 2026-03-05, at 1 (priced,
    at the standard rates) on the earlier ones; every OpenAI entry names all five. A
    call run in one was unpriced (no geo_multipliers) or, carried as "global", priced
    without its uplift."""
    for key, entry in catalog.models.items():
        if entry.provider != "openai":
            continue
        times = Decimal("1.1") if key in UPLIFTED else Decimal(1)
        for rates in entry.prices:
            assert rates.geo_multipliers == dict.fromkeys(OPENAI_REGIONS, times), key
    for model, times in (("gpt-6.2-sol", Decimal("1.1")), ("gpt-5.4", Decimal("1.1")),
                         ("gpt-5.3-codex", Decimal(1)), ("gpt-4o", Decimal(1))):  # fmt: skip
        base = response(model, TIERED, ts=DEC_2026, provider="openai")
        standard = priced(base, catalog)
        for region in OPENAI_REGIONS:
            there = TIERED.model_copy(update={"inference_geo": region})
            cost = priced(response(model, there, ts=DEC_2026, provider="openai"), catalog)
            assert cost.total == (standard.total * times).quantize(NANO), (model, region)
    elsewhere = TIERED.model_copy(update={"inference_geo": "ae"})  # no page names it
    assert price(response("gpt-6.2-sol", elsewhere, ts=DEC_2026, provider="openai"),
                 catalog).unpriced  # fmt: skip


@pytest.mark.parametrize("model", US_PREMIUM)
def test_a_call_run_in_the_us_costs_every_token_at_1_1x(catalog: Catalog, model: str) -> None:
    """ "A 1.1x multiplier on all token pricing categories, including input tokens,
    output tokens, cache writes, and cache reads"; the search fee is per search and
    stays. Run "global", told "not_available" or nothing: the standard rates."""
    us = priced(response(model, anthropic_geo("us"), provider="anthropic"), catalog)
    standard = priced(response(model, anthropic_geo("global"), provider="anthropic"), catalog)
    for told in (None, "not_available"):
        assert priced(response(model, anthropic_geo(told), provider="anthropic"), catalog) == (
            standard
        )
    times = Decimal("1.1")
    for part in ("input", "cached_input", "cache_write", "output"):
        assert getattr(us, part) == getattr(standard, part) * times, part
        assert getattr(us, part) > getattr(standard, part)
    assert us.web_search == standard.web_search == Decimal("0.02")  # $10 per 1,000
    assert us.total == (standard.total - standard.web_search) * times + us.web_search


def test_us_inference_stacks_with_fast_mode(catalog: Catalog) -> None:
    """ "Data residency multipliers apply on top of fast mode pricing": Claude Opus 5 in
    fast mode, run in the US, is $11 / $55 a million in and out (2 x 1.1 x $5 / $25)."""
    both = anthropic_usage(
        {"input_tokens": 1_000_000, "output_tokens": 1_000_000, "speed": "fast",
         "inference_geo": "us"}
    )  # fmt: skip
    assert both is not None
    cost = priced(response("claude-opus-5", both, provider="anthropic"), catalog)
    assert (cost.input, cost.output) == (Decimal("11"), Decimal("55"))
    fast = priced(response("claude-opus-5", anthropic_geo(None, "fast"), provider="anthropic"),
                  catalog)  # fmt: skip
    fast_us = priced(response("claude-opus-5", anthropic_geo("us", "fast"), provider="anthropic"),
                     catalog)  # fmt: skip
    for part in ("input", "cached_input", "cache_write", "output"):
        assert getattr(fast_us, part) == getattr(fast, part) * Decimal("1.1"), part


def test_us_inference_multiplies_the_long_context_rates_too(catalog: Catalog) -> None:
    """Caching's "multipliers stack with other pricing modifiers, including ... long
    context pricing, and data residency": Haiku 5.5 past 100K prompt tokens is priced at
    its long-context rates, times 1.1."""
    usage = Usage(input_tokens=150_000, cached_input_tokens=50_000, output_tokens=1_000,
                  inference_geo="us")  # fmt: skip
    tier = catalog.models["claude-haiku-5-5"].prices[0].long_context
    assert tier is not None and tier.cached_input is not None
    cost = priced(response("claude-haiku-5-5", usage, provider="anthropic"), catalog)
    times = Decimal("1.1")
    assert cost.input == usd(100_000, tier.input * times)
    assert cost.cached_input == usd(50_000, tier.cached_input * times)
    assert cost.output == usd(1_000, tier.output * times)


def test_a_call_run_in_a_geo_its_price_does_not_name_is_unpriced(catalog: Catalog) -> None:
    """Not a standard-rate guess: a geography the catalog gives no multiplier ("eu", or
    "us" on a model from before Claude 4.6, which Anthropic would have refused) leaves
    the cost unknown, and the cost stage's warning names what to add."""
    for model, geo in (("claude-opus-5", "eu"), ("claude-opus-4-5", "us")):
        event = response(model, anthropic_geo(geo), provider="anthropic")
        costed = price(event, catalog)
        assert (costed.cost, costed.unpriced, costed.pricing_model) == (None, True, "")
        assert missing_price(event, catalog) == (
            f"model {model!r} run in inference geo {geo!r}: give its entry geo_multipliers"
            f" for {geo!r}"
        )
    assert not price(response("claude-opus-4-5", anthropic_geo(None)), catalog).unpriced


def test_an_override_keeps_the_geo_multipliers_it_does_not_name(tmp_path: Path) -> None:
    """A negotiated rate is still dearer run in the US; ``geo_multipliers: null`` says
    the override knows no such price (a call run there is then unpriced)."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  claude-opus-5:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-07-24, input: "4.00", output: "20.00"}]\n'
        "  claude-opus-4-8:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-05-01, input: "4.00", output: "20.00",'
        " geo_multipliers: null}]\n"
        "  claude-sonnet-5:\n"
        "    provider: anthropic\n"
        '    prices: [{effective_from: 2026-06-30, input: "2.00", output: "10.00",'
        ' geo_multipliers: {us: "1.2", eu: "1.05"}}]\n',
    )
    assert catalog.models["claude-opus-5"].prices[0].geo_multipliers == {"us": Decimal("1.1")}
    usage = Usage(input_tokens=1_000, output_tokens=1_000, inference_geo="us")
    cost = priced(response("claude-opus-5", usage, provider="anthropic"), catalog)
    assert cost.total == usd(1_000, Decimal("4.40")) + usd(1_000, Decimal("22.00"))
    assert price(response("claude-opus-4-8", usage, provider="anthropic"), catalog).unpriced
    eu = usage.model_copy(update={"inference_geo": "eu"})
    cost = priced(response("claude-sonnet-5", eu, provider="anthropic"), catalog)
    assert cost.total == usd(1_000, Decimal("2.10")) + usd(1_000, Decimal("10.50"))


# -- OpenAI's service tiers ----------------------------------------------------------------

# openai.com/api-priority-processing and the pricing page's Flex table: (input, cached
# input, output) USD a million, per model; flex is "priced at Batch API rates".
PRIORITY = {
    "gpt-5.5": ("12.50", "1.25", "75.00"),  # 2.5 times its standard rates
    "gpt-5.4": ("5.00", "0.50", "30.00"),
    "gpt-5.4-mini": ("1.50", "0.15", "9.00"),
    "gpt-5.2": ("3.50", "0.35", "28.00"),
    "gpt-5.1": ("2.50", "0.25", "20.00"),
    "gpt-5": ("2.50", "0.25", "20.00"),
    "gpt-5-mini": ("0.45", "0.045", "3.60"),
    "gpt-5.3-codex": ("3.50", "0.35", "28.00"),
    "gpt-5.1-codex": ("2.50", "0.25", "20.00"),
    "gpt-5-codex": ("2.50", "0.25", "20.00"),
    "gpt-4.1": ("3.50", "0.875", "14.00"),
    "gpt-4.1-mini": ("0.70", "0.175", "2.80"),
    "gpt-4.1-nano": ("0.20", "0.05", "0.80"),
    "gpt-4o": ("4.25", "2.125", "17.00"),
    "gpt-4o-2024-05-13": ("8.75", "8.75", "26.25"),  # no cache discount
    "gpt-4o-mini": ("0.25", "0.125", "1.00"),
    "o3": ("3.50", "0.875", "14.00"),
    "o4-mini": ("2.00", "0.50", "8.00"),
}
FLEX = {
    "gpt-5.5": ("2.50", "0.25", "15.00"),
    "gpt-5.1": ("0.625", "0.0625", "5.00"),
    "gpt-5": ("0.625", "0.0625", "5.00"),
    "gpt-5-mini": ("0.125", "0.0125", "1.00"),
    "gpt-5-nano": ("0.025", "0.0025", "0.20"),
    "o3": ("1.00", "0.25", "4.00"),
    "o4-mini": ("0.55", "0.138", "2.20"),
}
# (input, cached input, output) USD a million at the standard tier, from stream/pricing.yaml
# (its comments name the sources). A pro model has no cached-input rate: cache reads are
# billed as input.
STANDARD = {
    "gpt-5.5": ("5.00", "0.50", "30.00"),
    "gpt-5.5-pro": ("30.00", "30.00", "180.00"),
    "gpt-5.4-pro": ("30.00", "30.00", "180.00"),
    "gpt-5.2-pro": ("21.00", "21.00", "168.00"),
    "gpt-5-codex": ("1.25", "0.125", "10.00"),
    "gpt-5.1-codex": ("1.25", "0.125", "10.00"),
    "gpt-5.1-codex-mini": ("0.25", "0.025", "2.00"),
    "gpt-5.1-codex-max": ("1.25", "0.125", "10.00"),
    "gpt-5.2-codex": ("1.75", "0.175", "14.00"),
    "gpt-5.3-codex": ("1.75", "0.175", "14.00"),
}
# 20,000 prompt tokens (8,000 of them cache reads), 1,500 output (1,000 reasoning).
TIERED = Usage(input_tokens=20_000, cached_input_tokens=8_000, output_tokens=1_500,
               reasoning_tokens=1_000)  # fmt: skip


def openai_call(model: str, tier: str, usage: Usage = TIERED) -> ResponseEvent:
    return response(model, usage.model_copy(update={"service_tier": tier}), provider="openai")


@pytest.mark.parametrize(
    ("tier", "table"), [("priority", PRIORITY), ("flex", FLEX), ("standard", STANDARD)]
)
def test_a_call_a_service_tier_served_costs_that_tier_s_rates(
    catalog: Catalog, tier: str, table: dict[str, tuple[str, str, str]]
) -> None:
    """Each token at the tier's own rate for the model (priority is no one multiple of
    the standard rates); the parts of the cost are the same as at standard. Each model
    is priced as itself: GPT-5.5, the pro and the codex models were unpriced (cost
    unknown, a hard cap holding their worst case)."""
    for model, (fresh, cached, out) in table.items():
        costed = price(openai_call(model, tier), catalog)
        assert costed.pricing_model == model
        cost = priced(openai_call(model, tier), catalog)
        assert cost.input == usd(12_000, Decimal(fresh)), model
        assert cost.cached_input == usd(8_000, Decimal(cached)), model
        assert cost.output == usd(1_500, Decimal(out)), model  # reasoning included, once
        assert cost.reasoning == 0, model
        assert cost.total == cost.input + cost.cached_input + cost.output, model


def test_gpt_4_1_at_priority_costs_what_openai_bills_not_the_standard_rates(
    catalog: Catalog,
) -> None:
    """$3.50 / $0.875 / $14 a million against $2 / $0.50 / $8: 1.75 times, here; GPT-5's
    priority is 2 times, GPT-4o's 1.7 (so no multiplier could stand for them)."""
    standard = priced(openai_call("gpt-4.1-2025-04-14", "standard"), catalog)
    priority = priced(openai_call("gpt-4.1-2025-04-14", "priority"), catalog)
    assert standard.total == Decimal("0.024") + Decimal("0.004") + Decimal("0.012")
    assert priority.total == Decimal("0.042") + Decimal("0.007") + Decimal("0.021")
    flex = priced(openai_call("gpt-5", "flex"), catalog)
    assert flex.total * 2 == priced(openai_call("gpt-5", "standard"), catalog).total


def test_a_call_served_at_a_tier_its_model_has_no_price_for_is_unpriced(
    catalog: Catalog,
) -> None:
    """Not a standard-rate guess: gpt-4.1 has no flex price, gpt-5-nano no priority price
    (and gpt-5-chat neither, though it shares gpt-5's standard rates)."""
    for model, tier in (
        ("gpt-4.1", "flex"),
        ("gpt-5-nano", "priority"),
        ("gpt-5-chat", "flex"),
        ("gpt-5.5-pro", "flex"),  # LiteLLM lists a flex rate no OpenAI page confirms
        ("gpt-5.2-codex", "priority"),  # likewise a priority rate
        ("gpt-5.1-codex-mini", "priority"),
    ):
        costed = price(openai_call(model, tier), catalog)
        assert (costed.cost, costed.unpriced, costed.pricing_model) == (None, True, ""), model
        assert missing_price(openai_call(model, tier), catalog) == (
            f"model {model!r} at the {tier} service tier: give its entry a {tier} price"
        )
        assert not price(openai_call(model, "standard"), catalog).unpriced


def test_no_tier_price_covers_a_prompt_past_the_long_context_threshold(
    catalog: Catalog,
) -> None:
    """GPT-5.4's priority price "excludes long context": past its 272K threshold (where
    its standard rates double) no priority rate is published, so such a call is unpriced;
    below it, the priority rates."""
    long = Usage(input_tokens=300_000, output_tokens=1_000)
    assert price(openai_call("gpt-5.4", "priority", long), catalog).unpriced
    assert "long-context" in missing_price(openai_call("gpt-5.4", "priority", long), catalog)
    standard = priced(openai_call("gpt-5.4", "standard", long), catalog)
    assert standard.input == usd(300_000, Decimal("5.00"))  # the long-context tier
    short = Usage(input_tokens=100_000, output_tokens=1_000)
    assert priced(openai_call("gpt-5.4", "priority", short), catalog).input == usd(
        100_000, Decimal("5.00")
    )


def test_an_override_keeps_the_tier_rates_it_does_not_name(tmp_path: Path) -> None:
    """A negotiated standard rate leaves the tiers' list prices in force on its date; a
    price naming a tier's rates gives its own; null drops them (unpriced)."""
    catalog = with_operator_file(
        tmp_path,
        "models:\n"
        "  gpt-5:\n"
        "    provider: openai\n"
        '    prices: [{effective_from: 2025-08-07, input: "1.00", output: "8.00"}]\n'
        "  gpt-4.1:\n"
        "    provider: openai\n"
        '    prices: [{effective_from: 2025-04-14, input: "1.50", output: "6.00",'
        ' priority: {input: "3.00", output: "12.00"}, flex: {input: "0.75", output: "3.00"}}]\n'
        "  o3:\n"
        "    provider: openai\n"
        '    prices: [{effective_from: 2025-06-10, input: "2.00", output: "8.00",'
        " priority: null}]\n",
    )
    usage = Usage(input_tokens=1_000, output_tokens=100)
    assert priced(openai_call("gpt-5", "priority", usage), catalog).total == usd(
        1_000, Decimal("2.50")
    ) + usd(100, Decimal("20.00"))
    assert priced(openai_call("gpt-5", "flex", usage), catalog).input == usd(
        1_000, Decimal("0.625")
    )
    assert priced(openai_call("gpt-5", "standard", usage), catalog).input == usd(
        1_000, Decimal("1.00")
    )
    assert priced(openai_call("gpt-4.1", "priority", usage), catalog).input == usd(
        1_000, Decimal("3.00")
    )
    assert priced(openai_call("gpt-4.1", "flex", usage), catalog).output == usd(
        100, Decimal("3.00")
    )
    assert price(openai_call("o3", "priority", usage), catalog).unpriced
    assert not price(openai_call("o3", "flex", usage), catalog).unpriced


# -- OpenAI's GPT-5.5, pro and codex models -------------------------------------------------


def test_gpt_5_5_costs_by_hand(catalog: Catalog) -> None:
    """20,000 prompt tokens (8,000 cache reads), 1,500 output, 2 web searches."""
    usage = TIERED.model_copy(update={"web_search_requests": 2})
    cost, family = costed_at(catalog, "gpt-5.5-2026-04-23", usage, "openai")
    assert family == "gpt-5.5"
    assert cost.input == Decimal("0.06")  # 12,000 x 5.00
    assert cost.cached_input == Decimal("0.004")  # 8,000 x 0.50
    assert cost.output == Decimal("0.045")  # 1,500 x 30.00
    assert cost.web_search == Decimal("0.02")  # 2 x 10.00 / 1,000
    assert cost.total == Decimal("0.129")
    # the same call at gpt-5's rates costs far less
    gpt_5 = priced(openai_call("gpt-5", "standard"), catalog)
    assert gpt_5.total == Decimal("0.031")  # 12,000 x 1.25 + 8,000 x 0.125 + 1,500 x 10.00


def test_gpt_5_5_past_272k_prompt_tokens_prices_the_whole_call_higher(catalog: Catalog) -> None:
    """Past 272,000 prompt tokens every token of the call is at $10 / $1 / $45 a million
    (not only those past the threshold); at 272,000 exactly, the standard rates."""
    long = Usage(input_tokens=300_000, cached_input_tokens=100_000, output_tokens=2_000)
    cost, _ = costed_at(catalog, "gpt-5.5", long, "openai")
    assert cost.input == Decimal("2.00")  # 200,000 x 10.00
    assert cost.cached_input == Decimal("0.10")  # 100,000 x 1.00
    assert cost.output == Decimal("0.09")  # 2,000 x 45.00
    assert cost.total == Decimal("2.19")  # at the standard rates it would be 1.11
    edge = Usage(input_tokens=272_000, output_tokens=2_000)
    cost, _ = costed_at(catalog, "gpt-5.5", edge, "openai")
    assert cost.total == Decimal("1.36") + Decimal("0.06")  # 272,000 x 5.00 + 2,000 x 30.00
    # no tier price covers a long prompt: a priority or flex call past it is unpriced
    for tier in ("priority", "flex"):
        assert price(openai_call("gpt-5.5", tier, long), catalog).unpriced, tier
        assert "long-context" in missing_price(openai_call("gpt-5.5", tier, long), catalog)


def test_gpt_5_5_served_at_priority_costs_openai_s_priority_rates(catalog: Catalog) -> None:
    """$12.50 / $1.25 / $75 a million (openai.com/api-priority-processing), not twice the
    standard rates; served at the default tier, the standard rates."""
    cost = priced(openai_call("gpt-5.5-2026-04-23", "priority"), catalog)
    assert cost.input == Decimal("0.15")  # 12,000 x 12.50
    assert cost.cached_input == Decimal("0.01")  # 8,000 x 1.25
    assert cost.output == Decimal("0.1125")  # 1,500 x 75.00
    assert cost.total == Decimal("0.2725")
    standard = priced(openai_call("gpt-5.5-2026-04-23", "standard"), catalog)
    assert standard.total == Decimal("0.109")  # 0.06 + 0.004 + 0.045
    flex = priced(openai_call("gpt-5.5", "flex"), catalog)
    assert flex.total * 2 == standard.total  # flex: half


def test_a_pro_model_gives_no_cache_discount(catalog: Catalog) -> None:
    """OpenAI prices no cached input for its pro models: a cache read costs as much as a
    fresh prompt token, and a long prompt doubles the input rate (1.5 times the output's)."""
    usage = Usage(input_tokens=100_000, cached_input_tokens=90_000, output_tokens=1_000)
    cost, family = costed_at(catalog, "gpt-5.5-pro-2026-04-23", usage, "openai")
    assert family == "gpt-5.5-pro"
    assert cost.input == Decimal("0.30")  # 10,000 x 30.00
    assert cost.cached_input == Decimal("2.70")  # 90,000 x 30.00, no discount
    assert cost.output == Decimal("0.18")  # 1,000 x 180.00
    assert cost.total == Decimal("3.18")
    uncached = Usage(input_tokens=100_000, output_tokens=1_000)
    assert costed_at(catalog, "gpt-5.5-pro", uncached, "openai")[0].total == cost.total
    for model in ("gpt-5.5-pro", "gpt-5.4-pro", "gpt-5.2-pro"):
        rates = catalog.models[model].prices[0]
        assert rates.cached_input is None, model
    long = Usage(input_tokens=300_000, cached_input_tokens=100_000, output_tokens=1_000)
    cost, _ = costed_at(catalog, "gpt-5.4-pro-2026-03-05", long, "openai")
    assert cost.input + cost.cached_input == Decimal("18.00")  # 300,000 x 60.00
    assert cost.output == Decimal("0.27")  # 1,000 x 270.00


def test_new_openai_entries_start_at_their_launch(catalog: Catalog) -> None:
    """A call before a model's first price is unpriced; from that day on, priced. The
    limits bound a hard cap's worst case."""
    usage = Usage(input_tokens=1_000, output_tokens=1_000)
    for model, launch in (
        ("gpt-5.5", datetime(2026, 4, 23, tzinfo=UTC)),
        ("gpt-5.4-pro", datetime(2026, 3, 5, tzinfo=UTC)),
        ("gpt-5-codex", datetime(2025, 9, 15, tzinfo=UTC)),
        ("gpt-5.3-codex", datetime(2026, 2, 5, tzinfo=UTC)),
    ):
        before = response(model, usage, ts=launch - timedelta(seconds=1), provider="openai")
        assert price(before, catalog).unpriced, model
        assert not price(response(model, usage, ts=launch, provider="openai"), catalog).unpriced
    limits = {m: (e.context_window, e.max_output_tokens) for m, e in catalog.models.items()}
    assert limits["gpt-5.5"] == (1_050_000, 272_000)
    assert limits["gpt-5.5-pro"] == (1_050_000, 128_000)
    assert limits["gpt-5.3-codex"] == (400_000, 128_000)


# Input, cached input, cache write, output; past 272K prompt tokens x2, x2, x2 and x1.5.
# At launch, and since the cuts (Luna and Terra 2026-07-30, Sol's promotion 2026-08-21).
GPT_5_6 = {
    "gpt-5.6-sol": ("5.00", "0.50", "6.25", "30.00"),
    "gpt-5.6-terra": ("2.50", "0.25", "3.125", "15.00"),
    "gpt-5.6-luna": ("1.00", "0.10", "1.25", "6.00"),
}
GPT_5_6_CUT = {
    "gpt-5.6-sol": ("4.00", "0.40", "5.00", "20.00"),
    "gpt-5.6-terra": ("2.00", "0.20", "2.50", "12.00"),
    "gpt-5.6-luna": ("0.20", "0.02", "0.25", "1.20"),
}
AT_GPT_5_6_LAUNCH = datetime(2026, 7, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("model", "ts", "table"),
    [(m, AT_GPT_5_6_LAUNCH, GPT_5_6) for m in GPT_5_6]
    + [(m, LATE_2026, GPT_5_6_CUT) for m in GPT_5_6_CUT],
)
def test_gpt_5_6_bills_cache_writes_at_a_quarter_above_input(
    catalog: Catalog, model: str, ts: datetime, table: dict[str, tuple[str, ...]]
) -> None:
    """From GPT-5.6 on OpenAI bills the prompt tokens written to its cache (usage's
    cache_write_tokens, kept as cache_creation_input_tokens) at 1.25x the input rate;
    past 272K prompt tokens every rate of the call is the long-context one."""
    fresh, cached, write, out = (Decimal(r) for r in table[model])
    usage = Usage(input_tokens=20_000, cached_input_tokens=8_000,
                  cache_creation_input_tokens=5_000, output_tokens=1_500)  # fmt: skip
    cost = priced(response(model, usage, ts=ts, provider="openai"), catalog)
    assert write == fresh * Decimal("1.25")
    assert cost.input == usd(7_000, fresh)
    assert cost.cached_input == usd(8_000, cached)
    assert cost.cache_write == usd(5_000, write)
    assert cost.output == usd(1_500, out)
    long = usage.model_copy(update={"input_tokens": 300_000})
    cost = priced(response(model, long, ts=ts, provider="openai"), catalog)
    assert cost.input == usd(287_000, 2 * fresh)
    assert cost.cache_write == usd(5_000, 2 * write)
    assert cost.output == usd(1_500, out * Decimal("1.5"))


def test_gpt_5_6_priority_is_fast_mode_s_rates(catalog: Catalog) -> None:
    """Priority processing, renamed Fast mode on 2026-07-30, lists Terra and Luna at twice
    their cut rates (openai.com/api-fast-mode); its cache writes at 1.25x its input rate,
    as the model pages bill every cache write (they were billed at the input rate); Sol's
    listed rate predates its promotion, and no tier had rates at launch: a call either
    served then is unpriced."""
    usage = TIERED.model_copy(
        update={"service_tier": "priority", "cache_creation_input_tokens": 5_000}
    )
    for model, (fresh, cached, out) in {
        "gpt-5.6-terra": ("4.00", "0.40", "24.00"),
        "gpt-5.6-luna": ("0.40", "0.04", "2.40"),
    }.items():
        cost = priced(response(model, usage, ts=LATE_2026, provider="openai"), catalog)
        assert cost.input == usd(7_000, Decimal(fresh)), model
        assert cost.cached_input == usd(8_000, Decimal(cached)), model
        assert cost.cache_write == usd(5_000, Decimal(fresh) * Decimal("1.25")), model
        assert cost.output == usd(1_500, Decimal(out)), model
        early = response(model, usage, ts=AT_GPT_5_6_LAUNCH, provider="openai")
        assert price(early, catalog).unpriced, model
    sol = response("gpt-5.6-sol", usage, ts=LATE_2026, provider="openai")
    assert price(sol, catalog).unpriced


def test_a_cache_write_on_a_model_before_gpt_5_6_costs_the_input_rate(catalog: Catalog) -> None:
    usage = Usage(input_tokens=20_000, cache_creation_input_tokens=5_000, output_tokens=10)
    cost = priced(response("gpt-5.5", usage, provider="openai"), catalog)
    assert cost.input + cost.cache_write == usd(20_000, Decimal("5.00"))


# -- OpenAI's GPT-6, Claude Fable and Mythos, Gemini 3 Flash ---------------------------------

# Input, cached input, cache write, output (USD a million) at the standard tier; past 272K
# prompt tokens x2, x2, x2 and x1.5; flex half, Fast (priority) twice (the model pages).
GPT_6 = {
    "gpt-6-astra": ("10.00", "1.00", "12.50", "50.00"),
    "gpt-6-sol": ("2.00", "0.20", "2.50", "10.00"),
    "gpt-6-luna": ("0.10", "0.01", "0.125", "0.50"),
    "gpt-6.1-sol": ("2.00", "0.10", "2.50", "10.00"),
    "gpt-6.1-terra": ("1.00", "0.05", "1.25", "5.00"),
    "gpt-6.2-sol": ("2.00", "0.10", "2.50", "10.00"),
}
DEC_2026 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
# 20,000 prompt tokens (8,000 cache reads, 5,000 cache writes), 1,500 output.
GPT_6_USAGE = Usage(input_tokens=20_000, cached_input_tokens=8_000,
                    cache_creation_input_tokens=5_000, output_tokens=1_500)  # fmt: skip


@pytest.mark.parametrize("model", GPT_6)
def test_gpt_6_costs_its_model_page_s_rates_at_every_tier(catalog: Catalog, model: str) -> None:
    """Each model priced as itself (they were unpriced: refused under a hard cap); past
    272K prompt tokens every rate is the long-context one; Fast twice, Flex half."""
    fresh, cached, write, out = (Decimal(r) for r in GPT_6[model])
    assert write == fresh * Decimal("1.25")
    costed = price(response(model, GPT_6_USAGE, ts=DEC_2026, provider="openai"), catalog)
    assert costed.pricing_model == model
    cost = priced(response(model, GPT_6_USAGE, ts=DEC_2026, provider="openai"), catalog)
    assert cost.input == usd(7_000, fresh)
    assert cost.cached_input == usd(8_000, cached)
    assert cost.cache_write == usd(5_000, write)
    assert cost.output == usd(1_500, out)
    long = GPT_6_USAGE.model_copy(update={"input_tokens": 300_000})
    cost = priced(response(model, long, ts=DEC_2026, provider="openai"), catalog)
    assert cost.input == usd(287_000, 2 * fresh)
    assert cost.cached_input == usd(8_000, 2 * cached)
    assert cost.cache_write == usd(5_000, 2 * write)
    assert cost.output == usd(1_500, out * Decimal("1.5"))
    standard = priced(response(model, GPT_6_USAGE, ts=DEC_2026, provider="openai"), catalog)
    fast = GPT_6_USAGE.model_copy(update={"service_tier": "priority"})
    assert priced(response(model, fast, ts=DEC_2026, provider="openai"), catalog).total == (
        2 * standard.total
    )
    flex = response(model, GPT_6_USAGE.model_copy(update={"service_tier": "flex"}),
                    ts=DEC_2026, provider="openai")  # fmt: skip
    if model == "gpt-6.2-sol":  # its page names no Flex price
        assert price(flex, catalog).unpriced
    else:
        assert priced(flex, catalog).total * 2 == standard.total


def test_gpt_6_2_sol_at_ultrafast_costs_3_then_6_times_the_standard_rates(
    catalog: Catalog,
) -> None:
    """Its model page: "Ultrafast costs 3 times the Standard rate through February 28,
    2027, and 6 times the Standard rate starting Mar[ch]": every token rate, cache reads
    and writes too. It was priced at the standard rates. Past 272K no Ultrafast price is
    given: unpriced, as Fast is."""
    ultrafast = GPT_6_USAGE.model_copy(update={"service_tier": "ultrafast"})
    for ts, times in ((DEC_2026, 3), (datetime(2027, 2, 28, 23, tzinfo=UTC), 3),
                      (datetime(2027, 3, 1, tzinfo=UTC), 6)):  # fmt: skip
        standard = priced(response("gpt-6.2-sol", GPT_6_USAGE, ts=ts, provider="openai"), catalog)
        cost = priced(response("gpt-6.2-sol", ultrafast, ts=ts, provider="openai"), catalog)
        assert cost.input == usd(7_000, Decimal("2.00") * times), ts
        assert cost.cached_input == usd(8_000, Decimal("0.10") * times), ts
        assert cost.cache_write == usd(5_000, Decimal("2.50") * times), ts
        assert cost.output == usd(1_500, Decimal("10.00") * times), ts
        assert cost.total == standard.total * times, ts
    long = ultrafast.model_copy(update={"input_tokens": 300_000})
    event = response("gpt-6.2-sol", long, ts=DEC_2026, provider="openai")
    assert price(event, catalog).unpriced
    assert "long-context" in missing_price(event, catalog)
    # A model whose Ultrafast price no OpenAI page in the store gives: unpriced.
    astra = response("gpt-6-astra", ultrafast, ts=DEC_2026, provider="openai")
    assert price(astra, catalog).unpriced
    assert missing_price(astra, catalog) == (
        "model 'gpt-6-astra' at the ultrafast service tier: give its entry a ultrafast price"
    )


def test_12_hour_cache_writes_cost_their_own_rate_or_leave_the_call_unpriced(
    catalog: Catalog,
) -> None:
    """GPT-6.2 Sol: "A 12-hour cache write costs $5 per million tokens for short-context
    requests at Standard pricing" (the 30-minute one $2.50, which they were priced at).
    Where no 12-hour rate is given (GPT-6 Sol; GPT-6.2 Sol past 272K or at Fast) such a
    call is unpriced and what is missing says so, as for a tier with no price."""
    twelve = GPT_6_USAGE.model_copy(update={"cache_creation_1h_input_tokens": 2_000})
    cost = priced(response("gpt-6.2-sol", twelve, ts=DEC_2026, provider="openai"), catalog)
    assert cost.cache_write == usd(3_000, Decimal("2.50")) + usd(2_000, Decimal("5.00"))
    # GPT-6.1 Terra: "$1.25 per million tokens for 30-minute retention and $2.50 for
    # 12-hour retention, before long-context adjustments" (past 272K, cache rates x2).
    cost = priced(response("gpt-6.1-terra", twelve, ts=DEC_2026, provider="openai"), catalog)
    assert cost.cache_write == usd(3_000, Decimal("1.25")) + usd(2_000, Decimal("2.50"))
    long = twelve.model_copy(update={"input_tokens": 300_000})
    cost = priced(response("gpt-6.1-terra", long, ts=DEC_2026, provider="openai"), catalog)
    assert cost.cache_write == usd(3_000, Decimal("2.50")) + usd(2_000, Decimal("5.00"))
    unpriced = (
        response("gpt-6-sol", twelve, ts=DEC_2026, provider="openai"),
        response("gpt-6.2-sol", twelve.model_copy(update={"input_tokens": 300_000}),
                 ts=DEC_2026, provider="openai"),
        response("gpt-6.2-sol", twelve.model_copy(update={"service_tier": "priority"}),
                 ts=DEC_2026, provider="openai"),
        response("gpt-6.1-terra", twelve.model_copy(update={"service_tier": "priority"}),
                 ts=DEC_2026, provider="openai"),
    )  # fmt: skip
    for event in unpriced:
        costed = price(event, catalog)
        assert (costed.cost, costed.unpriced) == (None, True), event.model
        assert "cache_write_1h" in missing_price(event, catalog), event.model
    assert not price(response("gpt-6-sol", GPT_6_USAGE, ts=DEC_2026, provider="openai"),
                     catalog).unpriced  # fmt: skip


def test_a_tier_llmtap_does_not_know_is_unpriced_not_standard(catalog: Catalog) -> None:
    """An answer naming a tier llmtap has no field for ("turbo-x") was priced at the
    standard rates: its cost is unknown, and what is missing names the tier. The cost
    stage's wire struct carries it as named."""
    usage = GPT_6_USAGE.model_copy(update={"service_tier": "turbo-x"})
    event = response("gpt-6.2-sol", usage, ts=DEC_2026, provider="openai")
    costed = price(event, catalog)
    assert (costed.cost, costed.unpriced) == (None, True)
    assert "'turbo-x' service tier" in missing_price(event, catalog)
    carried = msgspec.json.decode(b'{"service_tier": "turbo-x"}', type=wire.Usage)
    assert carried.service_tier == "turbo-x"
    assert not priced_as_served(carried, catalog.models["gpt-6.2-sol"].prices[0])
    # A name that no field of a price is, though the rates have such an attribute.
    for tier in ("input", "long_context", "unknown"):
        tiered = response("gpt-6.2-sol", usage.model_copy(update={"service_tier": tier}),
                          ts=DEC_2026, provider="openai")  # fmt: skip
        assert price(tiered, catalog).unpriced, tier


def test_gpt_6_by_hand(catalog: Catalog) -> None:
    """OpenAI's GPT-6 Sol and Luna prices of 2026-09-22; unpriced before that day."""
    sol, family = costed_at(catalog, "gpt-6-sol-2026-09-22", GPT_6_USAGE, "openai", ts=DEC_2026)
    assert family == "gpt-6-sol"
    # 7,000 x 2.00 + 8,000 x 0.20 + 5,000 x 2.50 + 1,500 x 10.00
    assert sol.total == Decimal("0.014") + Decimal("0.0016") + Decimal("0.0125") + Decimal("0.015")
    luna, _ = costed_at(catalog, "gpt-6-luna", GPT_6_USAGE, "openai", ts=DEC_2026)
    # 7,000 x 0.10 + 8,000 x 0.01 + 5,000 x 0.125 + 1,500 x 0.50
    assert luna.total == Decimal("0.0007") + Decimal("0.00008") + Decimal("0.000625") + Decimal(
        "0.00075"
    )
    for model, launch in (
        ("gpt-6-sol", datetime(2026, 9, 22, tzinfo=UTC)),
        ("gpt-6-luna", datetime(2026, 9, 22, tzinfo=UTC)),
        ("gpt-6-astra", datetime(2026, 9, 3, tzinfo=UTC)),
        ("gpt-6.1-sol", datetime(2026, 9, 29, tzinfo=UTC)),
        ("gpt-6.1-terra", datetime(2026, 10, 26, tzinfo=UTC)),
        ("gpt-6.2-sol", datetime(2026, 11, 17, tzinfo=UTC)),
    ):
        before = response(model, GPT_6_USAGE, ts=launch - timedelta(seconds=1), provider="openai")
        assert price(before, catalog).unpriced, model
        assert not price(
            response(model, GPT_6_USAGE, ts=launch, provider="openai"), catalog
        ).unpriced
        entry = catalog.models[model]
        assert (entry.context_window, entry.max_output_tokens) == (1_050_000, 128_000), model


def test_a_gpt_6_1_sol_snapshot_is_priced_as_6_1_not_as_gpt_6_sol(catalog: Catalog) -> None:
    """gpt-6.1-sol-2026-09-29 resolves to its own entry: cache reads at $0.10, not 6 Sol's
    $0.20."""
    usage = Usage(input_tokens=100_000, cached_input_tokens=100_000)
    cost, family = costed_at(catalog, "gpt-6.1-sol-2026-09-29", usage, "openai", ts=DEC_2026)
    assert family == "gpt-6.1-sol"
    assert cost.total == Decimal("0.01")  # 100,000 x 0.10
    assert costed_at(catalog, "gpt-6-sol", usage, "openai", ts=DEC_2026)[0].total == Decimal("0.02")


@pytest.mark.parametrize(
    ("model", "hit"),
    [("claude-fable-5", "1.00"), ("claude-mythos-5", "1.00"),
     ("claude-fable-5-1", "0.25"), ("claude-mythos-5-1", "0.25")],
)  # fmt: skip
def test_claude_fable_and_mythos_cost_the_pricing_page_s_rates(
    catalog: Catalog, model: str, hit: str
) -> None:
    usage = Usage(input_tokens=10_000, cached_input_tokens=4_000, cache_creation_input_tokens=3_000,
                  cache_creation_1h_input_tokens=1_000, output_tokens=1_000)  # fmt: skip
    cost, family = costed_at(catalog, f"{model}-20260901", usage, "anthropic", ts=DEC_2026)
    assert family == model
    assert cost.input == usd(3_000, Decimal("10.00"))
    assert cost.cached_input == usd(4_000, Decimal(hit))
    assert cost.cache_write == usd(2_000, Decimal("12.50")) + usd(1_000, Decimal("20.00"))
    assert cost.output == usd(1_000, Decimal("50.00"))
    early = response(model, usage, ts=datetime(2026, 6, 8, tzinfo=UTC), provider="anthropic")
    assert price(early, catalog).unpriced


def test_gemini_3_flash(catalog: Catalog) -> None:
    usage = Usage(input_tokens=100_000, cached_input_tokens=40_000, output_tokens=2_000)
    cost, family = costed_at(catalog, "models/gemini-3-flash-preview", usage, "gemini")
    assert family == "gemini-3-flash-preview"
    assert cost.total == Decimal("0.03") + Decimal("0.002") + Decimal("0.006")  # 0.50/0.05/3.00


# -- malformed counts and tier fallbacks (mutation-testing gaps) -------------------------


def test_cache_reads_and_writes_never_exceed_the_prompt() -> None:
    # a malformed Usage (more cache reads, or reads and writes, than prompt tokens) cannot
    # charge a token twice, nor make a part of the cost negative
    rates = Rates(
        effective_from=date(2024, 1, 1),
        input=Decimal("1.00"),
        output=Decimal("0"),
        cached_input=Decimal("0.50"),
        cache_write=Decimal("2.00"),
    )
    reads = cost_of(Usage(input_tokens=1_000, cached_input_tokens=1_500), rates)
    assert reads.input == 0
    assert reads.cached_input == Decimal("0.0005")  # 1,000 x 0.50: every prompt token, once
    assert reads.total == Decimal("0.0005")
    both = Usage(input_tokens=1_000, cached_input_tokens=600, cache_creation_input_tokens=600)
    cost = cost_of(both, rates)
    assert cost.input == 0
    assert cost.cached_input == Decimal("0.0003")  # 600 x 0.50
    assert cost.cache_write == Decimal("0.0008")  # the 400 left, x 2.00
    assert cost.total == Decimal("0.0011")


def test_reasoning_tokens_never_exceed_the_output() -> None:
    # a malformed Usage (more reasoning than output tokens): no negative output cost
    rates = Rates(
        effective_from=date(2024, 1, 1),
        input=Decimal("1.00"),
        output=Decimal("4.00"),
        reasoning=Decimal("20.00"),
    )
    cost = cost_of(Usage(input_tokens=0, output_tokens=100, reasoning_tokens=300), rates)
    assert cost.output == 0
    assert cost.reasoning == Decimal("0.002")  # the 100 output tokens, at 20.00
    assert cost.total == Decimal("0.002")


def test_a_long_context_tier_without_a_reasoning_rate_bills_reasoning_at_its_output_rate() -> None:
    # omitted rates fall back within the long-context tier: its reasoning to its output,
    # not to nothing because the base tier prices reasoning apart
    rates = Rates(
        effective_from=date(2024, 1, 1),
        input=Decimal("1.00"),
        output=Decimal("4.00"),
        reasoning=Decimal("20.00"),
        long_context={"above_input_tokens": 1_000, "input": "2.00", "output": "8.00"},
    )
    usage = Usage(input_tokens=2_000, output_tokens=500, reasoning_tokens=300)
    cost = cost_of(usage, rates)
    assert cost.input == Decimal("0.004")  # 2,000 x 2.00
    assert cost.output == Decimal("0.004")  # all 500 at the tier's 8.00, reasoning included
    assert cost.reasoning == 0
    assert cost.total == Decimal("0.008")


def test_a_model_prefixed_with_a_provider_the_catalog_does_not_know_is_priced() -> None:
    # the call's own provider (a name under `providers:`) is stripped like a known one
    rates = Rates(effective_from=date(2024, 1, 1), input=Decimal("1.00"), output=Decimal("2.00"))
    cat = Catalog(models={"gpt-4o": ModelPrice(provider="openai", prices=[rates])})
    found = cat.lookup("my-gateway/gpt-4o", "my-gateway")
    assert found is not None
    assert found[0] == "gpt-4o"


def test_a_scoped_price_found_for_one_provider_is_not_reused_for_another() -> None:
    # lookups are remembered per (model, provider): the same name served by two providers
    # at two prices must not be priced at whichever was looked up first
    def at(usd: str) -> ModelPrice:
        day = date(2024, 1, 1)
        return ModelPrice(
            provider="x", prices=[Rates(effective_from=day, input=Decimal(usd), output=Decimal(0))]
        )

    cat = Catalog(models={"groq/llama-x": at("1.00"), "together/llama-x": at("3.00")})
    groq = cat.lookup("llama-x", "groq")
    together = cat.lookup("llama-x", "together")
    assert groq is not None and groq[0] == "groq/llama-x"
    assert together is not None and together[0] == "together/llama-x"
    assert cat.lookup("llama-x") is None  # no unscoped entry: no provider, no price


def test_gemini_thoughts_reported_in_total_tokens_only_are_billed_as_output(
    catalog: Catalog,
) -> None:
    """A gemini-2.5-flash answer through Google's OpenAI-compatible endpoint: 3 visible
    tokens, 650 thinking tokens counted only in total_tokens. Google bills all 653 as
    output ($2.50 / M)."""
    from ingress.forward.capture import OpenAIJsonCapture

    body = orjson.dumps(
        {
            "object": "chat.completion",
            "model": "gemini-2.5-flash",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
            "usage": {"completion_tokens": 3, "prompt_tokens": 18, "total_tokens": 671},
        }
    )
    usage = OpenAIJsonCapture(body).usage
    cost, family = costed_at(catalog, "gemini-2.5-flash", usage, "gemini")
    assert family == "gemini-2.5-flash"
    assert cost.input == usd(18, Decimal("0.30"))
    assert cost.output + cost.reasoning == usd(653, Decimal("2.50"))


def test_mistral_cache_reads_cost_a_tenth_of_the_input_rate(catalog: Catalog) -> None:
    """Mistral reports cache reads in usage.prompt_tokens_details.cached_tokens, "billed at
    10% of the standard input token price" (docs.mistral.ai, prompt caching)."""
    usage = Usage(input_tokens=1_000_000, cached_input_tokens=800_000, output_tokens=0)
    for model, input_rate in (
        ("mistral-small-latest", "0.10"),
        ("mistral-large-2411", "2.00"),
        ("mistral-medium-2508", "0.40"),
        ("codestral-2501", "0.30"),
    ):
        cost, _ = costed_at(catalog, model, usage, "mistral")
        assert cost.input == usd(200_000, Decimal(input_rate)), model
        assert cost.cached_input == usd(800_000, Decimal(input_rate) / 10), model


# -- Anthropic's threshold compaction (beta compact-2026-01-12) ---------------------------
# The API summarises the conversation in a sampling step of its own, at the call's model,
# before answering: that step's tokens are in usage.iterations (type "compaction"), left
# out of the top-level counts (the answer's), and billed all the same.
COMPACTED = {
    "input_tokens": 23_000,
    "output_tokens": 1_000,
    "iterations": [
        {"type": "compaction", "input_tokens": 180_000, "output_tokens": 3_500},
        {"type": "message", "input_tokens": 23_000, "output_tokens": 1_000},
    ],
}


def test_anthropic_compaction_iterations_are_billed(catalog: Catalog) -> None:
    from ingress.forward.capture import AnthropicJsonCapture, AnthropicStreamCapture

    model = "claude-opus-4-6"
    # 203,000 input x 5.00 + 4,500 output x 25.00, the summary's tokens included.
    expected = Decimal("1.1275")
    body = orjson.dumps({"type": "message", "model": model, "content": [], "usage": COMPACTED})
    captured = AnthropicJsonCapture(body)
    event = response(model, captured.usage, ts=LATE_2026, provider="anthropic",
                     model_served=captured.model)  # fmt: skip
    assert priced(event, catalog).total == expected
    # Streamed: the iterations come in the message_delta's cumulative usage.
    start = {"type": "message_start", "message": {"model": model, "content": [],
             "usage": {"input_tokens": 23_000, "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": COMPACTED}
    stream = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in (start, delta))
    capture = AnthropicStreamCapture()
    assert capture.feed(stream) + capture.finish() == stream
    event = response(model, capture.final_usage, ts=LATE_2026, provider="anthropic",
                     model_served=capture.model)  # fmt: skip
    assert priced(event, catalog).total == expected
