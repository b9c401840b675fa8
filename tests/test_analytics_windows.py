"""Explicit windows (`start`, `end`) instead of a rolling range, on a real store (chDB)
and the real aiohttp app: only the calls inside a window are counted, on every edge a
rollup read splits it at, and every bad window is a 400 naming its parameter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sql import params
from sql.store import Store
from tests.test_analytics import (
    CALLS,
    CLAUDE,
    GPT4O,
    LLAMA,
    MINI,
    MS,
    NOW,
    RANGE,
    Call,
    D,
    _floor_day,
    _floor_hour,
    admin_client,
    cost_of,
    get,
    iso,
    money,
    serve_kept,
)

H = timedelta(hours=1)


@pytest.fixture
async def api(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    async with admin_client(store, tmp_path, CALLS, monkeypatch) as client:
        yield client


def inside(calls: list[Call], start: datetime, end: datetime) -> list[Call]:
    return [c for c in calls if start <= c.ts_end < end]


async def refused(api: TestClient[Any, Any], endpoint: str, **query: str) -> dict[str, Any]:
    async with api.get(f"/api/v1/analytics/{endpoint}", params=query) as response:
        body = await response.json()
        assert response.status == 400, body
        error: dict[str, Any] = body["error"]
        return error


# An invoice's window: from the call 10 days back (in: `start` is inclusive) to the
# call 30 hours back (out: `end` is exclusive).
START, END = NOW - 10 * D, NOW - 30 * H


async def test_a_window_counts_only_the_calls_inside_it(api: TestClient[Any, Any]) -> None:
    calls = inside(CALLS, START, END)
    assert sorted(c.model for c in calls) == sorted([LLAMA, GPT4O, CLAUDE])
    assert any(c.ts_end == START for c in calls) and any(c.ts_end == END for c in CALLS)
    window = {"start": iso(START), "end": iso(END)}

    usage = await get(api, "usage", **window)
    assert (usage["range"], usage["start"], usage["end"]) == (None, iso(START), iso(END))
    assert usage["totals"]["requests"] == len(calls) == 3
    assert usage["totals"]["cost"] == money(cost_of(calls))
    # The same instants with an offset: the same window.
    offset = {"start": "2026-03-05T07:30:00-05:00", "end": "2026-03-14T08:30:00+02:00"}
    assert (await get(api, "usage", **offset))["totals"] == usage["totals"]

    rows = (await get(api, "models", **window))["data"]
    by_model = {r["model"]: r for r in rows}
    for model in (LLAMA, GPT4O, CLAUDE):
        mine = [c for c in calls if c.model == model]
        assert by_model[model]["requests"] == len(mine), model
        assert by_model[model]["cost"] == money(cost_of(mine)), model
    # A model of the rolling windows only is still a row (each window's column sums to
    # the window's total), with nothing in the window.
    assert by_model[MINI]["requests"] == 0
    for window_name in ("24h", "7d", "30d"):
        rolling = [c for c in CALLS if c.ts_end >= NOW - RANGE[window_name]]
        assert sum(r[f"requests_{window_name}"] for r in rows) == len(rolling), window_name

    # Days by default (longer than a day): from the window's first day to the day of its
    # last millisecond, each counting the calls of the window it holds.
    series = await get(api, "timeseries", **window)
    assert series["granularity"] == "day"
    days = [_floor_day(START) + i * D for i in range(10)]
    assert [r["bucket"] for r in series["data"]] == [iso(d) for d in days]
    assert [r["requests"] for r in series["data"]] == [len(inside(calls, d, d + D)) for d in days]

    # Hours by default for a window of a day at most; `end` on an hour is not a bucket.
    start, end = NOW - 6 * H, _floor_hour(NOW)
    short = inside(CALLS, start, end)
    assert len(short) == 3
    series = await get(api, "timeseries", start=iso(start), end=iso(end))
    assert series["granularity"] == "hour"
    hours = [_floor_hour(start) + i * H for i in range(6)]
    assert [r["bucket"] for r in series["data"]] == [iso(h) for h in hours]
    assert [r["requests"] for r in series["data"]] == [len(inside(short, h, h + H)) for h in hours]
    providers = (await get(api, "providers", start=iso(start), end=iso(end)))["data"]
    assert sum(r["requests"] for r in providers) == 3

    # `start` alone: up to now, as a range; the answer says where it ended.
    body = await get(api, "usage", start=iso(START))
    assert body["totals"]["requests"] == len([c for c in CALLS if c.ts_end >= START])
    assert (body["range"], body["end"]) == (None, iso(NOW))
    # A range's answer says its start and end too.
    body = await get(api, "usage", range="7d")
    assert (body["range"], body["start"], body["end"]) == ("7d", iso(NOW - 7 * D), iso(NOW))


async def test_a_time_finer_than_a_microsecond_is_rounded_up(api: TestClient[Any, Any]) -> None:
    """Times are kept to the millisecond, and a bound is rounded up to one: the calls at
    or after it are the same. Past six digits too (RFC 3339 takes any number, Go's
    RFC3339Nano writes nine): Python's datetime keeps six and drops the rest, so 100 ns
    after START was START, and the call that ended at START, before it, was counted;
    100 ns after END was END, and the call that ended at END, before it, was not."""

    def nanos(at: datetime) -> str:
        return iso(at).replace("Z", ".000000100Z")  # 100 ns past a whole second

    whole = len(inside(CALLS, START, END))
    body = await get(api, "usage", start=nanos(START), end=iso(END))
    assert body["start"] == iso(START + MS)
    assert body["totals"]["requests"] == len(inside(CALLS, START + MS, END)) == whole - 1
    body = await get(api, "usage", start=iso(START), end=nanos(END))
    assert body["end"] == iso(END + MS)
    assert body["totals"]["requests"] == len(inside(CALLS, START, END + MS)) == whole + 1
    # Nine digits that are a microsecond's: as six.
    body = await get(api, "usage", start=iso(START).replace("Z", ".000001000Z"))
    assert body["start"] == iso(START + MS)


async def test_a_time_in_lower_case_is_the_same_time(api: TestClient[Any, Any]) -> None:
    """The document says `date-time` (RFC 3339), which takes a lower-case t and z;
    Python's fromisoformat takes the t only: 2026-03-05t12:30:00z was a 400."""
    upper = await get(api, "usage", start=iso(START), end=iso(END))
    lower = await get(api, "usage", start=iso(START).lower(), end=iso(END).lower())
    assert (lower["start"], lower["end"]) == (iso(START), iso(END))
    assert lower["totals"] == upper["totals"]


