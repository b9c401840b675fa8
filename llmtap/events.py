"""The event contract: what crosses Kafka between ingress, stream and sinks.

Every event is a pydantic model serialised as JSON (UTF-8) on the wire. Each carries
``schema_version`` so a consumer can refuse or upgrade what it does not understand. A
call's events carry an ``event_id`` (UUID, unique per event) and the ``request_id`` of
the call; a window's and an alert's ``event_id`` is derived from what it is about; the
budget and reservation states are keyed by budget and by process on compacted topics.
Stages are idempotent on ``event_id`` (a state: on its key): a replayed event never
counts twice.

Token accounting is normalised across providers (see :class:`Usage`), money is
``Decimal`` (serialised as a JSON string, never a float) and every timestamp is UTC.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1

# Namespace for ids derived from other ids (a costed event's id is derived from its
# response event's id, so recomputing it after a replay yields the same id).
_DERIVED_NS = uuid.UUID("6f0b7c1e-3a52-4c55-9a3e-4b7d1f6a2c10")


def _must_be_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() != UTC.utcoffset(None):
        raise ValueError("timestamps must be timezone-aware UTC")
    return value


UtcDatetime = Annotated[datetime, AfterValidator(_must_be_utc)]


def utcnow() -> datetime:
    return datetime.now(UTC)


_NS_BYTES = _DERIVED_NS.bytes
_VERSION_BITS = (0xF000 << 64) | (0xC000 << 48)
_VERSION_5 = (5 << 76) | (0x8000 << 48)  # version 5, RFC 4122 variant


def _uuid5(name: str) -> uuid.UUID:
    """``uuid.uuid5(_DERIVED_NS, name)``, the same id, made in two thirds of the time
    (one per costed event and per window: tests/test_wire.py holds the two equal)."""
    digest = hashlib.sha1(_NS_BYTES + name.encode()).digest()
    return uuid.UUID(int=int.from_bytes(digest[:16], "big") & ~_VERSION_BITS | _VERSION_5)


def derived_id(source: uuid.UUID, stage: str) -> uuid.UUID:
    """A deterministic id for what ``stage`` derives from the event ``source``."""
    return _uuid5(f"{stage}:{source}")


def series_key(size_s: int, dimension: str, tenant: str, value: str) -> str:
    """The key of a window series: its length, dimension, tenant and value. The tenant
    goes with its length, so no tenant name and value can spell another pair's key."""
    return f"{size_s}|{dimension}|{len(tenant)}:{tenant}|{value}"


def of_tenant(kind: str, tenant: str) -> tuple[str, ...]:
    """The first parts of the :func:`stable_id` of a window or alert of ``tenant``: just
    ``kind`` for none (the ids they had before they had tenants), else a kind of its own
    and the tenant with its length, so no value of a series of no tenant (a client's
    ``user``, say) can spell the id of another tenant's."""
    return (kind,) if not tenant else (f"{kind}+tenant", f"{len(tenant)}:{tenant}")


def stable_id(*parts: str) -> uuid.UUID:
    """A deterministic id for a thing named by ``parts`` (e.g. one budget's threshold in
    one period), so every replay that produces it produces the same id."""
    return _uuid5("\x1f".join(parts))


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Status = Literal[
    "ok",  # the provider answered 2xx and the whole answer reached the client
    "upstream_error",  # the provider answered with an error status; forwarded as is
    "upstream_unreachable",  # connect error or timeout; the client got a 502/504
    "client_disconnected",  # the client went away before the answer was complete
    "proxy_stopped",  # the ingress stopped (its shutdown grace ran out) mid-answer
    "bad_request",  # malformed call (400, 404, 413): no provider was contacted
    "refused",  # by a guard (key, model, config) or llmtap's own bug: no provider was contacted
    "rate_limited",  # the key's requests or tokens per minute were spent: 429
    "budget_exceeded",  # a hard-capped budget could not cover the call's worst case: 429
    # (400 if it is more than the budget's whole limit: it would not fit after the reset)
]


# A custom property's name (``x-llmtap-property-<name>``): what the analytics API can
# group by (``group_by=property:<name>``), so the ingress takes no other (one rule for
# both, sql/params.py reads it). Recorded in lower case, as header names are read.
PROPERTY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PROPERTY_NAME_RULE = "1 to 64 of A-Z a-z 0-9 _ . -"


