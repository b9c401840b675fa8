"""Cost arithmetic: pure functions over exact decimals.

The rates come from the catalog (stream/catalog.py: each model's dated rates, and how a
provider's model name finds them); :func:`cost_of` turns tokens into an exact cost
breakdown at those rates.
:func:`price` makes the contract's costed event; :func:`price_wire` the same event as
the msgspec struct the stream's cost stage reads and writes (``llmtap.wire``).
"""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import NamedTuple

from llmtap import wire
from llmtap.events import (
    GLOBAL_GEO,
    UINT32_MAX,
    AdvisorUsage,
    Cost,
    CostedEvent,
    ResponseEvent,
    Usage,
    derived_id,
)
from stream.catalog import TIERS, Catalog, RateFields, Rates

PER_MILLION = Decimal(1_000_000)
PER_THOUSAND = Decimal(1_000)
# ClickHouse stores money as Decimal(18, 9): nano-dollars.
MONEY_QUANTUM = Decimal("0.000000001")

ZERO_COST = Cost(
    input=Decimal(0),
    cached_input=Decimal(0),
    cache_write=Decimal(0),
    output=Decimal(0),
    reasoning=Decimal(0),
    total=Decimal(0),
    web_search=Decimal(0),
)


def no_tokens(usage: Usage | wire.Usage) -> bool:
    """Nothing reached a model (refused, unreachable): zero at any price, or none."""
    return (
        not usage.usage_missing
        and usage.input_tokens == 0
        and usage.output_tokens == 0
        and usage.web_search_requests == 0
        and not usage.advisor
    )


def largest_count(usage: Usage | wire.Usage) -> int:
    """The largest token or search count ``usage`` holds."""
    return max(
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_creation_input_tokens,
        usage.reasoning_tokens,
        usage.web_search_requests,
    )


_ZERO = Decimal(0)
_ONE = Decimal(1)
_NO_USD = _ZERO.quantize(MONEY_QUANTUM)


def _usd(
    tokens: int, rate: Decimal, *more: tuple[int, Decimal], per: Decimal = PER_MILLION
) -> Decimal:
    """Tokens (or searches) times USD rates ``per`` million (or thousand), summed, then
    rounded once to a nano-dollar."""
    exact = tokens * rate if tokens else _ZERO
    for more_tokens, more_rate in more:
        if more_tokens:
            exact += more_tokens * more_rate
    if not exact:
        return _NO_USD  # what rounding a zero gives: 0E-9
    return (exact / per).quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)


def cost_of(usage: Usage | wire.Usage, rates: Rates) -> Cost:
    """Cost of one call (:func:`breakdown`) as the contract's model."""
    return Cost(**breakdown(usage, rates))


def breakdown(usage: Usage | wire.Usage, rates: Rates) -> dict[str, Decimal]:
    """Cost of one call: ``input``, ``cached_input``, ``cache_write``, ``output``,
    ``reasoning``, ``web_search`` (the searches' fee) and their ``total``, in USD.

    Every token is charged at exactly one rate. Cache reads and cache writes are carved
    out of ``input_tokens`` (which includes them); the 1-hour cache writes are carved
    out of the cache writes. Reasoning tokens are part of ``output_tokens``; when the
    model prices them apart they are carved out too. Omitted rates fall back: cached
    input and cache writes to input, 1-hour cache writes to cache writes (then input),
    reasoning to output. A prompt past the model's long-context threshold prices the
    whole call at the long-context rates. A call an OpenAI service tier served
    (``usage.service_tier``: flex, priority, ultrafast) has its tokens at that tier's
    rates (:meth:`Rates.served`). A call served in fast mode (``usage.speed``) has each of
    those token rates multiplied by the rates' ``fast_multiplier``, its search fee not;
    so for a call whose inference ran outside ``"global"`` (``usage.inference_geo``):
    its geography's multiplier (:meth:`Rates.geo`), on top of fast mode's. A caller
    first checks that the rates price the tier, speed and geography, and the 1-hour
    (OpenAI: 12-hour) writes (:func:`priced_as_served`), as without one the call is
    priced at standard rates (the writes at the shorter writes' rate) here.
    """
    tier = rates.served(usage.input_tokens, usage.service_tier) or rates.for_prompt(
        usage.input_tokens
    )
    times = (rates.speed(usage.speed) or _ONE) * (rates.geo(usage.inference_geo) or _ONE)
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    written = min(usage.cache_creation_input_tokens, usage.input_tokens - cached)
    written_1h = min(usage.cache_creation_1h_input_tokens, written)
    uncached = usage.input_tokens - cached - written
    reasoning = usage.reasoning_tokens if tier.reasoning is not None else 0
    reasoning = min(reasoning, usage.output_tokens)

    input_rate = tier.input
    cached_rate = input_rate if tier.cached_input is None else tier.cached_input
    write_rate = input_rate if tier.cache_write is None else tier.cache_write
    write_1h_rate = write_rate if tier.cache_write_1h is None else tier.cache_write_1h
    output_rate, reasoning_rate = tier.output, tier.reasoning or _ZERO
    if times != _ONE:  # fast mode, data residency: every token rate, cache reads and writes too
        input_rate, cached_rate = input_rate * times, cached_rate * times
        write_rate, write_1h_rate = write_rate * times, write_1h_rate * times
        output_rate, reasoning_rate = output_rate * times, reasoning_rate * times

    cost_input = _usd(uncached, input_rate)
    cost_cached = _usd(cached, cached_rate)
    cost_write = _usd(written - written_1h, write_rate, (written_1h, write_1h_rate))
    cost_output = _usd(usage.output_tokens - reasoning, output_rate)
    cost_reasoning = _usd(reasoning, reasoning_rate)
    cost_search = search_fee(usage.web_search_requests, rates, usage.web_search_preview_requests)
    return {
        "input": cost_input,
        "cached_input": cost_cached,
        "cache_write": cost_write,
        "output": cost_output,
        "reasoning": cost_reasoning,
        "web_search": cost_search,
        "total": cost_input + cost_cached + cost_write + cost_output + cost_reasoning + cost_search,
    }


