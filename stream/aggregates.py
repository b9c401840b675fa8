"""What a window counts: the calls of one series in one window, as an :class:`Aggregate`
(sums, error classes, and latency and time-to-first-token distributions binned as the
DDSketch bins them, ``stream.sketches.Tally``), and a window's shares merged into one.

What a call adds is read from its event once (:class:`Call`); an aggregate adds calls
one by one, and merges with another aggregate exactly (sums add, bins add), which is
how larger windows are made of smaller ones and several workers' shares of one window
make the whole window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import msgspec

from llmtap import wire
from llmtap.events import WindowDimension, of_tenant, stable_id
from llmtap.wire import Costed
from stream.sketches import LatencySketch, Tally, bin_of

# (dimension, tenant, value), e.g. ("team", "acme", "search"); the tenant is "" for the
# dimensions counted over every tenant (model, provider).
Series = tuple[WindowDimension, str, str]


def dimension_values(event: Costed) -> tuple[Series, ...]:
    """The dimension values a call is counted under: teams, users and features are
    named within a tenant (two tenants' team "search" are two teams), keys belong to
    one; models and providers are every tenant's."""
    r = event.response
    a = r.attribution
    tenant = a.tenant
    return (
        ("tenant", tenant, tenant),
        ("team", tenant, a.team),
        ("key", tenant, a.key_id),
        ("user", tenant, a.user),
        ("model", "", r.model),
        ("provider", "", r.provider),
        ("feature", tenant, a.feature),
    )


def _sketch_state(tally: Tally) -> wire.Sketch:
    state = tally.to_dict()
    return wire.Sketch(**{**state, "keys": tuple(state["keys"]), "counts": tuple(state["counts"])})


def sketch_of(state: wire.Sketch) -> LatencySketch:
    return LatencySketch.from_dict(msgspec.structs.asdict(state))


@dataclass(slots=True)
class Call:
    """What one call adds to each window it counts in, read from its event once."""

    error_class: str | None  # None: not an error
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost: Decimal | None
    unpriced: bool
    usage_missing: bool
    latency_ms: float
    latency_bin: int | None
    ttft_ms: float | None
    ttft_bin: int | None

    @classmethod
    def of(cls, event: Costed) -> Call:
        r = event.response
        u = r.usage
        return cls(
            error_class=error_class_of(r.status, r.error_class),
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cached_input_tokens=u.cached_input_tokens,
            cost=None if event.cost is None else event.cost.total,
            unpriced=event.unpriced,
            usage_missing=u.usage_missing,
            latency_ms=r.latency_ms,
            latency_bin=bin_of(r.latency_ms),
            ttft_ms=r.ttft_ms,
            ttft_bin=None if r.ttft_ms is None else bin_of(r.ttft_ms),
        )


# Calls llmtap's guards refused by design (a key's rate limit, a hard-capped budget spent:
# the provider never asked): not failures of the service, nor calls it served. Each is
# its own error class in a window, named by its status, which an error rate leaves out
# (stream/detector.py), so a tenant reaching its cap pages no one.
GUARDED = ("rate_limited", "budget_exceeded")


def error_class_of(status: str, error_class: str) -> str | None:
    """A call's error class in a window: None for a call that succeeded, else the
    provider's error type or llmtap's code, or the status when it has neither. A
    provider's error type that reads as a guard's (an upstream gateway's
    ``budget_exceeded``) is prefixed with its status, so that it counts as the failure it
    is, not as a call llmtap's own guards refused."""
    if status == "ok":
        return None
    klass = error_class or status
    if klass in GUARDED and status not in GUARDED:
        return f"{status}:{klass}"
    return klass


@dataclass(slots=True)
class Aggregate:
    """What one window of one dimension value has counted so far."""

    requests: int = 0
    errors: int = 0
    errors_by_class: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost: Decimal = Decimal(0)
    unpriced: int = 0
    usage_missing: int = 0
    late_events: int = 0
    latency: Tally = field(default_factory=Tally)
    ttft: Tally = field(default_factory=Tally)

    def add(self, call: Call) -> None:
        self.requests += 1
        if call.error_class is not None:
            self.errors += 1
            self.errors_by_class[call.error_class] += 1
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        self.cached_input_tokens += call.cached_input_tokens
        if call.cost is not None:
            self.cost += call.cost
        self.unpriced += call.unpriced
        self.usage_missing += call.usage_missing
        self.latency.add(call.latency_ms, call.latency_bin)
        if call.ttft_ms is not None:
            self.ttft.add(call.ttft_ms, call.ttft_bin)

    def copy(self) -> Aggregate:
        twin = Aggregate()
        twin.merge(self)
        return twin

    def merge(self, other: Aggregate) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.errors_by_class.update(other.errors_by_class)
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cost += other.cost
        self.unpriced += other.unpriced
        self.usage_missing += other.usage_missing
        self.late_events += other.late_events
        self.latency.merge(other.latency)
        self.ttft.merge(other.ttft)

    @classmethod
    def of(cls, window: wire.Window) -> Aggregate:
        return cls(
            requests=window.requests,
            errors=window.errors,
            errors_by_class=Counter(window.errors_by_class),
            input_tokens=window.input_tokens,
            output_tokens=window.output_tokens,
            cached_input_tokens=window.cached_input_tokens,
            cost=window.cost,
            unpriced=window.unpriced,
            usage_missing=window.usage_missing,
            late_events=window.late_events,
            latency=Tally.from_dict(msgspec.structs.asdict(window.latency_ms)),
            ttft=Tally.from_dict(msgspec.structs.asdict(window.ttft_ms)),
        )

    def to_event(
        self,
        series: Series,
        start: datetime,
        size: timedelta,
        partitions: Iterable[int],
    ) -> wire.Window:
        """The window's event, built without validation (what it is built from was
        checked when counted; tests/test_wire.py holds the two spellings together)."""
        dimension, tenant, value = series
        owned = tuple(sorted(set(partitions)))
        size_s = int(size.total_seconds())
        return wire.Window(
            event_id=stable_id(
                *of_tenant("window", tenant),
                str(size_s),
                dimension,
                value,
                start.isoformat(),
                ",".join(map(str, owned)),
            ),
            size_s=size_s,
            dimension=dimension,
            value=value,
            tenant=tenant,
            window_start=start,
            window_end=start + size,
            partitions=owned,
            requests=self.requests,
            errors=self.errors,
            errors_by_class=dict(sorted(self.errors_by_class.items())),
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_input_tokens=self.cached_input_tokens,
            cost=self.cost,
            unpriced=self.unpriced,
            usage_missing=self.usage_missing,
            late_events=self.late_events,
            latency_ms=_sketch_state(self.latency),
            ttft_ms=_sketch_state(self.ttft),
        )


def merge_windows(shares: Sequence[wire.Window]) -> wire.Window:
    """One window from the shares several workers published of it (same series and
    bounds; each share counted the calls of different partitions)."""
    first = shares[0]
    total = Aggregate.of(first)
    for share in shares[1:]:
        if (share.series, share.window_start) != (first.series, first.window_start):
            raise ValueError("only shares of the same window merge")
        total.merge(Aggregate.of(share))
    partitions = {p for share in shares for p in share.partitions}
    return total.to_event(
        (first.dimension, first.tenant, first.value),
        first.window_start,
        timedelta(seconds=first.size_s),
        partitions,
    )
