"""Tumbling windows per dimension: pure aggregation, closed by an event-time watermark.

A call counts in the window that holds its end (``ts_end``, UTC), for each of the
dimensions tenant, team, key, user, model, provider and feature. Windows are aligned
to the Unix epoch, so every worker cuts the same windows.

Only the smallest window length is aggregated call by call (what a call adds is read
from it once, :class:`Call`, and its durations binned once for the sketches,
``stream.sketches.Tally``); a larger one (an hour) is
the merge of the closed smaller windows it is made of (sums add, sketches merge
exactly), so a call costs seven updates whatever the number of window lengths.

**When a window closes.** The watermark is the latest call end seen minus the grace
period: a window closes once its end is at or before the watermark, i.e. once calls
``grace`` past its end have been seen. While no call arrives for ``grace`` of wall
time the watermark follows the wall clock instead (now minus grace), so a quiet
series still closes its windows on time. A worker catching up on a backlog replays
the calls in order and closes windows as their event time passes, not all at once.

**Late calls.** A call whose window has already closed is not added to it (the
window was published once and stays as published); it is counted, and the count rides
on the next window its dimension values publish (``late_events``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from llmtap.events import SketchState, WindowDimension, WindowEvent, stable_id
from llmtap.wire import Costed
from stream.sketches import LatencySketch, Tally, bin_of

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Series = tuple[WindowDimension, str]  # (dimension, value), e.g. ("team", "search")


def dimension_values(event: Costed) -> tuple[Series, ...]:
    """The dimension values a call is counted under."""
    r = event.response
    a = r.attribution
    return (
        ("tenant", a.tenant),
        ("team", a.team),
        ("key", a.key_id),
        ("user", a.user),
        ("model", r.model),
        ("provider", r.provider),
        ("feature", a.feature),
    )


def window_start(at: datetime, size: timedelta) -> datetime:
    """The start of the epoch-aligned window of length ``size`` that holds ``at``."""
    return at - (at - EPOCH) % size


def _sketch_state(tally: Tally) -> SketchState:
    return SketchState.model_validate(tally.to_dict())


def sketch_of(state: SketchState) -> LatencySketch:
    return LatencySketch.from_dict(state.model_dump())


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
            error_class=None if r.status == "ok" else (r.error_class or r.status),
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
    def of(cls, window: WindowEvent) -> Aggregate:
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
            latency=Tally.from_dict(window.latency_ms.model_dump()),
            ttft=Tally.from_dict(window.ttft_ms.model_dump()),
        )

    def to_event(
        self,
        series: Series,
        start: datetime,
        size: timedelta,
        partitions: Iterable[int],
    ) -> WindowEvent:
        dimension, value = series
        owned = tuple(sorted(set(partitions)))
        size_s = int(size.total_seconds())
        return WindowEvent(
            event_id=stable_id(
                "window",
                str(size_s),
                dimension,
                value,
                start.isoformat(),
                ",".join(map(str, owned)),
            ),
            size_s=size_s,
            dimension=dimension,
            value=value,
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


def merge_windows(shares: Sequence[WindowEvent]) -> WindowEvent:
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
        (first.dimension, first.value),
        first.window_start,
        timedelta(seconds=first.size_s),
        partitions,
    )


class Windower:
    """The open windows of one worker, closed as the watermark passes them."""

    def __init__(self, sizes_s: Sequence[int], grace: timedelta) -> None:
        sizes = sorted({timedelta(seconds=s) for s in sizes_s})
        if not sizes or any(size % sizes[0] for size in sizes):
            raise ValueError("window lengths must be multiples of the smallest")
        self.base = sizes[0]
        self.larger = sizes[1:]
        self.grace = grace
        self.watermark: datetime | None = None
        self.late_events = 0  # in all, since start
        self._open: dict[tuple[Series, datetime], Aggregate] = {}
        self._rollups: dict[tuple[timedelta, Series, datetime], Aggregate] = {}
        self._late: Counter[Series] = Counter()
        self._latest_event: datetime | None = None
        self._last_arrival: datetime | None = None
        self._current = (EPOCH, EPOCH)  # the base window of the last call added

    def add(self, event: Costed, now: datetime) -> bool:
        """Count a call in its windows; False (and counted as late) if they closed."""
        at = event.response.ts_end
        start, end = self._current
        if not start <= at < end:  # calls mostly come in order: the same window again
            start = window_start(at, self.base)
            self._current = (start, start + self.base)
        self._last_arrival = now
        if self.watermark is not None and start + self.base <= self.watermark:
            self.late_events += 1
            self._late.update(dimension_values(event))
            return False
        call = Call.of(event)
        windows = self._open
        for series in dimension_values(event):
            key = (series, start)
            aggregate = windows.get(key)
            if aggregate is None:
                aggregate = windows[key] = Aggregate()
            aggregate.add(call)
        if self._latest_event is None or at > self._latest_event:
            self._latest_event = at
        return True

    def advance(self, now: datetime, partitions: Iterable[int]) -> list[WindowEvent]:
        """Move the watermark and return the windows it closed, oldest end first.

        ``partitions`` are the partitions whose calls this worker counts (named on
        every window it publishes).
        """
        marks = [] if self.watermark is None else [self.watermark]
        if self._latest_event is not None:
            marks.append(self._latest_event - self.grace)
        if self._last_arrival is None or now - self._last_arrival >= self.grace:
            marks.append(now - self.grace)
        self.watermark = max(marks)
        owned = tuple(partitions)
        closed: list[tuple[datetime, timedelta, WindowEvent]] = []
        for key in [k for k in self._open if k[1] + self.base <= self.watermark]:
            series, start = key
            aggregate = self._open.pop(key)
            aggregate.late_events += self._late.pop(series, 0)
            end = start + self.base
            closed.append((end, self.base, aggregate.to_event(series, start, self.base, owned)))
            for size in self.larger:
                outer = (size, series, window_start(start, size))
                into = self._rollups.get(outer)
                if into is None:
                    self._rollups[outer] = aggregate
                else:
                    into.merge(aggregate)
        for outer in [k for k in self._rollups if k[2] + k[0] <= self.watermark]:
            size, series, start = outer
            aggregate = self._rollups.pop(outer)
            closed.append((start + size, size, aggregate.to_event(series, start, size, owned)))
        closed.sort(key=lambda c: (c[0], c[1]))
        return [window for _, _, window in closed]

    @property
    def open_windows(self) -> int:
        return len(self._open) + len(self._rollups)