def search_fee(searches: int, rates: Rates, preview: int = 0) -> Decimal:
    """The fee for ``searches`` web searches at the rates' per-thousand prices, rounded
    once to a nano-dollar like the token costs: ``preview`` of them (at most all) at the
    ``web_search_preview`` price where the rates give one, the rest at ``web_search``."""
    preview_rate = rates.web_search_preview
    if preview_rate is None:
        preview, preview_rate = 0, _ZERO
    preview = min(preview, searches)
    rate = _ZERO if rates.web_search is None else rates.web_search
    return _usd(searches - preview, rate, (preview, preview_rate), per=PER_THOUSAND)


def advisor_breakdown(
    calls: tuple[AdvisorUsage | wire.AdvisorUsage, ...],
    catalog: Catalog,
    when: datetime,
    provider: str = "",
    geo: str = GLOBAL_GEO,
) -> dict[str, Decimal] | None:
    """The cost of the advisor tool's ``calls`` (Anthropic's ``advisor_20260301``), each
    priced as a call of its own model (:func:`breakdown`: its long-context tier too), at
    the rates in force ``when``, summed into one breakdown; None when a call's model has
    no price (the whole call's cost is then unknown, as for an unpriced model). The
    calls ran where the call did (``geo``, its ``Usage.inference_geo``): at their
    model's multiplier for it, and None when it gives none. None too when a call made
    1-hour writes on rates that give them no price (:func:`_long_writes_unpriced`)."""
    summed = dict.fromkeys(ZERO_COST.model_dump(), _NO_USD)
    for call in calls:
        entry = catalog.lookup(call.model, provider)
        rates = entry[1].at(when) if entry is not None else None
        if rates is None or rates.geo(geo) is None:
            return None
        if _long_writes_unpriced(call, rates.for_prompt(call.input_tokens)):
            return None  # as for the call's own: never at the shorter writes' rate
        tokens = Usage(
            input_tokens=call.input_tokens,
            output_tokens=call.output_tokens,
            cached_input_tokens=call.cached_input_tokens,
            cache_creation_input_tokens=call.cache_creation_input_tokens,
            cache_creation_1h_input_tokens=call.cache_creation_1h_input_tokens,
            inference_geo=geo,
        )
        for part, usd in breakdown(tokens, rates).items():
            summed[part] += usd
    return summed


class Rating(NamedTuple):
    """How a call is priced: its cost breakdown (None when unknown), whether its model
    has no price, and the catalog entry that priced it."""

    cost: dict[str, Decimal] | None
    unpriced: bool
    pricing_model: str = ""


_NO_COST = Rating(ZERO_COST.model_dump(), unpriced=False)


def rate(event: wire.Responded, catalog: Catalog) -> Rating:
    """Price a response event. Deterministic: a replay yields the same."""
    if no_tokens(event.usage):
        # Nothing reached a model (refused, unreachable): zero at any price.
        return _NO_COST
    entry = catalog.lookup(event.model, event.provider)
    rates = entry[1].at(event.ts_start) if entry is not None else None
    if entry is None or rates is None or not priced_as_served(event.usage, rates):
        # No price for the model, or none for the speed or tier that served it or the
        # geography its inference ran in (fast mode, OpenAI's flex or priority tier,
        # Anthropic's data residency, on a model the catalog gives no price for it):
        # unknown, never a standard-rate guess.
        return Rating(None, unpriced=True)
    if event.usage.usage_missing or largest_count(event.usage) > UINT32_MAX:
        # Tokens unknown: the cost is unknown too, and the event says so; never $0. A
        # count past what any call has is no count (an earlier ingress recorded a
        # provider's -1 sent unsigned, 2^64-1, as one): never a $10^14 cost in a budget.
        return Rating(None, unpriced=False, pricing_model=entry[0])
    cost = breakdown(event.usage, rates)
    if event.usage.advisor:
        # Its advisor's calls, at their model's rates, in the same parts of the cost.
        advised = advisor_breakdown(
            event.usage.advisor,
            catalog,
            event.ts_start,
            event.provider,
            event.usage.inference_geo,
        )
        if advised is None:
            return Rating(None, unpriced=True)
        cost = {part: usd + advised[part] for part, usd in cost.items()}
    return Rating(cost, unpriced=False, pricing_model=entry[0])


