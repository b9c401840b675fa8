"""The pricing catalog: what each model costs, and when.

The catalog (``stream/pricing.yaml``, plus an operator's ``pricing_file``) maps a model
name, optionally scoped to a provider (``groq/llama-3.1-8b-instant``), to dated rates.
:meth:`Catalog.lookup` resolves the name a provider reported to a catalog entry (see
its docstring for the exact order), and :meth:`ModelPrice.at` picks the rates in force
when the call started. The arithmetic over those rates is stream/pricing.py.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from llmtap.config_sources import UniqueKeys
from llmtap.events import GEO_PATTERN, GLOBAL_GEO, STANDARD_TIER

_ONE = Decimal(1)

# Names resolved by Catalog.lookup are remembered, up to this many (model names come
# from callers, so the memory is bounded: past it, it starts over).
_REMEMBERED = 10_000

# A leading "models/" is how Gemini's REST API names its models.
_GEMINI_PREFIX = "models/"
# Version suffixes stripped one at a time, each result tried in turn (see lookup):
_SUFFIXES = (
    re.compile(r"-latest$"),  # claude-3-7-sonnet-latest, mistral-small-latest
    re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$"),  # gpt-4o-2024-08-06, claude-...-20241022
    re.compile(r"-preview(-\d{2}-\d{2}|-\d{2}-\d{4})?$"),  # gemini-2.5-flash-preview-05-20
    re.compile(r"-\d{4}$"),  # mistral-small-2503, gpt-3.5-turbo-0125 (YYMM, MMDD)
    re.compile(r"-\d{3}$"),  # gemini-2.0-flash-001
)


class RateFields(BaseModel):
    """USD per million tokens. Omitted cache and reasoning rates fall back (see cost_of)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)  # Anthropic: the 5-minute tier
    # Anthropic: the 1-hour tier; OpenAI: the 12-hour one. None: a call writing so is unpriced.
    cache_write_1h: Decimal | None = Field(default=None, ge=0)
    reasoning: Decimal | None = Field(default=None, ge=0)

    def dearest(self) -> tuple[Decimal, Decimal]:
        """The most an input token and an output token may be billed at (a worst case,
        ingress/guards/worst_case.py): input or a cache write, which costs more; output
        or reasoning."""
        writes = [r for r in (self.cache_write, self.cache_write_1h) if r is not None]
        return max([self.input, *writes]), max(self.output, self.reasoning or Decimal(0))


class LongContext(RateFields):
    """Rates for a whole call whose prompt (``input_tokens``, cache reads and writes
    included) exceeds ``above_input_tokens``: every token of that call, output too, is
    priced here (Gemini Pro past 200k, Claude Sonnet 4/4.5 past 200k, Haiku 5.5 past
    100k). Omitted rates fall back within this tier, exactly as in the base tier."""

    above_input_tokens: int = Field(gt=0)


class TierRates(RateFields):
    """The rates of a call an OpenAI service tier other than the standard one served
    (``flex``, ``priority``, ``ultrafast``: Usage.service_tier), given whole, as OpenAI prices each
    model's tiers apart (priority is no one multiple of the standard rates). Omitted
    rates fall back within the tier, as in the base tier. No long-context tier: OpenAI
    publishes none for a service tier."""


