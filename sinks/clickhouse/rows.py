"""Pure mapping from costed events to ``calls`` rows and from windows to ``windows``
rows. No Kafka, no ClickHouse here."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from llmtap import wire
from llmtap.events import UINT32_MAX
from llmtap.wire import Costed
from stream.aggregates import sketch_of
from stream.pricing import largest_count

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)

CALLS_COLUMNS = (
    "event_id",
    "request_id",
    "schema_version",
    "ts_start",
    "ts_end",
    "tenant",
    "team",
    "user",
    "feature",
    "env",
    "key_id",
    "properties",
    "provider",
    "endpoint",
    "model",
    "model_requested",
    "stream",
    "status",
    "http_status",
    "error_class",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
    "usage_missing",
    "output_tokens_counted",
    "web_search_requests",
    "speed",
    "service_tier",
    "inference_geo",
    "latency_ms",
    "ttft_ms",
    "proxy_overhead_ms",
    "cost_input",
    "cost_cached_input",
    "cost_cache_write",
    "cost_output",
    "cost_reasoning",
    "cost_web_search",
    "cost_total",
    "unpriced",
    "pricing_model",
)

DEAD_LETTER_COLUMNS = ("ts", "topic", "partition", "offset", "raw", "error")


def ticks(ts: datetime) -> int:
    """A ``DateTime64(3)`` value as the insert sends it: whole milliseconds since the
    epoch (truncated, exactly: no float on the way)."""
    return (ts - EPOCH) // MILLISECOND


def from_ticks(ms: int) -> datetime:
    return EPOCH + ms * MILLISECOND


NO_COST = (None,) * 7  # an unpriced call's money columns


def _money(amount: Decimal | None) -> str:
    """An amount as ClickHouse reads it into Decimal(18, 9): its str, but "0" for a zero
    or an amount below a nano-dollar (what ClickHouse cuts it to). It parsed a zero
    spelled with an exponent past 9 ("0E+10", which Decimal arithmetic can make), and an
    amount whose exponent is long (1E-9999999999999: the contract takes any decimal), as
    no number, and stored the priced call's costs NULL."""
    return str(amount) if amount and amount.adjusted() > -10 else "0"


def call_row(event: Costed) -> tuple[Any, ...]:
    """One ``calls`` row, in CALLS_COLUMNS order, of plain values: what the insert's
    encoder takes without converting them again (sql/native.py), and cheap to pickle
    (a UUID or a Decimal costs ~10x a str to pickle). The event id as its str (the
    duplicate check binds it so; made by msgspec in C: ``str`` of a UUID is ~0.5-1 us
    of Python), the request id as its int, times as :func:`ticks`,
    money as the str of its Decimal (sent as this text, parsed by ClickHouse: exact,
    write.calls_types), :func:`_money`."""
    r = event.response
    a = r.attribution
    u = r.usage
    c = event.cost
    money = (
        NO_COST
        if c is None
        else (
            _money(c.input),
            _money(c.cached_input),
            _money(c.cache_write),
            _money(c.output),
            _money(c.reasoning),
            _money(c.web_search),
            _money(c.total),
        )
    )
    return (
        msgspec.to_builtins(event.event_id),
        r.request_id.int,
        event.schema_version,
        ticks(r.ts_start),
        ticks(r.ts_end),
        a.tenant,
        a.team,
        a.user,
        a.feature,
        a.env,
        a.key_id,
        a.properties,
        r.provider,
        r.endpoint,
        r.model,
        r.model_requested,
        r.stream,
        r.status,
        r.http_status,
        r.error_class,
        u.input_tokens,
        u.output_tokens,
        u.cached_input_tokens,
        u.cache_creation_input_tokens,
        u.reasoning_tokens,
        u.usage_missing,
        u.output_tokens_counted,
        u.web_search_requests,
        u.speed,
        u.service_tier,
        u.inference_geo,
        r.latency_ms,
        r.ttft_ms,
        r.proxy_overhead_ms,
        *money,
        event.unpriced,
        event.pricing_model,
    )


# What ``calls`` holds narrower than the contract: token counts as UInt32 (UINT32_MAX;
# the contract bounds them below only, and the ingress records none past it). An event
# past it would fail every insert of its batch.
UINT16_MAX = 2**16 - 1
UINT64_MAX = 2**64 - 1
MONEY_LIMIT = Decimal(10**9)  # Decimal(18, 9): nine digits before the point


def _unstorable_money(value: Decimal) -> str:
    """Why a Decimal(18, 9) column cannot hold ``value`` ("" if it can: ClickHouse
    would store NULL, or nothing, for the rest, and no error said so)."""
    if not value.is_finite() or value.copy_abs() >= MONEY_LIMIT:  # exact: no rounding
        return f"an amount of {value} is more than Decimal(18, 9) holds"
    return ""