def priced_as_served(usage: Usage | wire.Usage, rates: Rates) -> bool:
    """Whether ``rates`` price the speed and the service tier that served the call, the
    geography its inference ran in, and its longer-lived cache writes."""
    tier = rates.served(usage.input_tokens, usage.service_tier)
    return (
        rates.speed(usage.speed) is not None
        and tier is not None
        and rates.geo(usage.inference_geo) is not None
        and not _long_writes_unpriced(usage, tier)
    )


def _long_writes_unpriced(
    usage: Usage | wire.Usage | AdvisorUsage | wire.AdvisorUsage, tier: RateFields
) -> bool:
    """Whether the call wrote to a longer-lived cache (Anthropic's 1-hour, OpenAI's
    12-hour) at rates that give no price for such a write: billed above the shorter
    writes' rate, it is not guessed at it."""
    longer = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
    return longer > 0 and tier.cache_write_1h is None


def missing_price(event: wire.Responded, catalog: Catalog) -> str:
    """What :func:`rate` found no price for, for an operator to add: the call's model,
    its fast mode, the service tier that served it, the geography its inference ran in,
    its longer-lived cache writes, or an advisor model it consulted (or its
    geography, or its 1-hour writes)."""
    entry = catalog.lookup(event.model, event.provider)
    rates = entry[1].at(event.ts_start) if entry is not None else None
    geo = event.usage.inference_geo
    if rates is not None and rates.speed(event.usage.speed) is None:
        return f"model {event.model!r} in fast mode: give its entry a fast_multiplier"
    if rates is not None and rates.geo(geo) is None:
        return (
            f"model {event.model!r} run in inference geo {geo!r}: give its entry"
            f" geo_multipliers for {geo!r}"
        )
    tier = event.usage.service_tier
    if rates is not None and rates.served(event.usage.input_tokens, tier) is None:
        if tier not in TIERS:
            return (
                f"model {event.model!r} at the {tier!r} service tier, which llmtap does not"
                " know (a tier it knows: flex, priority, ultrafast)"
            )
        if rates.tier(tier) is not None:  # a prompt past the long-context threshold
            return (
                f"model {event.model!r} at the {tier} service tier with a prompt past its"
                f" long-context threshold (no {tier} price covers one)"
            )
        return f"model {event.model!r} at the {tier} service tier: give its entry a {tier} price"
    served = rates.served(event.usage.input_tokens, tier) if rates is not None else None
    if served is not None and _long_writes_unpriced(event.usage, served):
        return (
            f"model {event.model!r} writing to the longer-lived cache (Anthropic's 1-hour,"
            " OpenAI's 12-hour) at the rates that served it: give them a cache_write_1h"
        )
    if rates is not None:
        for call in event.usage.advisor:
            advisor = catalog.lookup(call.model, event.provider)
            then = advisor[1].at(event.ts_start) if advisor is not None else None
            if then is None:
                return f"advisor model {call.model!r} (consulted by {event.model!r})"
            if then.geo(geo) is None:
                return (
                    f"advisor model {call.model!r} (consulted by {event.model!r}) run in"
                    f" inference geo {geo!r}: give its entry geo_multipliers for {geo!r}"
                )
            if _long_writes_unpriced(call, then.for_prompt(call.input_tokens)):
                return (
                    f"advisor model {call.model!r} (consulted by {event.model!r}) writing to"
                    " the longer-lived cache (Anthropic's 1-hour) at the rates that served"
                    " it: give them a cache_write_1h"
                )
    return f"model {event.model!r}"


def price(event: ResponseEvent, catalog: Catalog) -> CostedEvent:
    """The costed event of a response event (the contract's models)."""
    rating = rate(event, catalog)
    return CostedEvent(
        event_id=derived_id(event.event_id, "costed"),
        response=event,
        cost=None if rating.cost is None else Cost(**rating.cost),
        unpriced=rating.unpriced,
        pricing_model=rating.pricing_model,
    )


def price_wire(event: wire.Response, catalog: Catalog) -> wire.CostedEvent:
    """The costed event of a response event, as :func:`price` makes it, in msgspec
    structs (the cost stage's hot path)."""
    rating = rate(event, catalog)
    return wire.CostedEvent(
        event_id=derived_id(event.event_id, "costed"),
        response=event,
        cost=None if rating.cost is None else wire.Cost(**rating.cost),
        unpriced=rating.unpriced,
        pricing_model=rating.pricing_model,
    )