class Rates(RateFields):
    """The rates in force from ``effective_from`` (UTC date) until the next entry."""

    effective_from: date
    long_context: LongContext | None = None
    # USD per 1,000 web searches the provider runs for a call (a server-side tool,
    # billed on top of the tokens its results add to the prompt). None: not priced, the
    # searches are counted and their fee is zero.
    web_search: Decimal | None = Field(default=None, ge=0)
    # USD per 1,000 searches by the Responses API's older web_search_preview tool, where
    # it is priced apart (OpenAI's non-reasoning models). None: as web_search.
    web_search_preview: Decimal | None = Field(default=None, ge=0)
    # Anthropic's fast mode: a call served at fast speed (Usage.speed) has every token
    # rate above (cache reads and writes, the long-context tier) multiplied by this; its
    # search fees are not. None: no fast price known, and a call served fast is unpriced.
    fast_multiplier: Decimal | None = Field(default=None, ge=1)
    # Anthropic's data residency: a call whose inference ran in one of these geographies
    # (Usage.inference_geo: "us" for US-only inference) has every token rate above
    # multiplied by its multiplier, on top of fast mode's; its search fees are not. A
    # call run "global" is at the rates above. A geography not named here (all of them,
    # when None) has no price known, and a call run there is unpriced.
    # Named as the answer names them (lower case: "us"); "global" is the rates above.
    geo_multipliers: (
        dict[Annotated[str, Field(pattern=GEO_PATTERN)], Annotated[Decimal, Field(ge=1)]] | None
    ) = None
    # OpenAI's service tiers: the rates of a call its answer says flex, priority or
    # ultrafast served (Usage.service_tier). None: no price known for that tier, and such
    # a call is unpriced (so is one a tier named here by no field served).
    flex: TierRates | None = None
    priority: TierRates | None = None
    ultrafast: TierRates | None = None

    @field_validator("geo_multipliers")
    @classmethod
    def _not_global(cls, value: dict[str, Decimal] | None) -> dict[str, Decimal] | None:
        if value is not None and GLOBAL_GEO in value:
            raise ValueError(f"{GLOBAL_GEO!r} is priced at the standard rates: name no multiplier")
        return value

    def for_prompt(self, input_tokens: int) -> RateFields:
        """The rates for a call with this many prompt tokens (long-context tier or not)."""
        tier = self.long_context
        return tier if tier is not None and input_tokens > tier.above_input_tokens else self

    def served(self, input_tokens: int, service_tier: str = "standard") -> RateFields | None:
        """The rates for a call with this many prompt tokens that ``service_tier`` served
        (the contract's ``Usage.service_tier``): the standard ones (:meth:`for_prompt`),
        or the tier's (:attr:`flex`, :attr:`priority`, :attr:`ultrafast`); None when
        these rates give the tier no price (a tier llmtap does not know: none), or the
        prompt passes the long-context threshold, which no tier price covers (such a
        call cannot be priced)."""
        if service_tier == STANDARD_TIER:
            return self.for_prompt(input_tokens)
        tier = self.tier(service_tier)
        if tier is None or self.for_prompt(input_tokens) is not self:
            return None
        return tier

    def tier(self, service_tier: str) -> TierRates | None:
        """The rates these give a service tier other than the standard one (``TIERS``),
        None for one they give none or that llmtap does not know."""
        return getattr(self, service_tier) if service_tier in TIERS else None

    def speed(self, speed: str) -> Decimal | None:
        """What the token rates are multiplied by for a call served at ``speed`` (the
        contract's ``Usage.speed``): 1 at standard speed, :attr:`fast_multiplier` in fast
        mode; None when these rates give no fast price (such a call cannot be priced)."""
        return self.fast_multiplier if speed == "fast" else _ONE

    def geo(self, geo: str) -> Decimal | None:
        """What the token rates are multiplied by for a call whose inference ran in
        ``geo`` (the contract's ``Usage.inference_geo``): 1 for ``"global"``, else its
        :attr:`geo_multipliers` entry; None when these rates give it none (such a call
        cannot be priced)."""
        if geo == GLOBAL_GEO:
            return _ONE
        return None if self.geo_multipliers is None else self.geo_multipliers.get(geo)

    def dearest_geo(self) -> Decimal:
        """The most any geography these rates price multiplies them by (1 if none)."""
        return max((self.geo_multipliers or {}).values(), default=_ONE)