class Attribution(_Model):
    """Who made the call. Copied onto every event so no stage needs a join."""

    tenant: str = ""
    team: str = ""
    user: str = ""
    feature: str = ""
    env: str = ""
    # SHA-256 (hex, first 16 chars) of the credential the client presented; never the key.
    key_id: str = ""
    properties: dict[str, str] = Field(default_factory=dict)


# The speed a provider served a call at: Anthropic's fast mode, or its standard speed.
Speed = Literal["standard", "fast"]

# Where a provider ran a call's inference (Anthropic's usage.inference_geo): "global"
# (any geography, standard rates) or a geography it was pinned to ("us", billed at a
# premium). A name, not a closed list: a geography the catalog gives no price for is
# carried as served, so its cost is unknown rather than guessed at standard rates.
GLOBAL_GEO = "global"
GEO_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
# The service tier an OpenAI call was served at (its answer's ``service_tier``): flex
# (about half the standard rates), priority (a per-model premium), ultrafast (a
# multiple of the standard rates), standard, or another tier its answer named, kept as
# named (a name, as a geography is) so that pricing can refuse to guess at it.
STANDARD_TIER = "standard"
TIER_PATTERN = GEO_PATTERN
ServiceTier = Annotated[str, Field(pattern=TIER_PATTERN)]


class AdvisorUsage(_Model):
    """The tokens of one call of Anthropic's advisor tool (``advisor_20260301``): a
    sub-inference of another ``model`` within the call, billed at that model's rates
    (an ``advisor_message`` entry of Anthropic's ``usage.iterations``, left out of its
    top-level counts). Normalised as :class:`Usage` is: ``input_tokens`` includes the
    cache reads and writes."""

    model: str
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cached_input_tokens: int = Field(default=0, ge=0)
    cache_creation_input_tokens: int = Field(default=0, ge=0)
    cache_creation_1h_input_tokens: int = Field(default=0, ge=0)  # within the above


# The most a token or search count of a call may be: what the store's ``calls`` holds
# one as (UInt32), far past any call's. A provider's count past it (some send -1 as an
# unsigned 64-bit number), or below zero, is no count: the ingress records the call's
# usage as missing (ingress/forward/usage.py), and the store dead-letters any event
# that holds one anyway (sinks/clickhouse/rows.py).
UINT32_MAX = 2**32 - 1


class Usage(_Model):
    """Tokens of one call, normalised across providers.

    ``input_tokens`` counts every prompt token, including those read from a cache
    (``cached_input_tokens``) and those written to one (``cache_creation_input_tokens``);
    ``output_tokens`` counts every generated token, including ``reasoning_tokens``.
    ``cache_creation_1h_input_tokens`` is the part of the cache writes made with the
    longer lifetime: Anthropic's one hour, OpenAI's 12 hours (each priced above the
    default writes: five minutes, 30 minutes).
    So the subsets never exceed their totals and pricing never charges a token twice.
    ``usage_missing`` is true when the provider reported no usage, or a count no call
    can have (below zero, or past :data:`UINT32_MAX`): the counts are then unknown,
    not zero. ``output_tokens_counted`` is true when a stream broke off
    (or its client went away) before the provider said how many tokens it generated,
    and ``output_tokens`` is llmtap's count of the text streamed so far (o200k_base:
    OpenAI's tokenizer for its current models; an estimate for other providers').
    ``web_search_requests`` counts the web searches the provider ran for the call
    (Anthropic's ``server_tool_use.web_search_requests``; the Responses API's
    ``web_search_call`` output items), each billed on top of the tokens;
    ``web_search_preview_requests`` those of them run by the Responses API's older
    ``web_search_preview`` tool (the call's only web search tool), which OpenAI bills
    apart on some models. ``speed`` is the speed that served the call, as the provider
    reports it (Anthropic's ``usage.speed``): ``"fast"`` for Anthropic's fast mode,
    billed at a premium on every token; ``"standard"`` otherwise, and for every call
    whose provider reports none (a call that asked for fast mode and was served at
    standard speed is billed at standard rates, and says so). ``advisor`` holds the
    calls of Anthropic's advisor tool, one entry each, apart from the other counts
    (which are the executor model's). ``inference_geo`` is where the provider ran the
    call's inference, as it reports it (Anthropic's ``usage.inference_geo``): ``"us"``
    for US-only inference, billed at a premium on every token; ``"global"`` for any
    geography, and for every call whose provider reports none (or ``"not_available"``).
    ``service_tier`` is the tier that served the call
    as the answer says (OpenAI's ``service_tier``, not the one asked for): ``"flex"``,
    ``"priority"`` and ``"ultrafast"``, billed at their own rates; ``"standard"`` for
    OpenAI's ``"default"``, its ``"scale"`` (Scale Tier's prepaid units, valued at
    standard rates) and an answer that names none; any other tier as named, which no
    price covers (the call is unpriced, never guessed at standard rates).
    """

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cached_input_tokens: int = Field(default=0, ge=0)
    cache_creation_input_tokens: int = Field(default=0, ge=0)
    cache_creation_1h_input_tokens: int = Field(default=0, ge=0)  # within the above
    reasoning_tokens: int = Field(default=0, ge=0)
    usage_missing: bool = False
    output_tokens_counted: bool = False
    web_search_requests: int = Field(default=0, ge=0)
    web_search_preview_requests: int = Field(default=0, ge=0)  # within the above
    speed: Speed = "standard"
    advisor: tuple[AdvisorUsage, ...] = ()
    inference_geo: str = Field(default=GLOBAL_GEO, pattern=GEO_PATTERN)
    service_tier: ServiceTier = STANDARD_TIER

    @classmethod
    def missing(cls) -> Usage:
        return cls(usage_missing=True)


