"""The event contract's request, response, costed and window events (``llmtap.events``)
as msgspec structs: decoded ~10x faster than pydantic validates them, built without
validation, and encoded to JSON the models read as the same event (a usage count at its
default is left out, where pydantic writes it).

The high-volume stages use these: the ingress builds and writes the request and
response events of every call (ingress/forward/call.py; ~13 us a call instead of ~25),
the stream's cost stage reads every response event and writes every costed one
(stream/agents/costs.py), its windows step builds and writes every window (a few for
every ten calls with a thousand users), the spikes stage reads them, and the ClickHouse
writer reads every costed event (bench/results/ingest.md, bench/results/stream.md).
Everything else (tests, tools, the ingress's own attribution and usage until they go
into an event) uses the pydantic models, which stay the contract.

These mirror them field for field: same names, defaults, literals and bounds, unknown
fields refused, timestamps timezone-aware UTC. tests/test_wire.py holds them to it:
events of every shape the models produce decode to the same ``calls`` row both ways,
each kind of bad message the models refuse is refused here too (the writer sends it to
the dead letters), and what these encode the models read back as the same event.

Decoding is lax as pydantic's is (``strict=False``: a number sent as a string is read as
the number), so a message the contract accepts is not refused for its spelling.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from llmtap import events
from llmtap.events import Status

# The call times every stage can count and the store can hold (ClickHouse's DateTime:
# 1970 to 2106-02-07). A call timed outside them (an ingress with a broken clock) is
# dead-lettered by the writer and left out of the stream's windows and budgets, whose
# date arithmetic overflows near the calendar's ends.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2106, 2, 7, tzinfo=UTC)


def countable(*stamps: datetime) -> bool:
    """Whether every one of ``stamps`` is within EARLIEST and LATEST."""
    return all(EARLIEST <= ts < LATEST for ts in stamps)


Tokens = Annotated[int, msgspec.Meta(ge=0)]
Millis = Annotated[float, msgspec.Meta(ge=0, le=events.MAX_DURATION_MS)]  # finite
SketchSum = Annotated[float, msgspec.Meta(ge=0, le=events.MAX_SKETCH_SUM_MS)]  # finite
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Geo = Annotated[str, msgspec.Meta(pattern=events.GEO_PATTERN)]
Tier = Annotated[str, msgspec.Meta(pattern=events.TIER_PATTERN)]
ZERO = timedelta(0)

# The costed event's structs are made with gc=False: a decoded event is a tree of
# values, never part of a reference cycle, so the garbage collector need not track
# (and traverse) the ~100,000 of them a writer batch makes: decoding ~4.4 -> ~3.8 us.


class Attribution(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    tenant: str = ""
    team: str = ""
    user: str = ""
    feature: str = ""
    env: str = ""
    key_id: str = ""
    properties: dict[str, str] = msgspec.field(default_factory=dict)


class AdvisorUsage(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, omit_defaults=True
):
    model: str
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    cache_creation_input_tokens: Tokens = 0
    cache_creation_1h_input_tokens: Tokens = 0


# Its counts are written only when not their defaults (most are 0 for most calls): an
# event whose call used nothing a later field counts reads the same to a reader from
# before that field (web_search_preview_requests, say; speed, written only for a call
# served in fast mode; inference_geo, only for one not served "global"; service_tier,
# only for one not served at the standard tier), which refuses fields it does not
# know, so a rolling upgrade loses no call that does not use it. (msgspec tells a str default by
# identity: inference_geo "global" read from JSON that wrote it is written again.
# llmtap's producers never write it: the ingress's is the default itself.)
class Usage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, omit_defaults=True):
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    cache_creation_input_tokens: Tokens = 0
    cache_creation_1h_input_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    usage_missing: bool = False
    output_tokens_counted: bool = False
    web_search_requests: Tokens = 0
    web_search_preview_requests: Tokens = 0
    speed: events.Speed = "standard"
    advisor: tuple[AdvisorUsage, ...] = ()
    inference_geo: Geo = events.GLOBAL_GEO
    service_tier: Tier = events.STANDARD_TIER


def attribution_of(a: events.Attribution) -> Attribution:
    return Attribution(a.tenant, a.team, a.user, a.feature, a.env, a.key_id, a.properties)


def usage_of(u: events.Usage) -> Usage:
    return Usage(
        u.input_tokens,
        u.output_tokens,
        u.cached_input_tokens,
        u.cache_creation_input_tokens,
        u.cache_creation_1h_input_tokens,
        u.reasoning_tokens,
        u.usage_missing,
        u.output_tokens_counted,
        u.web_search_requests,
        u.web_search_preview_requests,
        u.speed,
        tuple(
            AdvisorUsage(
                a.model,
                a.input_tokens,
                a.output_tokens,
                a.cached_input_tokens,
                a.cache_creation_input_tokens,
                a.cache_creation_1h_input_tokens,
            )
            for a in u.advisor
        ),
        u.inference_geo,
        u.service_tier,
    )


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, gc=False):
    schema_version: Literal[1] = 1
    kind: Literal["request"] = "request"
    event_id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)  # as the model's
    request_id: uuid.UUID
    ts: Timestamp
    provider: str
    endpoint: str
    model_requested: str
    stream: bool
    request_bytes: Tokens
    max_tokens: int | None = None
    attribution: Attribution = msgspec.field(default_factory=Attribution)

    def __post_init__(self) -> None:
        if self.ts.utcoffset() != ZERO:
            raise ValueError("timestamps must be timezone-aware UTC")


class Response(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    request_id: uuid.UUID
    ts_start: Timestamp
    ts_end: Timestamp
    provider: str
    endpoint: str
    model_requested: str
    stream: bool
    status: Status
    http_status: Annotated[int, msgspec.Meta(ge=0, le=999)]
    usage: Usage
    latency_ms: Millis
    proxy_overhead_ms: Millis
    schema_version: Literal[1] = 1
    kind: Literal["response"] = "response"
    event_id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)  # as the model's
    model_served: str = ""
    error_class: str = ""
    ttft_ms: Millis | None = None
    attribution: Attribution = msgspec.field(default_factory=Attribution)

    def __post_init__(self) -> None:
        if self.ts_start.utcoffset() != ZERO or self.ts_end.utcoffset() != ZERO:
            raise ValueError("timestamps must be timezone-aware UTC")

    @property
    def model(self) -> str:
        return self.model_served or self.model_requested


class Cost(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal
    total: Decimal
    web_search: Decimal = Decimal(0)


class CostedEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    event_id: uuid.UUID
    response: Response
    cost: Cost | None
    unpriced: bool
    schema_version: Literal[1] = 1
    kind: Literal["costed"] = "costed"
    pricing_model: str = ""


class Sketch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    v: Literal[1] = 1
    relative_accuracy: Annotated[float, msgspec.Meta(gt=0, lt=1)]
    zero_count: Tokens
    keys: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()
    count: Tokens
    sum: SketchSum = 0.0
    min: Millis | None = None
    max: Millis | None = None


class Window(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    schema_version: Literal[1] = 1
    kind: Literal["window"] = "window"
    event_id: uuid.UUID
    size_s: Annotated[int, msgspec.Meta(gt=0)]
    dimension: events.WindowDimension
    value: str
    tenant: str = ""
    window_start: Timestamp
    window_end: Timestamp
    partitions: tuple[int, ...]
    requests: Tokens
    errors: Tokens
    errors_by_class: dict[str, int] = msgspec.field(default_factory=dict)
    input_tokens: Tokens
    output_tokens: Tokens
    cached_input_tokens: Tokens
    cost: Decimal
    unpriced: Tokens
    usage_missing: Tokens
    late_events: Tokens = 0
    latency_ms: Sketch
    ttft_ms: Sketch

    def __post_init__(self) -> None:
        if self.window_start.utcoffset() != ZERO or self.window_end.utcoffset() != ZERO:
            raise ValueError("timestamps must be timezone-aware UTC")

    @property
    def series(self) -> str:
        """The key of this window's series: size, dimension, tenant and value."""
        return events.series_key(self.size_s, self.dimension, self.tenant, self.value)


# Either spelling of an event: the same fields, read the same way.
Responded = events.ResponseEvent | Response
Costed = events.CostedEvent | CostedEvent

_costed = msgspec.json.Decoder(CostedEvent, strict=False)
_response = msgspec.json.Decoder(Response, strict=False)
_window = msgspec.json.Decoder(Window, strict=False)
_encoder = msgspec.json.Encoder()


def decode_costed(raw: bytes) -> CostedEvent:
    """One costed event from its JSON; :class:`msgspec.ValidationError` (or
    :class:`msgspec.DecodeError` for bytes that are not JSON) says why it is not one."""
    return _costed.decode(raw)


def decode_response(raw: bytes) -> Response:
    """One response event from its JSON; raises as :func:`decode_costed` does."""
    return _response.decode(raw)


def decode_window(raw: bytes) -> Window:
    """One window from its JSON; raises as :func:`decode_costed` does."""
    return _window.decode(raw)


def encode(event: Request | Response | CostedEvent | Window | Sketch) -> bytes:
    """The event's JSON, as the contract's model reads it (decimals as strings,
    timestamps in RFC 3339)."""
    return _encoder.encode(event)