# The times a call or window may have: what a DateTime holds (the rollups' buckets;
# ``calls``' DateTime64(3) holds 1900-2299). Outside it, the rollups store a clamped
# time, and the writer's duplicate check binds one ClickHouse refuses (before year
# 1000) or cannot make (year 1): its batch failed every write, the writer stuck on it.
def _unstorable_time(*stamps: datetime) -> str:
    for ts in stamps:
        if not wire.countable(ts):
            return f"a time of {ts.isoformat()} is out of what the store holds (1970-2106)"
    return ""


def unstorable(event: Costed) -> str:
    """Why ``calls`` cannot hold the event ("" if it can): a dead letter, not a batch
    the store refuses again and again, nor a cost stored as unknown."""
    r = event.response
    if problem := _unstorable_time(r.ts_start, r.ts_end):
        return problem
    most = largest_count(r.usage)
    if most > UINT32_MAX:
        return f"a token or search count of {most} is more than calls holds (UInt32)"
    c = event.cost
    if c is not None:
        amounts = (
            c.input,
            c.cached_input,
            c.cache_write,
            c.output,
            c.reasoning,
            c.total,
            c.web_search,
        )
        # The usual case, every amount finite and within, in three loops in C (finite
        # amounts compare exactly and never signal, whatever the decimal context).
        finite = all(map(Decimal.is_finite, amounts))
        if finite and -MONEY_LIMIT < min(amounts) and max(amounts) < MONEY_LIMIT:
            return ""
        for amount in amounts:  # which one, and why
            if problem := _unstorable_money(amount):
                return f"cost: {problem}"
    return ""


def window_unstorable(window: wire.Window) -> str:
    """Why ``windows`` cannot hold the window ("" if it can): as :func:`unstorable`,
    a dead letter, not a batch that stops the writer for good."""
    if problem := _unstorable_time(window.window_start, window.window_end):
        return problem
    try:  # its sketches read, and their quantiles, as the write makes its row
        sketch_of(window.latency_ms).quantiles()
        sketch_of(window.ttft_ms).quantiles()
    except (ValueError, TypeError, IndexError, ArithmeticError, MemoryError) as exc:
        return f"its sketches cannot be read: {exc!r}"
    counts = (
        window.requests,
        window.errors,
        window.input_tokens,
        window.output_tokens,
        window.cached_input_tokens,
        window.unpriced,
        window.usage_missing,
        window.late_events,
        *window.errors_by_class.values(),
    )
    if any(not 0 <= count <= UINT64_MAX for count in counts):
        return "a count is negative or more than windows holds (UInt64)"
    if any(not 0 <= p <= UINT16_MAX for p in window.partitions):
        return "a partition number is more than windows holds (UInt16)"
    if window.size_s > UINT32_MAX:
        return f"a window of {window.size_s}s is more than windows holds (UInt32)"
    if problem := _unstorable_money(window.cost):
        return f"cost: {problem}"
    return ""


def call_columns(events: Iterable[Costed]) -> list[tuple[Any, ...]]:
    """The ``calls`` columns of events (CALLS_COLUMNS order): rows, transposed in C."""
    return list(zip(*map(call_row, events), strict=True))


EVENT_ID = CALLS_COLUMNS.index("event_id")
TS_END = CALLS_COLUMNS.index("ts_end")


def ts_end_range(columns: list[tuple[Any, ...]]) -> tuple[int, int]:
    """The earliest and latest ``ts_end`` of ``calls`` columns, as ticks."""
    return (min(columns[TS_END]), max(columns[TS_END])) if columns else (0, 0)


WINDOWS_COLUMNS = (
    "event_id",
    "schema_version",
    "size_s",
    "dimension",
    "value",
    "tenant",
    "window_start",
    "window_end",
    "partitions",
    "requests",
    "errors",
    "errors_by_class",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost",
    "unpriced",
    "usage_missing",
    "late_events",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
    "latency_sketch",
    "ttft_sketch",
)


def window_row(window: wire.Window) -> tuple[Any, ...]:
    latency = sketch_of(window.latency_ms).quantiles()
    ttft = sketch_of(window.ttft_ms).quantiles()
    return (
        window.event_id,
        window.schema_version,
        window.size_s,
        window.dimension,
        window.value,
        window.tenant,
        window.window_start,
        window.window_end,
        list(window.partitions),
        window.requests,
        window.errors,
        window.errors_by_class,
        window.input_tokens,
        window.output_tokens,
        window.cached_input_tokens,
        window.cost,
        window.unpriced,
        window.usage_missing,
        window.late_events,
        *latency,
        *ttft,
        wire.encode(window.latency_ms).decode(),
        wire.encode(window.ttft_ms).decode(),
    )


WINDOW_ID = WINDOWS_COLUMNS.index("event_id")
WINDOW_START = WINDOWS_COLUMNS.index("window_start")