# The longest a call's duration (``latency_ms``, ``ttft_ms``, ``proxy_overhead_ms``) may
# be: a week, in milliseconds, past any call's (the ingress sets no limit on a call's
# whole length, only on each wait for the provider's next bytes: it writes a longer one
# as a week). Any producer can write a response event: a number past float's range
# reads as infinity, which ``calls`` stored as NULL (a ttft) or as infinity, and one
# near float's largest made the rollups' sums infinite. Such an event is refused.
MAX_DURATION_MS = 7 * 24 * 3600 * 1000.0
Millis = Annotated[float, Field(ge=0, le=MAX_DURATION_MS, allow_inf_nan=False)]
# The most a window's latency sketch may sum to: as many durations of a week as a
# window can count (``windows`` holds its counts as UInt64). Its min and max are
# durations (Millis). Such a number past float's range (or NaN) was read: the window's
# quantiles stored as infinity or NaN, its sketch as nulls no reader takes back, and a
# sum near float's largest made the sum of a window's shares infinite. Refused.
MAX_SKETCH_SUM_MS = 2.0**64 * MAX_DURATION_MS
SketchSum = Annotated[float, Field(ge=0, le=MAX_SKETCH_SUM_MS, allow_inf_nan=False)]


class RequestEvent(_Model):
    """Published by the ingress for a call it routes to a provider, once the request
    has left for it (a call refused after routing: before the refusal's response event;
    one refused before routing, by its key or body, has only a response event)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["request"] = "request"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    request_id: uuid.UUID
    ts: UtcDatetime
    provider: str
    endpoint: str
    model_requested: str
    stream: bool
    request_bytes: int = Field(ge=0)
    max_tokens: int | None = None
    attribution: Attribution = Field(default_factory=Attribution)


class ResponseEvent(_Model):
    """Published by the ingress when a call ends, however it ended."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["response"] = "response"
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    request_id: uuid.UUID
    ts_start: UtcDatetime
    ts_end: UtcDatetime
    provider: str
    endpoint: str
    model_requested: str
    model_served: str = ""
    stream: bool
    status: Status
    http_status: int = Field(ge=0, le=999)
    error_class: str = ""
    usage: Usage
    latency_ms: Millis
    ttft_ms: Millis | None = None
    proxy_overhead_ms: Millis
    attribution: Attribution = Field(default_factory=Attribution)

    @property
    def model(self) -> str:
        """The model that answered, or the one asked for when none answered."""
        return self.model_served or self.model_requested


class Cost(_Model):
    """What one call cost, in USD, as a breakdown that sums to ``total``: its tokens by
    kind, and ``web_search``, the provider's fee for the searches it ran (absent from
    events written before it was priced: zero)."""

    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal
    total: Decimal
    web_search: Decimal = Decimal(0)


