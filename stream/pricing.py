"""Prices and cost arithmetic: pure functions over exact decimals."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from llmtap.events import Cost, CostedEvent, ResponseEvent, Usage, derived_id

PER_MILLION = Decimal(1_000_000)
# ClickHouse stores money as Decimal(18, 9): nano-dollars.
MONEY_QUANTUM = Decimal("0.000000001")

_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


class Rates(BaseModel):
    """USD per million tokens, in force from ``effective_from`` (UTC date)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    effective_from: date
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)
    reasoning: Decimal | None = Field(default=None, ge=0)


class ModelPrice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    prices: list[Rates] = Field(min_length=1)

    def at(self, when: datetime) -> Rates | None:
        """The rates in force at ``when``: the latest entry not after it."""
        day = when.date()
        in_force = [r for r in self.prices if r.effective_from <= day]
        return max(in_force, key=lambda r: r.effective_from) if in_force else None


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, ModelPrice]

    def lookup(self, model: str) -> tuple[str, ModelPrice] | None:
        """The catalog entry for a model name, resolving dated snapshots to their family."""
        for name in (model, _DATE_SUFFIX.sub("", model)):
            if name in self.models:
                return name, self.models[name]
        return None

    def merged(self, other: Catalog) -> Catalog:
        return Catalog(models={**self.models, **other.models})


ZERO_COST = Cost(
    input=Decimal(0),
    cached_input=Decimal(0),
    cache_write=Decimal(0),
    output=Decimal(0),
    reasoning=Decimal(0),
    total=Decimal(0),
)


def _no_tokens(usage: Usage) -> bool:
    return not usage.usage_missing and usage.input_tokens == 0 and usage.output_tokens == 0


def load_catalog(extra: Path | None = None) -> Catalog:
    """The shipped catalog, with an operator's file layered on top."""
    shipped = resources.files("stream").joinpath("pricing.yaml").read_text()
    catalog = Catalog.model_validate(yaml.safe_load(shipped))
    if extra is not None:
        catalog = catalog.merged(Catalog.model_validate(yaml.safe_load(extra.read_text())))
    return catalog


def _usd(tokens: int, per_million: Decimal) -> Decimal:
    return (Decimal(tokens) * per_million / PER_MILLION).quantize(
        MONEY_QUANTUM, rounding=ROUND_HALF_EVEN
    )


def cost_of(usage: Usage, rates: Rates) -> Cost:
    """Cost of one call.

    Cached reads and cache writes are carved out of ``input_tokens`` (which includes
    them), so no token is charged at two rates. Reasoning tokens are part of
    ``output_tokens``; when the model prices them apart they are carved out too.
    """
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_creation_input_tokens, usage.input_tokens - cached)
    uncached = usage.input_tokens - cached - written
    reasoning = usage.reasoning_tokens if rates.reasoning is not None else 0
    reasoning = min(reasoning, usage.output_tokens)

    cost_input = _usd(uncached, rates.input)
    cost_cached = _usd(cached, rates.input if rates.cached_input is None else rates.cached_input)
    cost_write = _usd(written, rates.input if rates.cache_write is None else rates.cache_write)
    cost_output = _usd(usage.output_tokens - reasoning, rates.output)
    cost_reasoning = _usd(reasoning, rates.reasoning or Decimal(0))
    return Cost(
        input=cost_input,
        cached_input=cost_cached,
        cache_write=cost_write,
        output=cost_output,
        reasoning=cost_reasoning,
        total=cost_input + cost_cached + cost_write + cost_output + cost_reasoning,
    )


def price(event: ResponseEvent, catalog: Catalog) -> CostedEvent:
    """Turn a response event into a costed one. Deterministic: a replay yields the same."""
    event_id = derived_id(event.event_id, "costed")
    if _no_tokens(event.usage):
        # Nothing reached a model (refused, unreachable): zero at any price.
        return CostedEvent(event_id=event_id, response=event, cost=ZERO_COST, unpriced=False)
    entry = catalog.lookup(event.model)
    rates = entry[1].at(event.ts_start) if entry is not None else None
    if entry is None or rates is None:
        return CostedEvent(event_id=event_id, response=event, cost=None, unpriced=True)
    if event.usage.usage_missing:
        # Tokens unknown: the cost is unknown too, and the event says so; never $0.
        return CostedEvent(
            event_id=event_id, response=event, cost=None, unpriced=False, pricing_model=entry[0]
        )
    return CostedEvent(
        event_id=event_id,
        response=event,
        cost=cost_of(event.usage, rates),
        unpriced=False,
        pricing_model=entry[0],
    )
