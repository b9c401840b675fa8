"""Cost arithmetic: exact decimals, no token charged twice, catalog resolution."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmtap.events import Cost, ResponseEvent, Usage
from stream.pricing import Catalog, ModelPrice, Rates, cost_of, load_catalog, price

MILLION = Decimal(1_000_000)
NANO = Decimal("0.000000001")
COST_FIELDS = ("input", "cached_input", "cache_write", "output", "reasoning", "total")


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
    now = ts or datetime.now(UTC)
    fields: dict[str, Any] = {
        "request_id": uuid.uuid4(),
        "ts_start": now,
        "ts_end": now,
        "provider": "openai",
        "endpoint": "chat.completions",
        "model_requested": model,
        "model_served": model_served,
        "stream": False,
        "status": "ok",
        "http_status": 200,
        "latency_ms": 1,
        "proxy_overhead_ms": 0.1,
        "usage": usage,
    }
    fields.update(extra)
    return ResponseEvent(**fields)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def assert_all_decimal(cost: Cost) -> None:
    for name in COST_FIELDS:
        value = getattr(cost, name)
        assert type(value) is Decimal, (name, type(value))
        assert value.as_tuple().exponent == -9, (name, value)  # quantised to nano-dollars
    assert cost.total == cost.input + cost.cached_input + cost.cache_write + cost.output + (
        cost.reasoning
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


@pytest.mark.parametrize("model", ["no-such-model", "gpt-4o-turbo-pro", "gpt-5-2025-08-07"])
def test_an_unknown_model_is_unpriced_never_zero(catalog: Catalog, model: str) -> None:
    costed = price(response(model, Usage(input_tokens=10, output_tokens=10)), catalog)
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
    extra = tmp_path / "prices.yaml"
    extra.write_text(
        "models:\n"
        "  gpt-4o:\n"
        "    provider: openai\n"
        "    prices:\n"
        '      - {effective_from: 2024-01-01, input: "5.00", cached_input: "2.00",'
        ' output: "20.00"}\n'
        "  acme-large:\n"
        "    provider: acme\n"
        "    prices:\n"
        '      - {effective_from: 2024-01-01, input: "0.70", output: "2.10"}\n'
    )
    catalog = load_catalog(extra=extra)
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


def test_the_shipped_catalog_loads_and_every_entry_is_in_force_today(catalog: Catalog) -> None:
    assert catalog.models
    now = datetime.now(UTC)
    for name, entry in catalog.models.items():
        assert entry.at(now) is not None, name