class CostedEvent(_Model):
    """A response event priced by the stream's cost stage.

    ``cost`` is None and ``unpriced`` true when the model has no known price: such a
    call is counted and surfaced, never recorded as $0.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["costed"] = "costed"
    event_id: uuid.UUID
    response: ResponseEvent
    cost: Cost | None
    unpriced: bool
    pricing_model: str = ""  # the catalog entry that priced it (family name)

    @property
    def request_id(self) -> uuid.UUID:
        return self.response.request_id


BudgetScope = Literal["tenant", "team", "key", "user", "feature"]
BudgetPeriod = Literal["day", "week", "month"]


class Alert(_Model):
    """A spike or budget alert, published on the alerts topic and delivered as a webhook.

    ``event_id`` is the alert id, derived from what the alert is about (rule, series,
    window or period, threshold, state), so a replay re-emits the same id and every
    stage downstream (storage, webhook delivery) can drop the duplicate.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["alert"] = "alert"
    event_id: uuid.UUID
    alert_type: Literal["spike", "budget"]
    state: Literal["firing", "resolved"]
    severity: Literal["info", "warning", "critical"]
    rule: str  # the spike rule's or the budget's name
    dimension: str  # tenant, team, key, user, model, provider, feature
    value: str  # which tenant, team...
    # The tenant the alert is about: a spike's series' (WindowEvent.tenant), a budget's
    # (its configured tenant, or its value for a tenant budget). "": every tenant's (a
    # model or provider series, a budget counting every tenant).
    tenant: str = ""
    metric: str  # cost, requests, tokens, error_rate, p95_latency, spend
    observed: Decimal
    baseline: Decimal | None = None  # spike: the learned baseline; budget: the limit
    # budget: the percentage of the limit crossed; spike: the level the window had to
    # pass to fire (stream.spikes.alert_level; none in alerts raised before it was set)
    threshold: Decimal | None = None
    window_start: UtcDatetime  # the closed window, or the budget period's start
    window_end: UtcDatetime
    first_seen: UtcDatetime
    message: str
    # budget: its period as configured (day, week, month); None on a spike alert, and on
    # a budget alert raised before it was carried. Written only when set: a spike alert
    # is as before, to an older reader too.
    period: BudgetPeriod | None = Field(default=None, exclude_if=lambda period: period is None)
    # spike, resolved: why. "normal": a window back within its level; "quiet": no calls
    # for a while; "unjudged": no window with a value for as long as the rule looks back
    # (both of those with ``observed`` 0, not measured). None on a firing alert, a budget
    # alert, one raised before it was carried. Written only when set, as ``period``.
    resolution: Literal["normal", "quiet", "unjudged"] | None = Field(
        default=None, exclude_if=lambda resolution: resolution is None
    )


class BudgetState(_Model):
    """One budget's spend in its current period: published by the stream on a compacted
    topic keyed by the budget's name; the ingress enforces hard caps from it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["budget_state"] = "budget_state"
    budget: str
    scope: BudgetScope
    value: str
    # The tenant whose calls it counts as configured ("": every tenant's; None: not said,
    # by a state published before it was carried).
    tenant: str | None = None
    period: BudgetPeriod
    period_start: UtcDatetime
    period_end: UtcDatetime
    limit_usd: Decimal
    spent_usd: Decimal
    status: Literal["ok", "warning", "exhausted"]
    hard_cap: bool
    crossed: tuple[int, ...] = ()  # alert thresholds (percent) crossed this period
    last_event_at: UtcDatetime | None = None  # the latest call end counted in spent_usd
    updated_at: UtcDatetime
    # Per llmtap.responses partition, the next offset not yet counted in spent_usd: a
    # worker restarted from older committed offsets skips what this state has counted.
    applied: dict[int, int] = Field(default_factory=dict)
    # Counted by a stream worker from when it first had the budget, not from the period's
    # start: a budget new to it, before the store's rebuild of its spend from ClickHouse
    # reached it (the spend before is not in it). A hard cap is not judged on it alone.
    # Written only when true: an older reader reads every other state.
    partial: bool = Field(default=False, exclude_if=lambda partial: not partial)


class PlacedCosts(_Model):
    """Costs of ended calls against one budget whose response events Kafka has, on
    ``partition`` of the responses topic up to offset ``through``, that no published
    state had counted, in the budget's period from ``period_start``: facts, not
    reservations. Every ingress holds them until a state of the budget has counted past
    ``through`` (or the period is over), whether or not the process that announced them
    lives (ingress/guards/budgets.py, :meth:`~ingress.guards.budgets.BudgetBook.heard`)."""

    budget: str
    period_start: UtcDatetime
    partition: int = Field(ge=0)
    through: int = Field(ge=0)
    usd: Decimal


# The longest an ingress may say it goes between announcements (it makes one every 10 s
# at most): a day. One of infinity, or past what a time span holds (x3: how long a
# silent process is taken as live), made every reader's judgement of who is live raise
# OverflowError: the ingress's hard caps and the store's budgets endpoint. Refused.
MAX_INTERVAL_S = 24 * 3600.0


class Reservations(_Model):
    """What one ingress process holds against its hard-capped budgets beyond their
    published spend: the worst cases of its calls in flight, and the costs of ended
    calls no budget state has counted yet. Published on a compacted topic keyed by the
    process's id when it changes and every ``interval_s`` seconds even if not (so a
    reader can tell a live process from a gone one); ``held`` empty when the process
    stops, its ``placed`` costs still told."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["reservations"] = "reservations"
    ingress_id: str
    at: UtcDatetime
    interval_s: float = Field(gt=0, le=MAX_INTERVAL_S, allow_inf_nan=False)
    held: dict[str, Decimal] = Field(default_factory=dict)  # budget name -> USD
    # Of what it holds (and, once it stopped, held), the costs Kafka has the events of:
    # kept by every reader until a state counts them, not with the process's liveness.
    # Told with every announcement: the last one is all a compacted topic keeps of a
    # process (one killed: what its successor reads). Left out when empty, so an
    # announcement placing nothing reads to an older reader.
    placed: tuple[PlacedCosts, ...] = Field(default=(), exclude_if=lambda placed: not placed)

    def live(self, now: datetime) -> bool:
        """Whether its process is to be taken as running at ``now``: one that has missed
        MISSED_ANNOUNCEMENTS announcements died without saying so (what it held with
        it), and one announced as far ahead of ``now`` is from a clock not to be trusted."""
        return abs(now - self.at) <= timedelta(seconds=self.interval_s * MISSED_ANNOUNCEMENTS)


