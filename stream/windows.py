"""Tumbling windows per dimension: pure aggregation, closed by an event-time watermark.

A call counts in the window that holds its end (``ts_end``, UTC), for each of the
dimensions tenant, team, key, user, model, provider and feature. Windows are aligned
to the Unix epoch, so every worker cuts the same windows. What a window counts is an
``stream.aggregates.Aggregate``.

Only the smallest window length is aggregated call by call; a larger one (an hour) is
the merge of the closed smaller windows it is made of (sums add, sketches merge
exactly), so a call costs seven updates whatever the number of window lengths.

A :class:`Windower` counts the calls of one partition of ``llmtap.responses`` (the
windows step keeps one per partition it owns, stream/agents/windows.py): what it has
counted is then a function of that partition's offsets, which is what lets another
worker take the partition over after a crash and count its open windows again.

**When a window closes.** The watermark is the latest call end seen minus the grace
period: a window closes once its end is at or before the watermark, i.e. once calls
``grace`` past its end have been seen. While no call arrives for ``grace`` of wall
time the watermark follows the wall clock instead (now minus grace), so a quiet
series still closes its windows on time. A worker catching up on a backlog replays
the calls in order and closes windows as their event time passes, not all at once.

**Calls stamped ahead of the worker's clock.** A call's times are its ingress's clock:
one that runs minutes ahead (not synced yet after a boot, a VM resumed) stamps calls in
the worker's future. Such a call counts in the window of its own end, as every call
does (so windows stay the sum of the calls stored, and a call read again counts where
it did), but moves the watermark no further than the worker's clock when it was read,
plus :data:`ALLOWED_SKEW`: the calls after it, stamped right, are not late, and its
window closes once the worker's clock passes it, not before (the spikes detector takes
its time from the windows it is given). The clock that bounds a call read again after
a takeover is the old owner's, kept in the checkpoint (:meth:`Windower.resume`'s
``event_time``), not the later one reading it again. A worker reading a backlog (behind,
or taking a partition over) reads it at a clock later than the calls: there a call
stamped ahead is bounded only by as much as it is ahead of that clock.

**Late calls.** A call whose window has already closed is not added to it (the
window was published once and stays as published); it is counted, and the count rides
on the next window its dimension values publish (``late_events``) within
:data:`LATE_KEPT` of event time. A series late once and never again (a one-off user,
feature or key) has no next window: its count is let go then (the worker's count,
:attr:`Windower.late_events`, keeps it), not kept for the life of the worker.

**Calls delivered twice.** Delivery is at least once: a produce retried after an answer
that was lost, or a spool replayed after a batch the broker had kept, puts a response
event on its partition twice, at two offsets. A windower remembers the event ids of the
last :data:`REMEMBERED_CALLS` calls it was given and passes over one it was given
already, neither counted again nor late (the budgets' ledger does the same).

**Taking over** (:meth:`Windower.resume`, :meth:`Windower.restore`). The offset of the
first call counted in a window still open is :meth:`Windower.held`: a worker that
takes the partition over reads it again from there, with the watermark the windows it
had published stopped at (``through``). Calls read again whose windows were published
are passed over, not counted as late; the open larger windows are made again from the
published smaller ones, and the event time is the old owner's as of its checkpoint.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from llmtap import wire
from llmtap.wire import Costed
from stream.aggregates import Aggregate, Call, Series, dimension_values

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# How far past the worker's clock a call's end moves the windows' event time: hosts kept
# in sync by NTP are milliseconds apart. A call stamped further ahead is counted (and
# logged: its ingress's clock is off).
ALLOWED_SKEW = timedelta(seconds=1)
# Event ids a windower remembers (its partition's latest calls) to pass over a call
# delivered twice: a retried produce is next to the first; a spool replayed after an
# outage comes after what the other ingress processes sent meanwhile.
REMEMBERED_CALLS = 50_000
# How long (event time: the watermark's move) a series' late count waits for its next
# window; then, the series having no window open, it is let go.
LATE_KEPT = timedelta(hours=1)
# A window closed: its end and length (what the windows closed at once are ordered by).
Closed = tuple[datetime, timedelta, wire.Window]


def window_start(at: datetime, size: timedelta) -> datetime:
    """The start of the epoch-aligned window of length ``size`` that holds ``at``."""
    return at - (at - EPOCH) % size


class Windower:
    """The open windows of one worker, closed as the watermark passes them."""

    def __init__(
        self, sizes_s: Sequence[int], grace: timedelta, since: datetime | None = None
    ) -> None:
        """``since``: when it started counting (a partition taken over): the wall clock
        closes its windows only once no call has come for ``grace`` after that, so a
        backlog read from the partition's checkpoint is not late by the wall clock."""
        sizes = sorted({timedelta(seconds=s) for s in sizes_s})
        if not sizes or any(size % sizes[0] for size in sizes):
            raise ValueError("window lengths must be multiples of the smallest")
        self.base = sizes[0]
        self.larger = sizes[1:]
        self.grace = grace
        self.watermark: datetime | None = None
        self.late_events = 0  # in all, since start
        self.ahead_events = 0  # calls stamped over ALLOWED_SKEW past the clock, since start
        self._furthest_ahead = timedelta(0)  # of those, since take_furthest_ahead
        self._open: dict[datetime, dict[Series, Aggregate]] = {}  # by base window start
        # The larger windows open, by their end: closing them looks at those that end,
        # not at every series' (7 ms a second with 100,000 series' hours open).
        self._rollups: dict[datetime, dict[tuple[timedelta, Series, datetime], Aggregate]] = {}
        self._late: Counter[Series] = Counter()
        # The watermark when each of those was first late, oldest first (it only moves on).
        self._late_since: dict[Series, datetime] = {}
        # The latest call end counted, each no further than the clock it was read at
        # allowed: where the calls move the watermark (grace behind it).
        self._latest_event: datetime | None = None
        self._marked_below = -1  # calls below this offset are in _latest_event already
        self._last_arrival: datetime | None = since
        self._current = (EPOCH, EPOCH)  # the base window of the last call added
        self._first: dict[datetime, int] = {}  # open base window -> first offset counted
        self._counted_below = -1  # calls below this offset were counted before a takeover
        self._replaying = False  # reading those calls again: the watermark stays put
        # The latest event ids, as ints: a UUID object each cost ~10 MB a partition more.
        self._seen: OrderedDict[int, None] = OrderedDict()

    def add(self, event: Costed, now: datetime, offset: int = -1) -> bool:
        """Count a call (at ``offset`` of its partition) in its windows; False if they
        closed (counted as late, unless it was counted before a takeover), or if it was
        given already (the same event id: delivered twice)."""
        if self._replaying and offset + 1 >= self._counted_below:
            self._replaying = False  # the last call the old owner had read
        seen = event.event_id.int
        if seen in self._seen:
            return False
        self._seen[seen] = None
        if len(self._seen) > REMEMBERED_CALLS:
            self._seen.popitem(last=False)
        at = event.response.ts_end
        bound = now + ALLOWED_SKEW
        if at > bound and offset >= self._counted_below:  # read again: reported before
            self.ahead_events += 1
            self._furthest_ahead = max(self._furthest_ahead, at - now)
        start, end = self._current
        if not start <= at < end:  # calls mostly come in order: the same window again
            start = window_start(at, self.base)
            self._current = (start, start + self.base)
        self._last_arrival = now
        if self.watermark is not None and start + self.base <= self.watermark:
            if offset < self._counted_below:
                return False  # read again after a takeover: in a window published then
            self.late_events += 1
            for series in dimension_values(event):
                self._late[series] += 1
                self._late_since.setdefault(series, self.watermark)
            return False
        if start not in self._first:
            self._first[start] = offset
        call = Call.of(event)
        windows = self._open.get(start)
        if windows is None:
            windows = self._open[start] = {}
        for series in dimension_values(event):
            aggregate = windows.get(series)
            if aggregate is None:
                aggregate = windows[series] = Aggregate()
            aggregate.add(call)
        if offset >= self._marked_below:
            mark = min(at, bound)
            if self._latest_event is None or mark > self._latest_event:
                self._latest_event = mark
        return True

    def read_up_to(self, following: int) -> None:
        """The partition was read up to offset ``following`` (next to read), calls that
        could not be decoded (never added) included: once past the calls the old owner
        had read, the windows close again, traffic or none."""
        if self._replaying and following >= self._counted_below:
            self._replaying = False

    def advance(self, now: datetime, partitions: Iterable[int]) -> list[wire.Window]:
        """Move the watermark and return the windows it closed, oldest end first.

        ``partitions``: the partitions whose calls it counts (named on every window
        it publishes).
        """
        if self._replaying:
            # Until the calls the old owner had read are all read again, its windows
            # close as its did not: by then, it had counted each of them.
            return []
        marks = [] if self.watermark is None else [self.watermark]
        if self._latest_event is not None:
            marks.append(self._latest_event - self.grace)
        if self._last_arrival is None or now - self._last_arrival >= self.grace:
            marks.append(now - self.grace)
        if not marks:  # just started, no call yet: nothing to close
            return []
        self.watermark = watermark = max(marks)
        owned = tuple(partitions)
        closed = self._close_base(watermark, owned)
        closed += self._close_larger(watermark, owned)
        closed.sort(key=lambda c: (c[0], c[1]))
        return [window for _, _, window in closed]

    def _close_base(self, watermark: datetime, owned: tuple[int, ...]) -> list[Closed]:
        """Close the base windows ending at or before ``watermark``, each carrying its
        series' late count, and count them in their larger windows; then let go the late
        counts kept past :data:`LATE_KEPT`. Apart from :meth:`_close_larger`, so that the
        way larger windows close can change (tests/test_windows.py holds the old way to
        the new one) while the base windows and late counts close one way."""
        closed: list[Closed] = []
        for start in [s for s in self._open if s + self.base <= watermark]:
            end = start + self.base
            for series, aggregate in self._open.pop(start).items():
                late = self._late.pop(series, 0)
                if late:
                    aggregate.late_events += late
                    del self._late_since[series]
                closed.append((end, self.base, aggregate.to_event(series, start, self.base, owned)))
                self._roll_up(series, start, aggregate, None)
        for start in [s for s in self._first if s + self.base <= watermark]:
            del self._first[start]
        self._let_late_go(watermark - LATE_KEPT)
        return closed

    def _close_larger(self, watermark: datetime, owned: tuple[int, ...]) -> list[Closed]:
        """Close the larger windows ending at or before ``watermark``: only those that
        end are looked at (by their end), not every series' open one."""
        closed: list[Closed] = []
        for end in [e for e in self._rollups if e <= watermark]:
            for (size, series, start), aggregate in self._rollups.pop(end).items():
                closed.append((end, size, aggregate.to_event(series, start, size, owned)))
        return closed

    def _let_late_go(self, before: datetime) -> None:
        """Let go the late counts first counted before ``before`` of series with no
        window open: late once and not seen again since."""
        gone = []
        for series, since in self._late_since.items():
            if since >= before:
                break
            if not any(series in windows for windows in self._open.values()):
                gone.append(series)
        for series in gone:
            del self._late[series], self._late_since[series]

    def _roll_up(
        self, series: Series, start: datetime, aggregate: Aggregate, closed_by: datetime | None
    ) -> None:
        """Count a closed base window in the larger windows that hold it, but those
        that had closed at ``closed_by`` (None: count it in all)."""
        shared = False
        for size in self.larger:
            outer = (size, series, window_start(start, size))
            end = outer[2] + size
            if closed_by is not None and end <= closed_by:
                continue
            ending = self._rollups.get(end)
            if ending is None:
                ending = self._rollups[end] = {}
            into = ending.get(outer)
            if into is not None:
                into.merge(aggregate)
            elif not shared:  # the first rollup of its own takes it, later ones a copy
                ending[outer] = aggregate
                shared = True
            else:
                ending[outer] = aggregate.copy()

    def held(self) -> int | None:
        """The offset of the first call counted in a window still open (None: none
        open): where a worker taking this partition over reads it again from."""
        return min(self._first.values(), default=None)

    @property
    def event_time(self) -> datetime | None:
        """How far the calls counted moved the windows' event time (the watermark is
        grace behind it): kept in the checkpoint for :meth:`resume`."""
        return self._latest_event

    def take_furthest_ahead(self) -> timedelta:
        """How far ahead of the clock the call furthest ahead was stamped, of those read
        since the last time this was asked."""
        furthest, self._furthest_ahead = self._furthest_ahead, timedelta(0)
        return furthest

    def resume(
        self,
        through: datetime | None,
        counted_below: int,
        reading_from: int,
        event_time: datetime | None = None,
    ) -> None:
        """Take over from a worker whose windows ending at or before ``through`` were
        published, and who had read the calls below offset ``counted_below``, which had
        moved its event time to ``event_time``; the partition is read again from offset
        ``reading_from``. Until the calls below ``counted_below`` are read again, no
        window closes. With ``event_time`` (None: a checkpoint of a worker that did not
        keep it), the calls read again leave the event time where the old owner had it,
        each bounded by the clock it read them at, not by the later one here."""
        if through is not None:
            self.watermark = through if self.watermark is None else max(self.watermark, through)
        if event_time is not None:
            self._latest_event = event_time
            self._marked_below = counted_below
        self._counted_below = counted_below
        self._replaying = reading_from < counted_below

    def restore(self, published: Iterable[wire.Window]) -> int:
        """Make the larger windows still open at the watermark again from the base
        windows published before it (``published``: this partition's, repeats allowed);
        return how many of its base windows it read (repeats once)."""
        if self.watermark is None or not self.larger:
            return 0
        base_s = int(self.base.total_seconds())
        seen: set[object] = set()
        for window in published:
            if window.size_s != base_s or window.window_end > self.watermark:
                continue
            if window.event_id in seen:
                continue
            seen.add(window.event_id)
            series: Series = (window.dimension, window.tenant, window.value)
            self._roll_up(series, window.window_start, Aggregate.of(window), self.watermark)
        return len(seen)

    @property
    def open_windows(self) -> int:
        return sum(map(len, self._open.values())) + sum(map(len, self._rollups.values()))
