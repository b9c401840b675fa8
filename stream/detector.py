"""From closed windows to spike alerts: gather a window's shares, then judge it.

Windows arrive on the windows topic keyed by series, so every share of one series
reaches the same detector. A window comes as one share per partition of
``llmtap.responses`` that had calls in it, and is judged when the shares cover every
partition, or ``settle`` after its first share arrived (a partition with no calls of
that series in the window has no share), or at a stop after which nothing judges it
(:meth:`Detector.judge_waiting`). A series' windows are judged in order: one
complete early waits for the earlier ones to be judged (a baseline learns from them,
and a window judged after a later one would be ignored). A share that arrives after
its window was judged still reaches ClickHouse (the sink stores every share) but does
not re-judge it.

The detector's event time, by which a series is found quiet, is the latest window
judged, each window no further than the detector's clock allowed when it was judged
(its end at most ``stream.windows.ALLOWED_SKEW`` past it): a window ending ahead of the
clock (counted by a worker whose clock, or whose calls' ingress's, runs ahead) is
judged, but moves it no further.

The statistics are in :mod:`stream.spikes`; this module only feeds them.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from llmtap.config_sections import SpikeMetric, SpikeRule
from llmtap.events import Alert, series_key
from llmtap.wire import Window
from stream.aggregates import GUARDED, merge_windows, sketch_of
from stream.spikes import SeriesState, horizon, observe, quiet_span, went_quiet
from stream.windows import ALLOWED_SKEW

MS = Decimal("0.001")
TICK_S = 1.0  # how often windows still waiting for shares are looked at again
SWEEP_EVERY = timedelta(minutes=1)
# A firing series went quiet when others of its window length are this many windows
# past its quiet_span (one more than it takes: a share fetched late from another
# partition): 3 windows for a count.
QUIET_AFTER = 3

StateKey = tuple[str, str, str]  # a series as one rule judges it: (rule, tenant, value)


def error_rate(window: Window) -> tuple[int, int]:
    """A window's failed calls and the calls they are out of, for its error rate: calls
    the guards refused by design (classes ``GUARDED``) are in neither. Calls their caller
    broke off stay failures: a provider that hangs shows as clients giving up."""
    guarded = sum(window.errors_by_class.get(name, 0) for name in GUARDED)
    return window.errors - guarded, window.requests - guarded


def metric_value(metric: SpikeMetric, window: Window, min_requests: int = 1) -> Decimal | None:
    """The value a rule's metric takes in a window; None when it has none (no latency
    measured, no calls for an error rate, no cost known but $0), as an error rate or a
    p95 latency of fewer than ``min_requests`` calls has none (1 of 1 failed is no 100%
    error rate)."""
    if metric == "error_rate":
        failed, out_of = error_rate(window)
        if out_of < min_requests or out_of <= 0:
            return None
        return Decimal(failed) / Decimal(out_of)
    if metric == "p95_latency":
        # Of the calls the guards let through: those refused (a tenant at its hard cap)
        # answered in well under a millisecond, the fastest of the window's, and never
        # reached the provider. Their latency is no more the service's than their errors.
        _, served = error_rate(window)
        if served < min_requests or served <= 0:
            return None
        # The guarded calls are the lowest of the sketch: the p95 of the rest is there.
        guarded = window.requests - served
        quantile = 0.95 if not guarded else 1 - 0.05 * served / window.requests
    else:
        quantile = 0.95
    if metric == "cost":
        # None when the window's calls of known cost cost nothing and others' cost is
        # unknown (a model not priced yet, usage unknown; its errors, known at $0): a
        # cost of $0 to learn from, and a spike once the model is priced.
        unknown = window.unpriced + window.usage_missing
        return None if unknown and not window.cost else window.cost
    if metric == "requests":
        return Decimal(window.requests)
    if metric == "tokens":
        return Decimal(window.input_tokens + window.output_tokens)
    p95 = sketch_of(window.latency_ms).quantile(quantile)
    return None if p95 is None else Decimal(repr(p95)).quantize(MS)


@dataclass
class _Pending:
    received: datetime  # wall time of the first share
    shares: dict[uuid.UUID, Window] = field(default_factory=dict)
    home: int | None = None  # the windows topic's partition the series comes on

    def covers(self, partitions: int) -> bool:
        seen = {p for share in self.shares.values() for p in share.partitions}
        return seen >= set(range(partitions))


class Detector:
    """Spike rules over the windows of one or more workers."""

    def __init__(self, rules: list[SpikeRule], partitions: int, settle: timedelta) -> None:
        self._rules: dict[tuple[int, str], list[SpikeRule]] = defaultdict(list)
        for rule in rules:
            self._rules[(rule.window_s, rule.dimension)].append(rule)
        self._named = {rule.name: rule for rule in rules}
        self._partitions = partitions  # of llmtap.responses: one share of a window each
        self._settle = settle
        self._pending: dict[str, dict[datetime, _Pending]] = {}  # series -> start -> shares
        # When each window waiting for shares is judged without them (its first share's
        # arrival plus settle), soonest first, with its series: a tick looks at the series
        # of the windows due, not at every series waiting (~1.5 µs each: 145 ms a second
        # with 100,000 users' windows waiting out their settle). Those judged sooner (whole)
        # are passed over when due. And the order series came to wait in, in which a tick
        # judges them.
        self._due: list[tuple[datetime, int, str]] = []
        self._waiting_since: dict[str, int] = {}
        self._count = itertools.count()
        self._all_due = False  # a window may be whole unoffered: the next tick looks at all
        self.states: dict[StateKey, SeriesState] = {}
        # The series this detector judges, or read back from its own partitions (a
        # warmup knows other workers' series too: :meth:`keep_only`, :meth:`give_up`),
        # with the windows partition each comes on: only those can it find quiet.
        self.judged: dict[StateKey, int | None] = {}
        self._away: set[int] = set()  # windows partitions given up
        # The windows partitions of this worker not read yet up to where they ended when
        # it was given them (:meth:`catching_up`), each with that end once asked; None:
        # not told yet which are its own (warmed at start, before the first assignment).
        # While any is, no series is found quiet.
        self.behind: dict[int, int | None] | None = {}
        self._swept: datetime | None = None
        # window length -> latest start judged, no further than the clock allowed
        self._latest: dict[int, datetime] = {}
        self.ahead_windows = 0  # judged ending over ALLOWED_SKEW past the clock, since start
        # Resolves of spike alerts open at start that nothing judges any more (a warm-up's:
        # stream/reconcile.py), for the stage to publish as it starts.
        self.restart_alerts: list[Alert] = []

    @property
    def partitions(self) -> int:
        return self._partitions

    @partitions.setter
    def partitions(self, count: int) -> None:
        """The responses topic's partitions: a window waiting may be whole with fewer."""
        if count != self._partitions:
            self._all_due = True
        self._partitions = count

    def _waiting(self, series: str) -> dict[datetime, _Pending]:
        """The series' windows waiting for shares (made waiting, if none was)."""
        windows = self._pending.get(series)
        if windows is None:
            windows = self._pending[series] = {}
            self._waiting_since[series] = next(self._count)
        return windows

    def _wait(self, series: str, pending: _Pending) -> None:
        """A window of ``series`` waits for its shares until ``settle`` after its first."""
        heapq.heappush(self._due, (pending.received + self._settle, next(self._count), series))

    def judges(self, size_s: int, dimension: str) -> bool:
        """Whether any rule looks at windows of this length and dimension."""
        return (size_s, dimension) in self._rules

    def offer(self, window: Window, now: datetime, home: int | None = None) -> list[Alert]:
        """Take one share of a window (that came on partition ``home`` of the windows
        topic); the alerts of any window this completes."""
        if not self.judges(window.size_s, window.dimension):
            return []
        series = self._waiting(window.series)
        pending = series.get(window.window_start)
        if pending is None:
            pending = series[window.window_start] = _Pending(received=now, home=home)
            self._wait(window.series, pending)
        pending.shares[window.event_id] = window  # a replayed share replaces itself
        return self._ready(window.series, now)

    @property
    def settle(self) -> timedelta:
        """How long after its first share a window is judged on the shares it has."""
        return self._settle

    def settled(self, series: str, now: datetime) -> list[Alert]:
        """Judge the series' windows complete or settled by ``now``: what the ticks up to
        then judged (a warm-up replaying windows by the times they were published)."""
        return self._ready(series, now) if series in self._pending else []

    def wait_from(self, now: datetime) -> None:
        """The windows still waiting for shares wait ``settle`` from ``now`` (a warm-up's
        end: their missing shares are past the committed offsets, still to be read)."""
        self._due = []
        for series, windows in self._pending.items():
            for pending in windows.values():
                pending.received = max(pending.received, now)
                self._wait(series, pending)

    def judge_waiting(self, now: datetime) -> list[Alert]:
        """Judge every window still waiting for shares on the shares it has, each series'
        oldest first, in the order the series came to wait: no more can come (a stop on
        a broker that keeps nothing over its restart, so no warm-up judges them later)."""
        alerts: list[Alert] = []
        for series in sorted(self._pending, key=self._waiting_since.__getitem__):
            windows = self._pending.pop(series)
            del self._waiting_since[series]
            for start in sorted(windows):
                alerts += self._judge(windows[start], now)
        self._due = []
        return alerts

    def give_up(self, partitions: set[int]) -> None:
        """The windows partitions another worker judges from now: their series are no
        longer this one's to find quiet (their states stay, until taken back), also when
        a window of theirs still pending here is judged (its offset was committed: its
        alerts are this worker's to raise)."""
        self._away |= partitions
        for key, home in list(self.judged.items()):
            if home in partitions:
                del self.judged[key]

    def keep_only(self, partitions: set[int]) -> None:
        """At the first assignment: the windows partitions not among ``partitions`` are
        another worker's (a detector warmed at start read every partition back)."""
        homes = set(self.judged.values())
        homes |= {p.home for windows in self._pending.values() for p in windows.values()}
        self.give_up({home for home in homes if home is not None} - partitions)

    def catching_up(self, held: set[int], given: set[int]) -> None:
        """At an assignment: this worker has windows partitions ``held``, ``given`` to it
        just now (at the first assignment, all). Until those and the ones held still
        behind are read up to where they end now (:meth:`read_up_to`), no series is
        found quiet. The event time is every partition's: a backlog read on one moves
        it on while another's windows wait to be read, and would find a series of that
        one quiet (resolved, then fired again by its next window)."""
        behind = {p for p in self.behind or () if p in held} | given
        self.behind = dict.fromkeys(behind)  # ends asked again: a log lost ends elsewhere
        if not behind:
            self._swept = None  # the next tick sweeps

    def read_up_to(self, partition: int, offset: int | None, end: int | None = None) -> None:
        """``partition`` is read up to ``offset`` (the next to read; None: not said);
        ``end``: where it ends, asked at an assignment. Read up to there, it is no longer
        behind."""
        if not self.behind or partition not in self.behind:
            return
        if end is not None:
            self.behind[partition] = end
        end = self.behind[partition]
        if end is not None and offset is not None and offset >= end:
            del self.behind[partition]
            if not self.behind:
                self._swept = None  # the next tick sweeps

    def adopt(self, taken: Detector | None, partitions: set[int]) -> None:
        """Take over ``partitions``, judged elsewhere until now: ``taken`` was warmed with
        their windows, judged by their previous owner; its states replace what this one
        knew (judged by it before it gave them up: a spike fired since would fire again,
        one resolved since stay firing). Its windows still waiting for shares wait here,
        for the shares still to come, and are judged here: the previous owner may have
        died with them pending (alive, it judges them too, and raises the same ids). None:
        they could not be read back."""
        self._away -= partitions
        if taken is None:
            return
        self.states.update(taken.states)
        self.judged.update(taken.judged)
        for series, windows in taken._pending.items():
            mine = self._waiting(series)
            for start, pending in windows.items():
                if start in mine:
                    mine[start].shares.update(pending.shares)
                    self._all_due = True  # whole now, maybe
                else:
                    mine[start] = pending
                    self._wait(series, pending)

    def tick(self, now: datetime) -> list[Alert]:
        """Judge the windows whose shares have had ``settle`` to arrive; once a minute,
        :meth:`sweep` too. The series looked at are those of the windows due (a series
        whose first window waiting is not due has nothing to judge: its whole windows
        were judged when their last share came, up to the first not whole), in the order
        they came to wait."""
        if self._all_due:
            self._all_due = False
            due = list(self._pending)
        else:
            found = set()
            while self._due and self._due[0][0] <= now:
                found.add(heapq.heappop(self._due)[2])
            due = sorted(found & self._pending.keys(), key=self._waiting_since.__getitem__)
        alerts = [alert for series in due for alert in self._ready(series, now)]
        if self._swept is None or now - self._swept >= SWEEP_EVERY:
            self._swept = now
            alerts += self.sweep()
        return alerts

    def sweep(self) -> list[Alert]:
        """Series that went quiet, in event time (a worker catching up on hours of
        windows judges them as they were): a firing one with no windows while other series
        of its length (judged here) went QUIET_AFTER windows past its quiet span is resolved
        (spikes.went_quiet); one idle past its rule's horizon is forgotten, so the
        states of a million one-off users do not pile up. The ``resolved`` is for the
        window after the series' last, so its next window, should it come late, raises
        the same id. A series of another worker's partition (given up, or read back at
        start from one this worker was not given) may be firing there: it is not resolved
        here (its next window here ends a quiet episode). Nor is any series while a
        partition of this worker is not read yet up to where it ended when given
        (:meth:`catching_up`). With no calls at all nothing moves: the next window does
        it."""
        alerts: list[Alert] = []
        if self.behind is None or self.behind:
            return alerts
        # Each rule's two marks, from the latest window of its length: a series last seen
        # at or before the first is quiet, before the second forgotten (worked out once a
        # sweep, not once a series: ~100,000 of them).
        marks: dict[str, tuple[SpikeRule, timedelta, datetime, datetime]] = {}
        for rule in self._named.values():
            latest = self._latest.get(rule.window_s)
            if latest is not None:
                window = timedelta(seconds=rule.window_s)
                quiet_by = latest - (quiet_span(rule) + QUIET_AFTER - 1) * window
                marks[rule.name] = (rule, window, quiet_by, latest - horizon([rule]))
        states = self.states
        for key in list(states):  # no (key, state) pair made per series
            state = states[key]
            mark = marks.get(key[0])
            last = state.last_window
            if mark is None or last is None:
                continue
            rule, window, quiet_by, forget_before = mark
            if state.firing and last <= quiet_by and key in self.judged:
                _, tenant, value = key
                if series_key(rule.window_s, rule.dimension, tenant, value) not in self._pending:
                    state, raised = went_quiet(rule, value, state, window, tenant=tenant)
                    states[key] = state
                    alerts += raised
            if last < forget_before:
                del states[key]
                self.judged.pop(key, None)
        return alerts

    def _ready(self, series: str, now: datetime) -> list[Alert]:
        """Judge the series' windows, oldest first, while each is complete or settled."""
        windows = self._pending[series]
        alerts: list[Alert] = []
        for start in sorted(windows):
            pending = windows[start]
            if not pending.covers(self.partitions) and now - pending.received < self._settle:
                break
            del windows[start]
            alerts += self._judge(pending, now)
        if not windows:
            del self._pending[series]
            del self._waiting_since[series]
        return alerts

    def _judge(self, pending: _Pending, now: datetime) -> list[Alert]:
        window = merge_windows(list(pending.shares.values()))
        at = window.window_start
        if window.window_end > now + ALLOWED_SKEW:
            self.ahead_windows += 1
            at = now + ALLOWED_SKEW - (window.window_end - window.window_start)
        latest = self._latest.get(window.size_s)
        if latest is None or at > latest:
            self._latest[window.size_s] = at
        alerts: list[Alert] = []
        for rule in self._rules[(window.size_s, window.dimension)]:
            value = metric_value(rule.metric, window, rule.min_requests)
            state_key = (rule.name, window.tenant, window.value)
            known = self.states.get(state_key)
            if value is None and known is None:
                continue  # calls, but nothing to judge, nor a series to hold
            state, raised = observe(
                rule,
                window.value,
                known,
                window.window_start,
                window.window_end,
                value,
                tenant=window.tenant,
                calls=error_rate(window)[1] if rule.metric == "error_rate" else None,
            )
            self.states[state_key] = state
            if pending.home not in self._away:
                self.judged[state_key] = pending.home
            alerts.extend(raised)
        return alerts

    @property
    def pending(self) -> int:
        return sum(map(len, self._pending.values()))