MISSED_ANNOUNCEMENTS = 3  # an ingress silent for this many intervals is gone


class LatestHeard:
    """The latest announcement time heard (:class:`Reservations`), none past this
    process's clock (a clock running ahead moves nothing). Who has gone silent is judged
    against it, not against the announcement in hand: the topic is read a partition at
    a time, so one long gone, read after a live one, made the live one look ahead."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at: datetime | None = None

    def hear(self, event: Reservations) -> datetime:
        """Take ``event``'s time in; the latest heard, after it."""
        latest = min(event.at, utcnow())
        if self.at is None or latest > self.at:
            self.at = latest
        return self.at


class SketchState(_Model):
    """A latency distribution as a mergeable DDSketch (``stream.sketches.LatencySketch``,
    whose ``to_dict``/``from_dict`` this is): the keys and counts of its bins."""

    v: Literal[1] = 1
    relative_accuracy: float = Field(gt=0, lt=1)
    zero_count: int = Field(ge=0)
    keys: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()
    count: int = Field(ge=0)
    sum: SketchSum = 0.0
    min: Millis | None = None
    max: Millis | None = None


WindowDimension = Literal["tenant", "team", "key", "user", "model", "provider", "feature"]


class WindowEvent(_Model):
    """One closed tumbling window of one dimension's value (team ``search``, model
    ``gpt-4o``...), published once when the window closes on the windows topic.

    A window is published as one share per partition of ``llmtap.responses`` (named
    in ``partitions``) that had calls in it, and readers add the shares up (every field
    is a sum, the sketches merge exactly). ``event_id`` is derived from the window, its
    dimension value and ``partitions``, so a replay publishes the same id again.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["window"] = "window"
    event_id: uuid.UUID
    size_s: int = Field(gt=0)
    dimension: WindowDimension
    value: str
    # Whose calls it counts: the tenant for the dimensions named within a tenant (a
    # tenant's team "search" and another's are two series; a key and the tenant itself
    # too, for their alerts' sake), "" for model and provider (every tenant's calls).
    tenant: str = ""
    window_start: UtcDatetime
    window_end: UtcDatetime
    partitions: tuple[int, ...]
    requests: int = Field(ge=0)
    errors: int = Field(ge=0)  # calls whose status is not "ok"
    errors_by_class: dict[str, int] = Field(default_factory=dict)  # error_class or status
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cached_input_tokens: int = Field(ge=0)
    cost: Decimal  # priced calls only; see unpriced
    unpriced: int = Field(ge=0)  # calls with no price (their cost is unknown, not 0)
    usage_missing: int = Field(ge=0)
    late_events: int = Field(default=0, ge=0)  # arrived after their window had closed
    latency_ms: SketchState
    ttft_ms: SketchState

    @property
    def series(self) -> str:
        """The key of this window's series: size, dimension, tenant and value."""
        return series_key(self.size_s, self.dimension, self.tenant, self.value)