async def test_bad_windows_are_refused_naming_the_parameter(api: TestClient[Any, Any]) -> None:
    start, end = iso(START), iso(END)
    for endpoint in ("usage", "timeseries", "alerts"):
        error = await refused(api, endpoint, range="7d", start=start, end=end)
        assert error["param"] == "range", endpoint
        assert "either 'range' or 'start'" in error["message"]

    for first, last in ((end, start), (start, start)):
        error = await refused(api, "models", start=first, end=last)
        assert error["param"] == "end"
        assert f"'start' {first.replace('Z', '+00:00')} must be before 'end'" in error["message"]
    error = await refused(api, "usage", start=iso(NOW + MS))
    assert (error["param"], "must be before now" in error["message"]) == ("start", True)

    error = await refused(api, "usage", end=end)
    assert (error["param"], error["message"]) == (
        "end",
        "'end' needs a 'start': the window's first moment",
    )
    for name, value in (("start", "2026-03-05T12:30:00"), ("end", "2026-03-14")):
        error = await refused(api, "usage", **{"start": start, "end": end, name: value})
        assert error["param"] == name
        assert "give its offset" in error["message"], value
    for value in ("", "yesterday", "2026-03-05T12:30:00 01:00", "2026-13-01T00:00:00Z"):
        error = await refused(api, "costs", start=value)
        assert error["param"] == "start"
        assert "expected an ISO-8601 time with an offset or Z" in error["message"], value


async def test_a_window_past_the_retention_is_refused(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a range is: a window starting earlier than the store keeps, or longer than
    that (ending after now), is a 400 naming `start` and the setting."""
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    async with await serve_kept(store, tmp_path, CALLS, raw=7, rollup=20) as api:
        for endpoint in ("usage", "timeseries", "models"):
            error = await refused(api, endpoint, start=iso(NOW - 8 * D), end=iso(NOW - 6 * D))
            assert error["param"] == "start"
            assert "keeps calls 7 days (raw_retention_days: 7)" in error["message"]
            error = await refused(api, endpoint, start=iso(NOW - 6 * D), end=iso(NOW + 2 * D))
            assert error["param"] == "start"
            assert "is 8 days before 'end'" in error["message"]
        body = await get(api, "usage", start=iso(NOW - 7 * D), end=iso(NOW - 6 * D))
        assert body["totals"]["requests"] == len(inside(CALLS, NOW - 7 * D, NOW - 6 * D))
        # Alerts are kept as long as the rollups.
        error = await refused(api, "alerts", start=iso(NOW - 21 * D))
        assert (error["param"], "(rollup_retention_days: 20)" in error["message"]) == (
            "start",
            True,
        )
        assert (await get(api, "alerts", start=iso(NOW - 20 * D), end=iso(NOW)))["data"] == []


def test_the_default_granularity_goes_by_the_span() -> None:
    assert params.DEFAULT_GRANULARITY == {"24h": "hour", "7d": "day", "30d": "day", "90d": "day"}
    assert params.default_granularity(timedelta(hours=24)) == "hour"
    assert params.default_granularity(timedelta(hours=24, milliseconds=1)) == "day"


async def test_a_window_ending_after_now_rates_its_calls_over_the_time_passed(
    api: TestClient[Any, Any],
) -> None:
    """A month to date asked as the whole month (its end after now): requests a minute
    are its calls over the minutes passed, not over minutes still to come."""
    start, end = NOW - 10 * D, NOW + 20 * D
    calls = inside(CALLS, start, NOW + MS)
    data = (await get(api, "performance", start=iso(start), end=iso(end)))["data"]
    assert data["requests"] == len(calls) > 0
    assert data["requests_per_minute"] == pytest.approx(len(calls) / (10 * 24 * 60))