class ModelPrice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    prices: list[Rates] = Field(min_length=1)
    # The most a call can read (prompt tokens, at the largest context the provider can
    # be switched to) and write (tokens per answer, reasoning included). Optional; they
    # bound a hard cap's worst case (ingress/guards/budgets.py), and where one is
    # missing the budget_default_* settings stand in.
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_price_per_day(self) -> ModelPrice:
        days = [r.effective_from for r in self.prices]
        if len(days) != len(set(days)):
            raise ValueError("two prices take effect on the same day")
        return self

    def at(self, when: datetime) -> Rates | None:
        """The rates in force at ``when``: the latest entry not after its day."""
        return self.on(when.date())

    def on(self, day: date) -> Rates | None:
        """The rates in force on ``day``: the latest entry not after it."""
        in_force = [r for r in self.prices if r.effective_from <= day]
        return max(in_force, key=lambda r: r.effective_from) if in_force else None


class Catalog(BaseModel):
    """Model names (matched case-insensitively) to prices.

    A key is either a model name (``gpt-4o``), priced for whichever provider serves it,
    or ``<provider>/<model>`` (``groq/llama-3.3-70b-versatile``), priced only when that
    provider served the call: the same open model costs differently on Groq and Together.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, ModelPrice]
    _index: dict[str, str] = PrivateAttr(default_factory=dict)
    _providers: frozenset[str] = PrivateAttr(default=frozenset())
    _found: dict[tuple[str, str], tuple[str, ModelPrice] | None] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _keys_differ_by_more_than_case(self) -> Catalog:
        seen: dict[str, str] = {}
        for key in self.models:
            other = seen.setdefault(key.casefold(), key)
            if other != key:
                raise ValueError(f"models {other!r} and {key!r} differ only in case")
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._index = {key.casefold(): key for key in self.models}
        self._providers = frozenset(e.provider.casefold() for e in self.models.values())

    def lookup(self, model: str, provider: str = "") -> tuple[str, ModelPrice] | None:
        """The catalog entry for ``model`` as served by ``provider``, or None.

        Names are tried most specific first, case-insensitively: the name as given;
        without a leading ``models/`` (Gemini); without a leading ``<p>/`` where ``p``
        is the call's provider or any provider in the catalog (``openai/gpt-4o``); then
        without one version suffix at a time: ``-latest``, a date (``-2024-08-06``,
        ``-20241022``), ``-preview`` (with any date after it), a 4-digit version (``-2503``)
        and a 3-digit one (``-001``). For each name, ``<provider>/<name>`` is tried
        before ``<name>``. The first key found wins, so an exact entry (a snapshot
        priced apart, like ``gpt-4o-2024-05-13``) always beats its family.
        """
        try:
            return self._found[model, provider]
        except KeyError:
            pass
        if len(self._found) >= _REMEMBERED:
            self._found.clear()
        found = self._found[model, provider] = self._resolve(model, provider)
        return found

    def _resolve(self, model: str, provider: str) -> tuple[str, ModelPrice] | None:
        scope = provider.strip().casefold()
        providers = self._providers | {scope} if scope else self._providers
        for name in _candidates(model, providers):
            keys = (f"{scope}/{name}", name) if scope else (name,)
            for key in keys:
                found = self._index.get(key)
                if found is not None:
                    return found, self.models[found]
        return None

    def merged(self, other: Catalog) -> Catalog:
        """This catalog with ``other``'s entries added, replacing same-named ones.

        An entry's prices replace the shipped ones whole. What it does not name is kept
        from the shipped entry that would have priced its model (the one of the same
        name; for ``openai/gpt-4o`` or ``gpt-4o-2024-11-20``, ``gpt-4o``): its limits
        (``context_window``, ``max_output_tokens``) and, on each of its prices that names
        neither search fee, the search fees (``web_search``, ``web_search_preview``) in
        force on that price's date. An override written to change a token price must not
        drop a hard cap's worst case to the defaults, nor a fee to zero; one that names a
        search fee (``web_search: null``: searches are free) says what searches cost.
        Naming one as null drops it. So does fast mode's multiplier (``fast_multiplier``)
        on each price that does not name it: a negotiated rate is still dearer in fast
        mode; ``fast_multiplier: null`` leaves a call served fast unpriced. So do the
        data-residency multipliers (``geo_multipliers``): ``null`` leaves a call run
        outside ``"global"`` unpriced. And so do OpenAI's service tiers' rates
        (``flex``, ``priority``, ``ultrafast``), the list prices in force on that price's
        date: a price naming one gives its own (null: none, a call that tier served is
        unpriced).
        """
        replaced = {key.casefold() for key in other.models}
        kept = {k: v for k, v in self.models.items() if k.casefold() not in replaced}
        added = {}
        for key, entry in other.models.items():
            found = self._resolve(key, entry.provider)
            added[key] = entry if found is None else _inheriting(found[1], entry)
        return Catalog(models={**kept, **added})


_LIMITS = ("context_window", "max_output_tokens")
_FEES = frozenset({"web_search", "web_search_preview"})
_FAST = "fast_multiplier"
_GEO = "geo_multipliers"
_LONG_WRITES = "cache_write_1h"
# OpenAI's service tiers priced apart from the standard one, each a field of Rates.
TIERS = ("flex", "priority", "ultrafast")


def _inheriting(shipped: ModelPrice, entry: ModelPrice) -> ModelPrice:
    """``entry`` with the limits and search fees it does not name taken from ``shipped``."""
    update: dict[str, Any] = {
        f: getattr(shipped, f) for f in _LIMITS if f not in entry.model_fields_set
    }
    if any(
        not _FEES & rates.model_fields_set
        or _FAST not in rates.model_fields_set
        or _GEO not in rates.model_fields_set
        or _LONG_WRITES not in rates.model_fields_set
        or not set(TIERS) <= rates.model_fields_set
        for rates in entry.prices
    ):
        # The shipped fees, fast mode's and data residency's multipliers and the service
        # tiers' rates on each price's day; before the shipped prices, their first. A
        # price naming either fee names the searches' fees: one it leaves out is none (a
        # preview search then costs the web_search fee it names, null included). The
        # longer-lived cache writes' rate, which a provider gives as a multiple of the
        # input rate (Anthropic's 1-hour writes: twice it), is the shipped multiple of
        # the override's own input rate.
        earliest = min(shipped.prices, key=lambda r: r.effective_from)

        def with_fees(rates: Rates) -> Rates:
            then = shipped.on(rates.effective_from) or earliest
            named = rates.model_fields_set
            kept = {f: getattr(then, f) for f in _FEES} if not _FEES & named else {}
            if _FAST not in named:
                kept[_FAST] = then.fast_multiplier
            if _GEO not in named:
                kept[_GEO] = then.geo_multipliers
            if _LONG_WRITES not in named and then.cache_write_1h is not None and then.input:
                kept[_LONG_WRITES] = rates.input * then.cache_write_1h / then.input
            kept.update({t: getattr(then, t) for t in TIERS if t not in named})
            return rates.model_copy(update=kept) if kept else rates

        update["prices"] = [with_fees(rates) for rates in entry.prices]
    return entry.model_copy(update=update) if update else entry


def _candidates(model: str, providers: frozenset[str]) -> list[str]:
    """The names :meth:`Catalog.lookup` tries for ``model``, most specific first."""
    name = model.strip().casefold()
    names = [name]
    if name.startswith(_GEMINI_PREFIX) and name != _GEMINI_PREFIX:
        name = name.removeprefix(_GEMINI_PREFIX)
        names.append(name)
    head, slash, rest = name.partition("/")
    if slash and rest and head in providers:
        name = rest
        names.append(name)
    while True:
        for suffix in _SUFFIXES:
            shorter = suffix.sub("", name, count=1)
            if shorter and shorter != name:
                name = shorter
                names.append(name)
                break
        else:
            return names


def load_catalog(extra: Path | None = None) -> Catalog:
    """The shipped catalog, with an operator's file layered on top."""
    shipped = resources.files("stream").joinpath("pricing.yaml").read_text()
    catalog = Catalog.model_validate(yaml.safe_load(shipped))
    if extra is not None:
        # A model priced twice in it is refused, not its first price dropped.
        operators = yaml.load(extra.read_text(), Loader=UniqueKeys)
        catalog = catalog.merged(Catalog.model_validate(operators))
    return catalog
