"""A partition's windows taken over after a crash (stream/windows.py, stream/checkpoints.py):
pure logic. A worker counts a partition, checkpoints it, goes on, and dies; another
resumes from the checkpoint, reads the partition again from its ``hold``, and makes
the open larger windows again from the published smaller ones. What ends up stored
(the first copy of each window id, as the writer keeps it) must be exactly what one
worker that never died would have published, and a window published twice must be the
same window both times (but for its count of late calls: see _dump)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtap import wire
from llmtap.events import Attribution, CostedEvent, Usage
from stream import checkpoints
from stream.windows import Windower
from tests import sample

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
GRACE = timedelta(seconds=10)
S = timedelta(seconds=1)
MIN = timedelta(minutes=1)
SIZES = (60, 600, 1800)  # three lengths: the larger two both made of the smallest
CALLS = 400


def _late(i: int) -> bool:
    return i % 13 == 5


def _calls() -> list[CostedEvent]:
    """~33 minutes of calls on one partition, every 5 s, each ending up to 9 s after
    its slot (out of order, within the grace), but one in 13 that ended 80 s before
    it (late by any watermark)."""
    out = []
    for i in range(CALLS):
        back = -80 if _late(i) else (i * 7919) % 9
        end = T0 + timedelta(seconds=5 * i + back, milliseconds=(i * 31) % 1000)
        response = sample.response(
            end,
            model_requested=("gpt-4o", "gpt-4o-mini")[i % 2],
            usage=Usage(input_tokens=10 + i % 17, output_tokens=i % 5),
            latency_ms=50.0 + (i * 13) % 400,
            attribution=Attribution(tenant="acme", team=f"team{i % 3}"),
        )
        out.append(sample.costed(response, sample.cost(f"0.00000{i % 9 + 1}")))
    return out


EVENTS = _calls()
LAST = max(e.response.ts_end for e in EVENTS)


def _run(windower: Windower, offsets: Iterable[int], published: list[wire.Window]) -> None:
    for offset in offsets:
        event = EVENTS[offset]
        windower.add(event, event.response.ts_end, offset)
        published += windower.advance(event.response.ts_end, [0])


def _finish(windower: Windower, published: list[wire.Window]) -> None:
    """The traffic stops: the wall clock closes every window left."""
    published += windower.advance(LAST + timedelta(days=1), [0])


def _dump(window: wire.Window) -> dict[str, Any]:
    """A window as stored, but its count of late calls (a dead worker's count of late
    calls not yet published on a window is lost: README, known limits)."""
    dumped = msgspec.structs.asdict(window)
    del dumped["late_events"]
    return dumped


def _reference() -> list[wire.Window]:
    published: list[wire.Window] = []
    windower = Windower(SIZES, GRACE)
    _run(windower, range(CALLS), published)
    _finish(windower, published)
    return published


REFERENCE = _reference()


def test_each_larger_window_is_the_sum_of_its_smallest_ones() -> None:
    """Every window length made of the smallest adds up (two larger lengths share each
    closed minute: neither may count the other's)."""
    minutes = [w for w in REFERENCE if w.size_s == SIZES[0]]
    for larger in (w for w in REFERENCE if w.size_s > SIZES[0]):
        inside = [
            m.requests
            for m in minutes
            if m.series.split("|", 1)[1] == larger.series.split("|", 1)[1]
            and larger.window_start <= m.window_start < larger.window_end
        ]
        assert larger.requests == sum(inside), larger.series
    tenant = [w for w in minutes if w.dimension == "tenant"]
    late = sum(map(_late, range(CALLS)))
    assert (sum(w.requests for w in tenant), sum(w.late_events for w in tenant)) == (
        CALLS - late,
        late,
    )


@settings(max_examples=60, deadline=None)
@given(commit=st.integers(0, CALLS - 1), crash_after=st.integers(0, 80))
def test_a_partition_taken_over_after_a_crash_publishes_what_one_worker_would(
    commit: int, crash_after: int
) -> None:
    published: list[wire.Window] = []
    old = Windower(SIZES, GRACE)
    _run(old, range(commit + 1), published)
    checkpoint = checkpoints.of(0, commit + 1, 0, old.held(), old.watermark, uuid.uuid4())
    # It goes on past its checkpoint (publishing windows it will not checkpoint), dies.
    _run(old, range(commit + 1, min(CALLS, commit + 1 + crash_after)), published)

    new = Windower(SIZES, GRACE)
    new.resume(checkpoint.through, checkpoint.done, checkpoint.hold)
    new.restore(published)
    _run(new, range(checkpoint.hold, CALLS), published)
    _finish(new, published)

    stored: dict[uuid.UUID, dict[str, Any]] = {}
    for window in published:
        copy = _dump(window)
        assert stored.setdefault(window.event_id, copy) == copy, "a window published twice differs"
    assert stored == {w.event_id: _dump(w) for w in REFERENCE}
    # Late calls read again that the old worker had seen are passed over, not counted
    # as late a second time.
    assert new.late_events == sum(_late(i) for i in range(checkpoint.done, CALLS))


# An ingress whose clock runs ten minutes ahead serves three calls in a row.
AHEAD = timedelta(minutes=10)
SKEWED = (50, 51, 52)
SKEW_CALLS = 300


def _read_at(i: int) -> datetime:
    """The worker's clock as it reads call ``i``, three seconds after its slot."""
    return T0 + timedelta(seconds=5 * i + 3)


def _skew_calls() -> list[CostedEvent]:
    """25 minutes of calls, every 5 s, each ending within 3 s of its slot (before it is
    read) but SKEWED's, stamped ten minutes ahead."""
    out = []
    for i in range(SKEW_CALLS):
        end = T0 + timedelta(seconds=5 * i + (i * 7919) % 2, milliseconds=(i * 31) % 1000)
        response = sample.response(
            end + AHEAD if i in SKEWED else end,
            usage=Usage(input_tokens=10 + i % 17, output_tokens=i % 5),
            latency_ms=50.0 + (i * 13) % 400,
            attribution=Attribution(tenant="acme", team=f"team{i % 3}"),
        )
        out.append(sample.costed(response, sample.cost(f"0.00000{i % 9 + 1}")))
    return out


SKEW_EVENTS = _skew_calls()


def _read(
    windower: Windower,
    offsets: Iterable[int],
    published: list[wire.Window],
    clock: Callable[[int], datetime] = _read_at,
) -> None:
    for offset in offsets:
        now = clock(offset)
        windower.add(SKEW_EVENTS[offset], now, offset)
        published += windower.advance(now, [0])


def _skew_reference() -> tuple[list[wire.Window], int]:
    published: list[wire.Window] = []
    windower = Windower(SIZES, GRACE)
    _read(windower, range(SKEW_CALLS), published)
    published += windower.advance(_read_at(SKEW_CALLS) + AHEAD + timedelta(hours=1), [0])
    return published, windower.late_events


SKEW_REFERENCE, SKEW_LATE = _skew_reference()


def test_calls_stamped_ahead_count_once_and_make_none_late() -> None:
    minutes = [w for w in SKEW_REFERENCE if w.size_s == SIZES[0] and w.dimension == "tenant"]
    assert SKEW_LATE == 0
    assert sum(w.requests for w in minutes) == SKEW_CALLS
    assert len({w.event_id for w in SKEW_REFERENCE}) == len(SKEW_REFERENCE)


@settings(max_examples=40, deadline=None)
@given(commit=st.integers(max(SKEWED), SKEW_CALLS - 1), crash_after=st.integers(0, 80))
def test_calls_stamped_ahead_read_again_later_count_as_they_did(
    commit: int, crash_after: int
) -> None:
    """The calls stamped ahead were read before the checkpoint and are read again by the
    worker taking over, whose clock is later than the old owner's was (they are not ahead
    of it any more): they count where they did, and the windows' event time is where the
    old owner's was, so the calls after them are judged as one worker would have."""
    assert SKEW_LATE == 0
    published: list[wire.Window] = []
    old = Windower(SIZES, GRACE)
    _read(old, range(commit + 1), published)
    checkpoint = checkpoints.of(
        0, commit + 1, 0, old.held(), old.watermark, uuid.uuid4(), old.event_time
    )
    last = min(SKEW_CALLS, commit + 1 + crash_after)
    _read(old, range(commit + 1, last), published)

    taken_at = _read_at(last) + timedelta(seconds=5)  # after the old owner's session
    new = Windower(SIZES, GRACE, since=taken_at)
    new.resume(checkpoint.through, checkpoint.done, checkpoint.hold, checkpoint.event_time)
    new.restore(published)
    _read(new, range(checkpoint.hold, SKEW_CALLS), published, lambda i: max(_read_at(i), taken_at))
    published += new.advance(_read_at(SKEW_CALLS) + AHEAD + timedelta(hours=1), [0])

    stored: dict[uuid.UUID, dict[str, Any]] = {}
    for window in published:
        copy = _dump(window)
        assert stored.setdefault(window.event_id, copy) == copy, "a window published twice differs"
    assert stored == {w.event_id: _dump(w) for w in SKEW_REFERENCE}
    assert new.late_events == 0


def test_a_checkpoint_holds_no_further_than_what_was_processed() -> None:
    writer = uuid.uuid4()
    # Open windows from offset 40 on; processed up to 100.
    assert checkpoints.of(3, 100, 0, 40, None, writer).model_dump(include={"hold", "done"}) == {
        "hold": 40,
        "done": 100,
    }
    # No window open: nothing held behind what was processed.
    assert checkpoints.of(3, 100, 0, None, None, writer).hold == 100
    # Taken over from a worker that had got to 250, read again from 60, now at 120: the
    # calls up to 250 stay done (priced, delivered), the hold never passes 120.
    taken = checkpoints.of(3, 120, 250, 90, T0, writer)
    assert (taken.hold, taken.done) == (90, 250)
    assert checkpoints.of(3, 120, 250, None, T0, writer).hold == 120


def test_a_backlog_read_again_after_a_takeover_is_not_late_by_the_wall_clock() -> None:
    """The worker taking over starts minutes after the calls it reads again: its windows
    close by those calls' times, not by the wall clock, until no call has come for the
    grace."""
    started = T0 + 10 * MIN
    w = Windower((60,), GRACE, since=started)
    w.resume(T0 + 30 * S, 5, 5)
    assert w.advance(started + S, [0]) == []  # before the first call of the backlog
    event = EVENTS[8]  # ended 40 s in: its minute was open at the checkpoint
    assert w.add(event, started + 2 * S, 8)
    assert w.late_events == 0
    # Then quiet: the wall clock closes the minute.
    closed = w.advance(started + 2 * S + GRACE, [0])
    assert sum(x.requests for x in closed if x.dimension == "tenant") == 1


def test_no_window_closes_before_the_calls_the_old_owner_had_read_are_read_again() -> None:
    """The old owner read offsets 0-2 (ending 55 s, 75 s, then 58 s) in one batch and
    counted 0 and 2 in the first minute, which was still open at its checkpoint. Read
    again in two batches, the minute must not close between them (75 s would move the
    watermark past it and offset 2 would be passed over, in no window)."""
    ends = (55, 75, 58)
    calls = [
        sample.costed(sample.response(T0 + s * S, latency_ms=10.0), sample.cost("0.000001"))
        for s in ends
    ]
    w = Windower((60,), GRACE, since=T0 + 90 * S)
    w.resume(T0 + 40 * S, counted_below=3, reading_from=0)
    for offset in (0, 1):
        assert w.add(calls[offset], T0 + 90 * S, offset)
    assert w.advance(T0 + 90 * S, [0]) == []  # still reading again: nothing closes
    assert w.add(calls[2], T0 + 90 * S, 2)
    minute = [x for x in w.advance(T0 + 91 * S, [0]) if x.dimension == "tenant"]
    assert [(x.window_start, x.requests) for x in minute] == [(T0, 2)]
