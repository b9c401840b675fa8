"""The analytics API on a real store (chDB) and the real aiohttp app.

A small known dataset is written through the ClickHouse writer's ``write_batch``, with
the clock pinned at NOW; every expected number is computed here from that dataset.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict

from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import (
    Alert,
    Attribution,
    CostedEvent,
    Status,
    Usage,
)
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sinks.webhooks.records import store_batch
from sql import analytics, params
from sql.migrate import available, migrate
from sql.params import Filters
from sql.retention import apply_retention
from sql.store import Store, render
from tests import sample

NOW = datetime(2026, 3, 15, 12, 30, tzinfo=UTC)
RANGE = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
H, D = timedelta(hours=1), timedelta(days=1)
NANO = Decimal("0.000000001")


@dataclass(frozen=True)
class Call:
    """One call of the dataset, as the test reasons about it."""

    age: timedelta  # how long before NOW the call ended
    model: str
    provider: str
    user: str
    team: str
    feature: str = "chat"
    env: str = "prod"
    status: Status = "ok"
    input_tokens: int = 0
    output_tokens: int = 0
    cost: tuple[str, str] | None = ("0", "0")  # (input, output) USD; None: unpriced
    latency_ms: float = 100.0
    ttft_ms: float | None = None
    properties: dict[str, str] = field(default_factory=dict)
    tenant: str = "acme"
    usage_missing: bool = False  # then cost must be None: unknown, but not unpriced
    searches: tuple[int, str] = (0, "0")  # web searches the provider ran, and their fee
    key_id: str = "k1"  # the virtual key it was made with

    @property
    def ts_end(self) -> datetime:
        return NOW - self.age

    @property
    def ts_start(self) -> datetime:
        return self.ts_end - timedelta(milliseconds=self.latency_ms)

    @property
    def total(self) -> Decimal | None:
        if self.cost is None:
            return None
        return Decimal(self.cost[0]) + Decimal(self.cost[1]) + Decimal(self.searches[1])

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def event(self) -> CostedEvent:
        response = sample.response(
            self.ts_end,
            ts_start=self.ts_start,
            provider=self.provider,
            model_requested=self.model,
            model_served=self.model,
            stream=self.ttft_ms is not None,
            status=self.status,
            http_status=HTTP_STATUS[self.status],
            usage=Usage(
                input_tokens=self.input_tokens,
                output_tokens=self.output_tokens,
                usage_missing=self.usage_missing,
                web_search_requests=self.searches[0],
            ),
            latency_ms=self.latency_ms,
            ttft_ms=self.ttft_ms,
            proxy_overhead_ms=0.2,
            attribution=Attribution(
                tenant=self.tenant,
                team=self.team,
                user=self.user,
                feature=self.feature,
                env=self.env,
                key_id=self.key_id,
                properties=self.properties,
            ),
        )
        return CostedEvent(
            event_id=uuid.uuid4(),
            response=response,
            cost=None if self.cost is None else sample.cost(*self.cost, self.searches[1]),
            unpriced=self.cost is None and not self.usage_missing,
        )


HTTP_STATUS = {
    "ok": 200,
    "upstream_error": 500,
    "upstream_unreachable": 502,
    "client_disconnected": 200,
    "rate_limited": 429,
    "budget_exceeded": 429,
}


GPT4O, MINI, CLAUDE, LLAMA = "gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b"
C1, C2 = {"customer": "c1"}, {"customer": "c2"}

CALLS = [
    Call(30 * timedelta(minutes=1), GPT4O, "openai", "alice", "search", input_tokens=100,
         output_tokens=50, cost=("0.00025", "0.0005"), latency_ms=100, ttft_ms=20, properties=C1),
    Call(2 * H, GPT4O, "openai", "bob", "search", status="upstream_error", latency_ms=50),
    Call(5 * H, CLAUDE, "anthropic", "alice", "ads", feature="summarize", input_tokens=200,
         output_tokens=100, cost=("0.0006", "0.0015"), latency_ms=300, ttft_ms=40, properties=C2,
         searches=(2, "0.02")),
    Call(5 * H + 10 * timedelta(minutes=1), GPT4O, "openai", "alice", "search", input_tokens=40,
         output_tokens=20, cost=("0.0001", "0.0002"), latency_ms=200, ttft_ms=30, properties=C1,
         tenant="globex"),
    Call(30 * H, MINI, "openai", "carol", "ads", env="dev", input_tokens=1000, output_tokens=10,
         cost=("0.00015", "0.000006"), latency_ms=200, properties=C1, key_id="k2"),
    Call(3 * D, LLAMA, "groq", "bob", "search", input_tokens=50, output_tokens=50, cost=None,
         latency_ms=400),
    Call(6 * D, GPT4O, "openai", "alice", "search", input_tokens=300, output_tokens=150,
         cost=("0.00075", "0.0015"), latency_ms=150),
    Call(10 * D, CLAUDE, "anthropic", "bob", "ads", feature="summarize", input_tokens=400,
         output_tokens=200, cost=("0.0012", "0.003"), latency_ms=500, ttft_ms=60, properties=C2),
    Call(20 * D, MINI, "openai", "alice", "ads", env="dev", status="rate_limited", latency_ms=5),
    Call(29 * D, GPT4O, "openai", "carol", "search", input_tokens=10, output_tokens=5,
         cost=("0.000025", "0.00005"), latency_ms=80, properties=C2, key_id="k2"),
    Call(35 * D, GPT4O, "openai", "alice", "search", input_tokens=1000, output_tokens=1000,
         cost=("0.0025", "0.01"), latency_ms=1000),
    Call(39 * D, CLAUDE, "anthropic", "dave", "ads", feature="summarize",
         status="upstream_error", latency_ms=30),
    Call(95 * D, GPT4O, "openai", "alice", "search", input_tokens=100, output_tokens=100,
         cost=("0.1", "0.1"), latency_ms=100),  # older than every range
]  # fmt: skip


# -- expected values, computed from CALLS ------------------------------------------------


def within(range_: str, **where: str) -> list[Call]:
    since = NOW - RANGE[range_]
    return [
        c for c in CALLS if c.ts_end >= since and all(getattr(c, k) == v for k, v in where.items())
    ]


def cost_of(calls: Iterable[Call]) -> Decimal | None:
    """Sum of the priced calls; None when none was priced (unknown, never $0)."""
    priced = [c.total for c in calls if c.total is not None]
    return sum(priced, Decimal(0)) if priced else None


def money(value: Decimal | None) -> str | None:
    return None if value is None else f"{value:.9f}"


def quantile(values: Iterable[float], level: float) -> float:
    """ClickHouse's t-digest estimate (quantileTDigest, what the rollups keep) on a few
    values, each then a centroid of its own: the value whose rank is nearest
    ``level * n``, without interpolation (test_tdigest_helper checks it against
    ClickHouse)."""
    ordered = sorted(values)
    x = level * len(ordered)
    for i in range(len(ordered)):
        if i + 0.5 >= x:
            return ordered[max(i - 1, 0)] if x <= i else ordered[i]
    return ordered[-1]


def mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items)


def groups(calls: list[Call], key: Callable[[Call], Any]) -> dict[Any, list[Call]]:
    out: dict[Any, list[Call]] = {}
    for c in calls:
        out.setdefault(key(c), []).append(c)
    return out


def costliest_first(items: dict[Any, list[Call]]) -> list[Any]:
    """The API's order: cost desc (unknown cost last), then requests desc, then key."""

    def order(k: Any) -> tuple[Any, ...]:
        cost = cost_of(items[k])
        return (cost is None, -(cost or 0), -len(items[k]), k)

    return sorted(items, key=order)


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


# -- the app --------------------------------------------------------------------------


ADMIN_KEY = "admin-key-for-analytics-tests"  # an admin key sees every tenant


@pytest.fixture
async def api(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[TestClient[Any, Any]]:
    async with admin_client(store, tmp_path, CALLS, monkeypatch) as client:
        yield client


@asynccontextmanager
async def admin_client(
    store: Store, tmp_path: Path, calls: Sequence[Call], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient[Any, Any]]:
    """The analytics API's app on ``store``, holding ``calls``, as an admin calls it at
    NOW."""
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    assert write_batch(store, Batch(events=[c.event() for c in calls])) == len(calls)
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    admin = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    analytics.add_routes(app, Settings(data_dir=tmp_path, admin_key_hashes=[admin]))
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=headers) as client:
        yield client


async def get(api: TestClient[Any, Any], endpoint: str, **query: str) -> Any:
    async with api.get(f"/api/v1/analytics/{endpoint}", params=query) as response:
        body = await response.json()
        assert response.status == 200, body
        return body


# -- models ---------------------------------------------------------------------------


@pytest.mark.parametrize("range_", ["24h", "7d", "30d", "90d"])
async def test_models_per_range_with_rolling_windows(
    api: TestClient[Any, Any], range_: str
) -> None:
    body = await get(api, "models", range=range_)
    assert body["range"] == range_
    by_model = groups(within(range_), lambda c: (c.model, c.provider))
    # The rows: every model seen in the range or a rolling window (the widest of them);
    # those with no call in the range last.
    widest = range_ if RANGE[range_] >= RANGE["30d"] else "30d"
    absent = sorted({(c.model, c.provider) for c in within(widest)} - set(by_model))
    assert [(r["model"], r["provider"]) for r in body["data"]] == [
        *costliest_first(by_model),
        *absent,
    ]
    for window in ("24h", "7d", "30d"):  # every model's, so the totals are the window's
        assert sum(r[f"requests_{window}"] for r in body["data"]) == len(within(window))
    for row in body["data"]:
        calls = by_model.get((row["model"], row["provider"]), [])
        if not calls:
            assert [row[k] for k in ("requests", "errors", "total_tokens", "cost")] == [
                0,
                0,
                0,
                "0.000000000",
            ]
            for unknown in ("avg_latency_ms", "p95_latency_ms", "error_rate", "success_rate"):
                assert row[unknown] is None, unknown
        else:
            errors = sum(c.status != "ok" for c in calls)
            latencies = [c.latency_ms for c in calls]
            assert row["requests"] == len(calls)
            assert row["errors"] == errors
            assert row["input_tokens"] == sum(c.input_tokens for c in calls)
            assert row["output_tokens"] == sum(c.output_tokens for c in calls)
            assert row["total_tokens"] == sum(c.tokens for c in calls)
            assert row["cached_input_tokens"] == row["reasoning_tokens"] == 0
            assert row["cost"] == money(cost_of(calls))
            assert row["unpriced_requests"] == sum(c.cost is None for c in calls)
            assert row["usage_missing_requests"] == 0
            assert row["avg_latency_ms"] == pytest.approx(mean(latencies))
            assert row["p95_latency_ms"] == pytest.approx(quantile(latencies, 0.95))
            assert row["p99_latency_ms"] == pytest.approx(quantile(latencies, 0.99))
            assert row["error_rate"] == pytest.approx(errors / len(calls))
            assert row["success_rate"] == pytest.approx(1 - errors / len(calls))
        for window in ("24h", "7d", "30d"):  # whatever the range
            rolling = within(window, model=row["model"], provider=row["provider"])
            assert row[f"requests_{window}"] == len(rolling)
            assert row[f"tokens_{window}"] == sum(c.tokens for c in rolling)
            assert row[f"cost_{window}"] == money(cost_of(rolling) if rolling else Decimal(0))


async def test_models_written_out(api: TestClient[Any, Any]) -> None:
    """A few of the numbers above, by hand, so the helpers cannot hide a shared mistake."""
    rows = (await get(api, "models", range="24h"))["data"]
    assert [(r["model"], r["requests"]) for r in rows] == [
        (CLAUDE, 1),
        (GPT4O, 3),
        (MINI, 0),
        (LLAMA, 0),
    ]
    assert (rows[2]["requests_30d"], rows[3]["requests_7d"]) == (2, 1)  # none in 24h
    gpt = rows[1]
    assert gpt["cost"] == "0.001050000"  # 0.00075 + 0.0003; the error cost 0
    assert (gpt["errors"], gpt["total_tokens"]) == (1, 210)
    assert gpt["error_rate"] == pytest.approx(1 / 3)
    assert (gpt["requests_24h"], gpt["requests_7d"], gpt["requests_30d"]) == (3, 4, 5)
    assert gpt["cost_30d"] == "0.003375000"  # plus the 6- and 29-day-old calls
    # claude's 10-day-old call is not in 7d; its 5-hour-old one ran two searches ($0.02)
    assert rows[0]["cost_7d"] == "0.022100000"
    llama = (await get(api, "models", range="7d", provider="groq"))["data"]
    assert [(r["model"], r["cost"], r["unpriced_requests"]) for r in llama] == [(LLAMA, None, 1)]
    assert llama[0]["cost_24h"] == "0.000000000"  # no calls in 24h: cost 0, not unknown


async def test_models_filters(api: TestClient[Any, Any]) -> None:
    rows = (await get(api, "models", range="90d", provider="anthropic"))["data"]
    assert [(r["model"], r["requests"], r["errors"]) for r in rows] == [(CLAUDE, 3, 1)]
    rows = (await get(api, "models", range="30d", team="ads", env="dev"))["data"]
    assert [(r["model"], r["requests"], r["cost"]) for r in rows] == [(MINI, 2, "0.000156000")]
    rows = (await get(api, "models", feature="summarize"))["data"]
    assert [r["model"] for r in rows] == [CLAUDE]
    rows = (await get(api, "models", provider="openai' OR 1=1 --"))["data"]
    assert rows == []  # a value is a bound parameter, never SQL


# -- timeseries -----------------------------------------------------------------------


def buckets(range_: str, granularity: str) -> list[datetime]:
    step = H if granularity == "hour" else D

    def floor(t: datetime) -> datetime:
        t = t.replace(minute=0, second=0, microsecond=0)
        return t.replace(hour=0) if granularity == "day" else t

    out, at = [], floor(NOW - RANGE[range_])
    while at <= floor(NOW):
        out.append(at)
        at += step
    return out


@pytest.mark.parametrize(
    ("range_", "granularity", "expected_granularity", "count"),
    [
        ("24h", None, "hour", 25),  # the first and last buckets are partial
        ("7d", None, "day", 8),
        ("30d", None, "day", 31),
        ("90d", None, "day", 91),
        ("7d", "hour", "hour", 7 * 24 + 1),
        ("24h", "day", "day", 2),
    ],
)
async def test_timeseries_buckets_are_filled(
    api: TestClient[Any, Any],
    range_: str,
    granularity: str | None,
    expected_granularity: str,
    count: int,
) -> None:
    query = {"range": range_} | ({"granularity": granularity} if granularity else {})
    body = await get(api, "timeseries", **query)
    assert body["granularity"] == expected_granularity
    expected = buckets(range_, expected_granularity)
    assert len(expected) == count
    assert [r["bucket"] for r in body["data"]] == [iso(b) for b in expected]
    step = H if expected_granularity == "hour" else D
    calls = within(range_)
    for row, start in zip(body["data"], expected, strict=True):
        inside = [c for c in calls if start <= c.ts_end < start + step]
        assert row["requests"] == len(inside)
        assert row["errors"] == sum(c.status != "ok" for c in inside)
        assert row["input_tokens"] == sum(c.input_tokens for c in inside)
        assert row["output_tokens"] == sum(c.output_tokens for c in inside)
        assert row["total_tokens"] == sum(c.tokens for c in inside)
        assert row["cost"] == money(cost_of(inside) if inside else Decimal(0))
        latencies = [c.latency_ms for c in inside]
        assert row["p95_latency_ms"] == pytest.approx(quantile(latencies, 0.95) if inside else 0)
    assert sum(r["requests"] for r in body["data"]) == len(calls)


async def test_timeseries_24h_written_out(api: TestClient[Any, Any]) -> None:
    rows = (await get(api, "timeseries", range="24h"))["data"]
    assert rows[0]["bucket"] == "2026-03-14T12:00:00Z"
    assert rows[-1]["bucket"] == "2026-03-15T12:00:00Z"
    busy = {r["bucket"]: r for r in rows if r["requests"]}
    assert sorted(busy) == ["2026-03-15T07:00:00Z", "2026-03-15T10:00:00Z", "2026-03-15T12:00:00Z"]
    seven = busy["2026-03-15T07:00:00Z"]
    assert (seven["requests"], seven["cost"]) == (2, "0.022400000")  # $0.02 of searches
    assert seven["p95_latency_ms"] == pytest.approx(300.0)  # of 200 and 300 (t-digest)
    empty = rows[1]
    assert empty == {
        "bucket": "2026-03-14T13:00:00Z",
        "requests": 0,
        "errors": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "cost": "0.000000000",
        "p95_latency_ms": 0.0,
    }
    groq = (await get(api, "timeseries", range="7d", provider="groq"))["data"]
    assert [(r["bucket"], r["cost"]) for r in groq if r["requests"]] == [
        ("2026-03-12T00:00:00Z", None)  # calls, none priced: unknown, not $0
    ]


# -- providers ------------------------------------------------------------------------


@pytest.mark.parametrize("range_", ["24h", "30d", "90d"])
async def test_providers(api: TestClient[Any, Any], range_: str) -> None:
    rows = (await get(api, "providers", range=range_))["data"]
    by_provider = groups(within(range_), lambda c: c.provider)
    assert [r["provider"] for r in rows] == costliest_first(by_provider)
    for row in rows:
        calls = by_provider[row["provider"]]
        ok = sum(c.status == "ok" for c in calls)
        assert row["models"] == len({c.model for c in calls})
        assert row["requests"] == len(calls)
        assert row["errors"] == len(calls) - ok
        assert row["total_tokens"] == sum(c.tokens for c in calls)
        assert row["cost"] == money(cost_of(calls))
        assert row["avg_latency_ms"] == pytest.approx(mean(c.latency_ms for c in calls))
        assert row["success_rate"] == pytest.approx(ok / len(calls))
        assert row["error_rate"] == pytest.approx(1 - ok / len(calls))


async def test_providers_written_out(api: TestClient[Any, Any]) -> None:
    rows = (await get(api, "providers", range="30d"))["data"]
    assert [(r["provider"], r["models"], r["requests"]) for r in rows] == [
        ("anthropic", 1, 2),
        ("openai", 2, 7),
        ("groq", 1, 1),
    ]
    assert rows[2]["cost"] is None
    assert rows[1]["success_rate"] == pytest.approx(5 / 7)
    rows = (await get(api, "providers", range="30d", team="search"))["data"]
    assert [(r["provider"], r["requests"]) for r in rows] == [("openai", 5), ("groq", 1)]


# -- costs ----------------------------------------------------------------------------

# A row's group: (key, tenant). Teams, users, features and property values are one
# tenant's (CALLS has globex's alice of team search); models and providers every one's.
KEYS: dict[str, Callable[[Call], tuple[str, str | None]]] = {
    "model": lambda c: (c.model, None),
    "provider": lambda c: (c.provider, None),
    "tenant": lambda c: (c.tenant, c.tenant),
    "team": lambda c: (c.team, c.tenant),
    "user": lambda c: (c.user, c.tenant),
    "feature": lambda c: (c.feature, c.tenant),
    "key": lambda c: (c.key_id, c.tenant),
    "property:customer": lambda c: (c.properties.get("customer", ""), c.tenant),
}


@pytest.mark.parametrize("group_by", list(KEYS))
async def test_costs_grouped(api: TestClient[Any, Any], group_by: str) -> None:
    body = await get(api, "costs", range="90d", group_by=group_by)
    assert body["group_by"] == group_by
    by_key = groups(within("90d"), KEYS[group_by])
    assert [(r["key"], r["tenant"]) for r in body["data"]] == costliest_first(by_key)
    for row in body["data"]:
        calls = by_key[row["key"], row["tenant"]]
        priced = [c for c in calls if c.cost is not None]
        assert row["requests"] == len(calls)
        assert row["unpriced_requests"] == len(calls) - len(priced)
        assert row["total_tokens"] == sum(c.tokens for c in calls)
        assert row["cost"] == money(cost_of(calls))
        if priced:
            parts = (
                sum((Decimal(c.cost[i]) for c in priced if c.cost), Decimal(0)) for i in (0, 1)
            )
            assert (row["cost_input"], row["cost_output"]) == tuple(map(money, parts))
            assert row["cost_cached_input"] == row["cost_reasoning"] == "0.000000000"
            fees = sum((Decimal(c.searches[1]) for c in priced), Decimal(0))
            assert row["cost_web_search"] == money(fees)


async def test_costs_by_day_and_property(api: TestClient[Any, Any]) -> None:
    body = await get(api, "costs", range="7d", group_by="day")
    by_day = groups(within("7d"), lambda c: c.ts_end.date())
    assert [r["key"] for r in body["data"]] == [d.isoformat() for d in sorted(by_day)]
    for row in body["data"]:
        assert row["cost"] == money(cost_of(by_day[date.fromisoformat(row["key"])]))
    rows = (await get(api, "costs", range="90d", group_by="property:customer"))["data"]
    assert [(r["key"], r["tenant"], r["requests"], r["cost"]) for r in rows] == [
        ("c2", "acme", 3, "0.026375000"),  # $0.02 of it web searches
        ("", "acme", 6, "0.014750000"),  # calls without the property
        ("c1", "acme", 2, "0.000906000"),
        ("c1", "globex", 1, "0.000300000"),  # another tenant's c1
    ]
    # The ingress records a property's name in lower case: asked for in any case, it is.
    upper = await get(api, "costs", range="90d", group_by="property:Customer")
    assert upper["group_by"] == "property:customer"
    assert [(r["key"], r["requests"]) for r in upper["data"]] == [
        (r["key"], r["requests"]) for r in rows
    ]
    rows = (await get(api, "costs", group_by="property:no.such-prop_1"))["data"]
    assert [(r["key"], r["tenant"], r["requests"]) for r in rows] == [
        ("", tenant, len(within("30d", tenant=tenant))) for tenant in ("acme", "globex")
    ]
    rows = (await get(api, "costs", range="90d", group_by="user", provider="anthropic"))["data"]
    assert [(r["key"], r["cost"]) for r in rows] == [
        ("alice", "0.022100000"),
        ("bob", "0.004200000"),
        ("dave", "0.000000000"),  # errors only: priced at zero
    ]


async def test_costs_keep_the_costliest_groups_up_to_the_limit(api: TestClient[Any, Any]) -> None:
    every = await get(api, "costs", range="90d", group_by="user")
    assert every["limit"] == 100 and len(every["data"]) == 5  # acme's 4 users, globex's 1
    top = await get(api, "costs", range="90d", group_by="user", limit="2")
    assert top["limit"] == 2
    assert top["data"] == every["data"][:2]
    assert [(r["key"], r["tenant"], r["cost"]) for r in top["data"]] == [
        ("alice", "acme", "0.037600000"),
        ("bob", "acme", "0.004200000"),
    ]
    # Days: the costliest days kept, shown oldest first.
    days = (await get(api, "costs", range="90d", group_by="day"))["data"]
    costliest = sorted(days, key=lambda r: -Decimal(r["cost"] or 0))[:3]
    kept = (await get(api, "costs", range="90d", group_by="day", limit="3"))["data"]
    assert kept == sorted(costliest, key=lambda r: r["key"])
    assert [r["key"] for r in kept] == ["2026-02-08", "2026-03-05", "2026-03-15"]
    one = await get(api, "costs", range="90d", group_by="property:customer", limit="1")
    assert [(r["key"], r["requests"]) for r in one["data"]] == [("c2", 3)]


async def pages(api: TestClient[Any, Any], endpoint: str, limit: int, **query: str) -> list[Any]:
    """Every row of a ranked answer, read a page of ``limit`` at a time by following
    ``next_offset``, each page saying its limit and offset."""
    rows: list[Any] = []
    offset: int | None = 0
    while offset is not None:
        body = await get(api, endpoint, limit=str(limit), offset=str(offset), **query)
        assert (body["limit"], body["offset"]) == (limit, offset)
        assert 0 < len(body["data"]) <= limit or (offset == 0 and not body["data"])
        rows += body["data"]
        offset = body["next_offset"]
        assert offset is None or (offset == body["offset"] + limit and len(body["data"]) == limit)
    return rows


def test_no_next_page_is_offered_past_the_largest_offset() -> None:
    """A next_offset is one a request may ask for: none past OFFSET_MAX (it was offered,
    and asking for it was a 400)."""
    rows, shown = params.Page(1000, params.OFFSET_MAX - 1000).cut(list(range(1001)))
    assert len(rows) == 1000 and shown["next_offset"] == params.OFFSET_MAX
    rows, shown = params.Page(1000, params.OFFSET_MAX - 500).cut(list(range(1001)))
    assert len(rows) == 1000 and shown["next_offset"] is None


@pytest.mark.parametrize("group_by", ["user", "model", "day", "property:customer"])
async def test_costs_read_page_by_page(api: TestClient[Any, Any], group_by: str) -> None:
    every = await get(api, "costs", range="90d", group_by=group_by, limit="1000")
    assert every["next_offset"] is None and len(every["data"]) > 2
    paged = await pages(api, "costs", 2, range="90d", group_by=group_by)
    if group_by == "day":  # each page's days oldest first; the pages costliest first
        assert sorted(paged, key=lambda r: r["key"]) == every["data"]
        first = (await get(api, "costs", range="90d", group_by="day", limit="2"))["data"]
        assert first == sorted(first, key=lambda r: r["key"])
    else:
        assert paged == every["data"]
    past = await get(api, "costs", range="90d", group_by=group_by, offset="1000")
    assert (past["data"], past["next_offset"]) == ([], None)


async def test_users_read_page_by_page(api: TestClient[Any, Any]) -> None:
    every = (await get(api, "users", range="90d", limit="1000"))["data"]
    assert len(every) == 5
    for limit in (1, 2, 5):
        assert await pages(api, "users", limit, range="90d") == every
    assert (await get(api, "users", range="90d", limit="5"))["next_offset"] is None
    assert (await get(api, "users", range="90d", limit="4"))["next_offset"] == 4


# -- usage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [{}, {"model_id": GPT4O}, {"user_id": "alice"}, {"model_id": GPT4O, "user_id": "alice"}],
)
@pytest.mark.parametrize("range_", ["24h", "30d", "90d"])
async def test_usage(api: TestClient[Any, Any], range_: str, where: dict[str, str]) -> None:
    body = await get(api, "usage", range=range_, **where)
    fields = {"model_id": "model", "user_id": "user"}
    calls = within(range_, **{fields[k]: v for k, v in where.items()})
    totals = body["totals"]
    assert totals["requests"] == len(calls)
    assert totals["errors"] == sum(c.status != "ok" for c in calls)
    assert totals["input_tokens"] == sum(c.input_tokens for c in calls)
    assert totals["output_tokens"] == sum(c.output_tokens for c in calls)
    assert totals["total_tokens"] == sum(c.tokens for c in calls)
    assert totals["cost"] == money(cost_of(calls) if calls else Decimal(0))
    assert totals["unpriced_requests"] == sum(c.cost is None for c in calls)
    by_model = groups(calls, lambda c: (c.model, c.provider))
    assert [(r["model"], r["provider"]) for r in body["data"]] == costliest_first(by_model)
    for row in body["data"]:
        mine = by_model[row["model"], row["provider"]]
        assert (row["requests"], row["total_tokens"]) == (len(mine), sum(c.tokens for c in mine))
        assert row["cost"] == money(cost_of(mine))


async def test_usage_written_out(api: TestClient[Any, Any]) -> None:
    body = await get(api, "usage", range="90d", user_id="bob")
    assert {k: body["totals"][k] for k in ("requests", "total_tokens", "cost")} == {
        "requests": 3,
        "total_tokens": 700,
        "cost": "0.004200000",  # the llama call is unpriced: not in the sum, not $0
    }
    assert body["totals"]["unpriced_requests"] == 1
    body = await get(api, "usage", user_id="nobody")
    assert body["totals"]["requests"] == 0 and body["totals"]["cost"] == "0.000000000"
    assert body["data"] == []


async def test_models_and_usage_answer_at_most_model_rows(
    api: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model names are the callers': the answers hold the costliest MODEL_ROWS (here 2)
    and say they were cut; usage's totals still count every model."""
    whole = await get(api, "usage", range="90d")
    models_whole = await get(api, "models", range="90d")
    assert len(whole["data"]) == len(models_whole["data"]) == 4
    assert whole["truncated"] is models_whole["truncated"] is False
    monkeypatch.setattr(analytics, "MODEL_ROWS", 2)
    cut = await get(api, "usage", range="90d")
    assert cut["truncated"] is True and cut["data"] == whole["data"][:2]
    assert cut["totals"] == whole["totals"]  # counted by the store, not from the rows
    models_cut = await get(api, "models", range="90d")
    assert models_cut["truncated"] is True and models_cut["data"] == models_whole["data"][:2]


# -- performance ----------------------------------------------------------------------


@pytest.mark.parametrize("where", [{}, {"model_id": GPT4O}, {"model_id": CLAUDE}])
@pytest.mark.parametrize("range_", ["24h", "7d", "90d"])
async def test_performance(api: TestClient[Any, Any], range_: str, where: dict[str, str]) -> None:
    data = (await get(api, "performance", range=range_, **where))["data"]
    calls = within(range_, **({"model": where["model_id"]} if where else {}))
    latencies = [c.latency_ms for c in calls]
    ttfts = [c.ttft_ms for c in calls if c.ttft_ms is not None]
    ok = [c for c in calls if c.status == "ok"]
    assert data["requests"] == len(calls)
    assert data["avg_latency_ms"] == pytest.approx(mean(latencies))
    for level in (50, 95, 99):
        assert data[f"p{level}_latency_ms"] == pytest.approx(quantile(latencies, level / 100))
    if ttfts:
        assert data["avg_ttft_ms"] == pytest.approx(mean(ttfts))
        assert data["p50_ttft_ms"] == pytest.approx(quantile(ttfts, 0.5))
        assert data["p95_ttft_ms"] == pytest.approx(quantile(ttfts, 0.95))
    else:
        assert data["avg_ttft_ms"] is None and data["p95_ttft_ms"] is None
    per_second = sum(c.output_tokens for c in ok) / (sum(c.latency_ms for c in ok) / 1000)
    assert data["output_tokens_per_second"] == pytest.approx(per_second)
    minutes = RANGE[range_].total_seconds() / 60
    assert data["requests_per_minute"] == pytest.approx(len(calls) / minutes)


async def test_performance_written_out(api: TestClient[Any, Any]) -> None:
    data = (await get(api, "performance", range="24h", model_id=GPT4O))["data"]
    assert data["requests"] == 3
    assert data["p50_latency_ms"] == pytest.approx(100.0)  # of 50, 100, 200
    assert data["avg_ttft_ms"] == pytest.approx(25.0)  # the two streamed calls
    assert data["output_tokens_per_second"] == pytest.approx(70 / 0.3)  # errors excluded
    assert data["requests_per_minute"] == pytest.approx(3 / 1440)
    data = (await get(api, "performance", model_id="nope"))["data"]
    assert data["requests"] == 0 and data["avg_latency_ms"] is None
    assert data["output_tokens_per_second"] is None


# -- users ----------------------------------------------------------------------------


@pytest.mark.parametrize("range_", ["24h", "30d", "90d"])
async def test_users(api: TestClient[Any, Any], range_: str) -> None:
    body = await get(api, "users", range=range_)
    assert body["limit"] == 100
    by_user = groups(within(range_), lambda c: (c.user, c.tenant))  # a user is a tenant's
    assert [(r["user"], r["tenant"]) for r in body["data"]] == costliest_first(by_user)
    for row in body["data"]:
        calls = by_user[row["user"], row["tenant"]]
        ok = sum(c.status == "ok" for c in calls)
        priced = [c for c in calls if c.total is not None]
        cost = cost_of(calls)
        days = {c.ts_start.date() for c in calls}
        assert row["requests"] == len(calls)
        assert row["total_tokens"] == sum(c.tokens for c in calls)
        assert row["cost"] == money(cost)
        assert row["avg_latency_ms"] == pytest.approx(mean(c.latency_ms for c in calls))
        assert row["success_rate"] == pytest.approx(ok / len(calls))
        assert row["error_rate"] == pytest.approx(1 - ok / len(calls))
        assert row["unique_models"] == len({c.model for c in calls})
        assert row["providers"] == sorted({c.provider for c in calls})
        assert row["first_request"] == iso(min(c.ts_start for c in calls))
        assert row["last_request"] == iso(max(c.ts_start for c in calls))
        assert row["days_active"] == len(days)
        assert row["avg_requests_per_day"] == pytest.approx(len(calls) / len(days))
        assert row["max_tokens_per_request"] == max(c.tokens for c in calls)
        if cost is None:
            assert row["cost_per_request"] is None and row["cost_per_1k_tokens"] is None
            continue
        per_request = (cost / len(priced)).quantize(NANO, ROUND_DOWN)  # Decimal(38, 9) division
        assert row["cost_per_request"] == money(per_request)
        tokens = sum(c.tokens for c in priced)
        per_1k = (cost * 1000 / tokens).quantize(NANO, ROUND_DOWN) if tokens else None
        assert row["cost_per_1k_tokens"] == money(per_1k)


async def test_users_written_out_and_limited(api: TestClient[Any, Any]) -> None:
    body = await get(api, "users", range="90d", limit="2")
    assert body["limit"] == 2
    assert [(r["user"], r["tenant"], r["requests"], r["cost"]) for r in body["data"]] == [
        ("alice", "acme", 5, "0.037600000"),  # not globex's alice's $0.0003 too
        ("bob", "acme", 3, "0.004200000"),
    ]
    alice, bob = body["data"]
    assert alice["providers"] == ["anthropic", "openai"] and alice["unique_models"] == 3
    assert alice["first_request"] == "2026-02-08T12:29:59Z"  # 35 days before NOW, minus 1 s
    assert bob["cost_per_request"] == "0.002100000"  # 0.0042 over his 2 priced calls
    assert bob["cost_per_1k_tokens"] == "0.007000000"  # 0.0042 per 600 priced tokens
    carol = (await get(api, "users", range="90d", team="ads", limit="1000"))["data"][-1]
    assert (carol["user"], carol["cost"]) == ("dave", "0.000000000")
    assert carol["cost_per_1k_tokens"] is None  # no priced tokens: no ratio, no error


# -- rollups: the same answer as the raw table, at every edge ---------------------------

MS = timedelta(milliseconds=1)
# Quantiles are t-digest estimates either way: compared as floats, like the averages.
EDGE_NOWS = [
    NOW + 250 * MS,  # mid-hour: every range starts mid-hour, mid-day
    datetime(2026, 3, 15, 13, 0, tzinfo=UTC),  # on an hour: ranges start on hours
    datetime(2026, 3, 16, 0, 0, tzinfo=UTC),  # on a day: ranges start on days
]


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _floor_day(t: datetime) -> datetime:
    return _floor_hour(t).replace(hour=0)


def _ceil(t: datetime, floor: Callable[[datetime], datetime], step: timedelta) -> datetime:
    return t if floor(t) == t else floor(t) + step


def first_whole_hour(now: datetime, range_: str) -> datetime:
    """Where the hourly rollup takes over in a range (the minutes before it come from
    `calls`)."""
    return _ceil(now - RANGE[range_], _floor_hour, H)


def edge_calls(now: datetime, seed: int) -> list[Call]:
    """Calls ending on, just before and just after every boundary a rollup read splits a
    range at (its start, the first whole hour and day after it, the last hour and day
    boundary before now), after now, and at random over 95 days; every dimension, status
    and kind of cost (priced, unpriced, usage missing) mixed in."""
    rng = random.Random(seed)
    times = [now, now - MS, now + MS, now + 5 * timedelta(minutes=1)]
    for span in RANGE.values():
        since = now - span
        for edge in (since, _ceil(since, _floor_hour, H), _ceil(since, _floor_day, D)):
            times += [edge - MS, edge, edge + MS, edge + 30 * timedelta(minutes=1)]
    for edge in (_floor_hour(now), _floor_day(now), _floor_hour(now) - H):
        times += [edge - MS, edge, edge + MS]
    times += [now - rng.random() * 95 * D for _ in range(300)]
    models = [(GPT4O, "openai"), (MINI, "openai"), (CLAUDE, "anthropic"), (LLAMA, "groq")]
    statuses: tuple[Status, ...] = ("ok", "upstream_error", "rate_limited", "budget_exceeded")
    calls = []
    for at in times:
        model, provider = rng.choice(models)
        status = rng.choices(statuses, weights=(8, 1, 1, 1))[0]
        kind = rng.choice(["priced"] * 6 + ["unpriced", "usage_missing"])
        answered = status == "ok" and kind != "usage_missing"
        input_tokens = rng.randrange(1, 5000) if answered else 0
        output_tokens = rng.randrange(1, 2000) if answered else 0
        price = Decimal(rng.randrange(1, 10_000)) * NANO
        calls.append(
            Call(
                NOW - at,
                model,
                provider,
                user=rng.choice(["alice", "bob", "carol", "dave", ""]),
                team=rng.choice(["search", "ads", ""]),
                feature=rng.choice(["chat", "summarize"]),
                env=rng.choice(["prod", "dev"]),
                status=status,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost=(
                    (str(price * input_tokens), str(price * 4 * output_tokens))
                    if kind == "priced"
                    else None
                ),
                latency_ms=rng.uniform(5, 5000),
                ttft_ms=rng.uniform(1, 500) if rng.random() < 0.5 else None,
                # Two properties on one call, another name alone, an empty value.
                properties=rng.choice(
                    [C1, C2, {}, {**C1, "plan": "pro"}, {"plan": "free"}, {"customer": ""}]
                ),
                tenant=rng.choice(["acme", "globex"]),
                usage_missing=kind == "usage_missing",
                key_id=rng.choice(["k1", "k2", ""]),
            )
        )
    return calls


@dataclass
class Both:
    """The API answering from the rollups and from `calls` alone, over one store."""

    rollup: TestClient[Any, Any]
    raw: TestClient[Any, Any]
    calls: list[Call]
    now: datetime


@pytest.fixture(params=EDGE_NOWS, ids=["mid-hour", "on-an-hour", "on-a-day"])
async def both(
    request: pytest.FixtureRequest,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> AsyncIterator[Both]:
    now: datetime = request.param
    monkeypatch.setattr(params, "utcnow", lambda: now)
    calls = edge_calls(now, seed=EDGE_NOWS.index(now))
    assert write_batch(store, Batch(events=[c.event() for c in calls])) == len(calls)
    settings = Settings(
        data_dir=tmp_path, admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]
    )
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    clients = []
    for source in ("rollup", "raw"):
        app = web.Application(middlewares=[analytics.api_errors])
        app[analytics.STORE] = store
        analytics.add_routes(app, settings, source=source)
        clients.append(TestClient(TestServer(app, host="127.0.0.1"), headers=headers))
    async with clients[0] as rollup, clients[1] as raw:
        yield Both(rollup, raw, calls, now)


def same(rollup: Any, raw: Any, where: str = "") -> None:
    """Equal, but floats (averages, rates, t-digest quantiles) to 1e-9 relative: a sum
    of floats depends on the order it is taken in. Counts, tokens and money (strings)
    are exact."""
    if isinstance(raw, dict):
        assert isinstance(rollup, dict) and rollup.keys() == raw.keys(), where
        for key in raw:
            same(rollup[key], raw[key], f"{where}.{key}")
    elif isinstance(raw, list):
        assert isinstance(rollup, list) and len(rollup) == len(raw), where
        for i, (a, b) in enumerate(zip(rollup, raw, strict=True)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(raw, float):
        assert rollup == pytest.approx(raw, rel=1e-9, abs=1e-9), where
    else:
        assert rollup == raw, where


EDGE_QUERIES: list[tuple[str, dict[str, str]]] = [
    ("models", {}),
    ("timeseries", {}),
    ("timeseries", {"granularity": "hour"}),
    ("timeseries", {"granularity": "day"}),
    ("providers", {}),
    *[("costs", {"group_by": g}) for g in [*params.GROUP_BY, "property:customer"]],
    ("costs", {"group_by": "property:plan"}),
    ("costs", {"group_by": "property:customer", "team": "search", "provider": "openai"}),
    ("costs", {"group_by": "property:plan", "feature": "chat"}),  # no rollup: `calls`
    ("usage", {}),
    ("usage", {"user_id": "alice"}),
    ("usage", {"model_id": GPT4O, "team": "search"}),
    ("performance", {}),
    ("performance", {"model_id": CLAUDE, "env": "dev"}),
    ("users", {"limit": "1000"}),
    ("users", {"provider": "openai", "feature": "chat"}),
    ("users", {"provider": "openai", "team": "search"}),
    ("costs", {"group_by": "day", "provider": "openai"}),
    ("performance", {"team": "ads"}),
    ("models", {"team": "ads"}),
    ("timeseries", {"env": "dev", "granularity": "hour"}),
    ("costs", {"group_by": "user", "team": "search"}),
    ("costs", {"group_by": "key", "provider": "openai"}),
    ("costs", {"group_by": "key", "team": "search"}),  # no rollup keeps both: `calls`
    ("costs", {"group_by": "key", "env": "dev", "provider": "groq"}),
    ("providers", {"feature": "summarize"}),
]


@pytest.mark.parametrize("range_", list(RANGE))
async def test_rollups_answer_as_the_raw_table_at_every_edge(both: Both, range_: str) -> None:
    for endpoint, query in EDGE_QUERIES:
        rollup = await get(both.rollup, endpoint, range=range_, **query)
        raw = await get(both.raw, endpoint, range=range_, **query)
        same(rollup, raw, f"{endpoint} {query}")


WINDOWS: dict[str, Callable[[datetime], tuple[datetime, datetime]]] = {
    # (start, end) from the store's now: ends on a day, on an hour, mid-hour, within one
    # hour (the calls on an hour boundary and the millisecond before it), across one
    # midnight (no whole day), past now.
    "to-a-day": lambda now: (now - RANGE["30d"], _floor_day(now)),
    "to-an-hour": lambda now: (now - RANGE["7d"], _floor_hour(now) - H),
    "mid-hour": lambda now: (now - RANGE["90d"] + timedelta(minutes=30), now - 3 * D - 7 * MS),
    "within-an-hour": lambda now: (_floor_hour(now) - H - MS, _floor_hour(now) - H + MS),
    "across-midnight": lambda now: (_floor_day(now) - 2 * H, _floor_day(now) + 3 * H),
    "past-now": lambda now: (now - RANGE["24h"], now + timedelta(minutes=10)),
}


@pytest.mark.parametrize("name", list(WINDOWS))
async def test_a_window_answers_as_the_raw_table_at_every_edge(both: Both, name: str) -> None:
    """Every endpoint, from the rollups and from `calls` alone, over calls ending on,
    just before and just after every boundary; and the count from the calls themselves."""
    start, end = WINDOWS[name](both.now)
    window = {"start": iso(start), "end": iso(end)}
    for endpoint, query in EDGE_QUERIES:
        rollup = await get(both.rollup, endpoint, **window, **query)
        raw = await get(both.raw, endpoint, **window, **query)
        same(rollup, raw, f"{endpoint} {query}")
    calls = [c for c in both.calls if start <= c.ts_end < end]
    assert calls, name
    body = await get(both.rollup, "usage", **window)
    assert body["totals"]["requests"] == len(calls)
    assert body["totals"]["cost"] == money(cost_of(calls))
    users = (await get(both.rollup, "users", **window, limit="1000"))["data"]
    assert sum(r["requests"] for r in users) == len(calls)
    series = (await get(both.rollup, "timeseries", **window, granularity="hour"))["data"]
    assert sum(r["requests"] for r in series) == len(calls)
    assert series[-1]["bucket"] == iso(_floor_hour(end - MS))


@pytest.mark.parametrize("range_", list(RANGE))
async def test_rollup_counts_tokens_and_cost_are_the_calls(both: Both, range_: str) -> None:
    """Counted here from the calls themselves, independently of any SQL."""
    since = both.now - RANGE[range_]
    calls = [c for c in both.calls if c.ts_end >= since]
    assert any(c.ts_end == since for c in calls)  # the edge itself is in...
    assert not any(c.ts_end == since - MS for c in calls)  # ...the millisecond before not
    body = await get(both.rollup, "usage", range=range_)
    by_model = groups(calls, lambda c: (c.model, c.provider))
    assert body["totals"]["requests"] == len(calls)
    assert body["totals"]["total_tokens"] == sum(c.tokens for c in calls)
    assert body["totals"]["cost"] == money(cost_of(calls))
    assert {(r["model"], r["provider"]): r["requests"] for r in body["data"]} == {
        k: len(v) for k, v in by_model.items()
    }
    for row in body["data"]:
        mine = by_model[row["model"], row["provider"]]
        assert row["input_tokens"] == sum(c.input_tokens for c in mine)
        assert row["output_tokens"] == sum(c.output_tokens for c in mine)
        assert row["cost"] == money(cost_of(mine))
        assert row["usage_missing_requests"] == sum(c.usage_missing for c in mine)
    users = (await get(both.rollup, "users", range=range_, limit="1000"))["data"]
    by_user = groups(calls, lambda c: (c.user, c.tenant))
    assert len(users) == len(by_user)
    for row in users:
        mine = by_user[row["user"], row["tenant"]]
        assert row["requests"] == len(mine)
        assert row["budget_rejections"] == sum(c.status == "budget_exceeded" for c in mine)
        assert row["max_tokens_per_request"] == max(c.tokens for c in mine)
        assert row["days_active"] == len({c.ts_start.date() for c in mine})
        first = min(c.ts_start for c in mine)  # stored to the millisecond
        assert row["first_request"] == iso(
            first.replace(microsecond=first.microsecond // 1000 * 1000)
        )


@pytest.mark.parametrize("range_", list(RANGE))
async def test_usage_totals_are_the_totals_query(both: Both, store: Store, range_: str) -> None:
    """The endpoint adds its totals up from the per-model rows: the same as
    analytics_usage.sql's own totals (which the dashboard asks for)."""
    for query in ({}, {"user_id": "alice"}, {"team": "ads", "provider": "groq"}):
        body = await get(both.rollup, "usage", range=range_, **query)
        asked = params.Query(MultiDict({"range": range_, **query}), *params.EXTRA["usage"])
        [totals] = await analytics.select(
            store, "analytics_usage", asked.filters(), structure={"by_model": False}
        )
        encoded = analytics.json_response(totals).body
        assert isinstance(encoded, bytes)
        assert body["totals"] == orjson.loads(encoded), query


@pytest.mark.parametrize("range_", list(RANGE))
async def test_whole_buckets_come_from_the_rollups(both: Both, store: Store, range_: str) -> None:
    """With `calls` emptied, what is left is exactly the calls from the first whole hour
    of the range on (the current hour and day included, and calls after now): the
    rollups answer for them, the raw table only for the minutes before."""
    store.command("TRUNCATE TABLE calls")
    start = first_whole_hour(both.now, range_)
    inside = [c for c in both.calls if c.ts_end >= start]
    body = await get(both.rollup, "usage", range=range_)
    assert body["totals"]["requests"] == len(inside)
    assert body["totals"]["cost"] == money(cost_of(inside) if inside else Decimal(0))
    assert (await get(both.raw, "usage", range=range_))["totals"]["requests"] == 0
    # The rollups by team and by user are daily only: they take over at the first day.
    day = _ceil(both.now - RANGE[range_], _floor_day, D)
    body = await get(both.rollup, "usage", range=range_, team="search")
    assert body["totals"]["requests"] == sum(
        c.ts_end >= day and c.team == "search" for c in both.calls
    )
    users = (await get(both.rollup, "users", range=range_, limit="1000"))["data"]
    assert sum(r["requests"] for r in users) == sum(c.ts_end >= day for c in both.calls)
    keys = (await get(both.rollup, "costs", range=range_, group_by="key", limit="1000"))["data"]
    assert sorted((r["key"], r["tenant"], r["requests"]) for r in keys) == sorted(
        (key, tenant, len(calls))
        for (key, tenant), calls in groups(
            [c for c in both.calls if c.ts_end >= day], lambda c: (c.key_id, c.tenant)
        ).items()
    )
    # Hourly buckets of one team: no hourly rollup keeps teams, so `calls` only.
    series = await get(both.rollup, "timeseries", range=range_, granularity="hour", team="ads")
    assert sum(r["requests"] for r in series["data"]) == 0


async def test_the_migration_backfills_calls_already_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0005 on a store that already holds calls: the rollups (and the projection) are
    filled from them, and applying it again after an interruption counts each once."""
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        # The schema before 0005, with the `calls` columns today's writer writes (0010's,
        # 0011's and 0014's).
        later_columns = ("output_tokens_counted", "web_search", "pricing_terms")
        for migration in available():
            if migration.version < 5 or migration.name in later_columns:
                for statement in migration.statements:
                    store.command(statement)
        assert write_batch(store, Batch(events=[c.event() for c in CALLS])) == len(CALLS)
        assert 5 in migrate(store)
        [analytics_rollups] = [m for m in available() if m.version == 5]
        for _ in range(2):  # as migrated, then as if re-run after an interruption
            for range_ in RANGE:
                filters = Filters(range=range_, since=NOW - RANGE[range_], until=NOW)
                queries: list[tuple[str, dict[str, Any]]] = [
                    ("analytics_usage", {"by_model": True}),
                    ("analytics_users", {}),
                    ("analytics_costs", {"group_by": "team"}),
                    ("analytics_costs", {"group_by": "key"}),  # 0017's rollup
                ]
                for query, structure in queries:
                    rollup, raw = [
                        await analytics.select(
                            store,
                            query,
                            filters,
                            structure={**structure, "source": source},
                            values={"limit": 1000, "offset": 0},
                        )
                        for source in ("rollup", "raw")
                    ]
                    same(rollup, raw, f"{query} {range_}")
            for statement in analytics_rollups.statements:
                store.command(statement)
    finally:
        store.close()


def test_tdigest_helper(store: Store) -> None:
    """The test's quantile helper is ClickHouse's t-digest on a few values (which keeps
    its centroids as 32-bit floats)."""
    rng = random.Random(7)
    for n in (1, 2, 3, 5, 10, 57):
        values = [round(rng.uniform(1, 1000), 3) for _ in range(n)]
        [row] = store.rows(
            "SELECT quantilesTDigest(0.5, 0.95, 0.99)(x) AS q FROM "
            "(SELECT arrayJoin({values:Array(Float64)}) AS x)",
            {"values": values},
        )
        expected = [quantile(values, level) for level in (0.5, 0.95, 0.99)]
        assert row["q"] == pytest.approx(expected, rel=1e-6), values


# -- alerts -----------------------------------------------------------------------------


def alert(
    name: str,
    age: timedelta,
    *,
    alert_type: Literal["spike", "budget"] = "spike",
    dimension: str = "tenant",
    value: str = "acme",
    state: Literal["firing", "resolved"] = "firing",
    severity: Literal["info", "warning", "critical"] = "warning",
    tenant: str = "",
    period: Literal["day", "week", "month"] | None = None,
    resolution: Literal["normal", "quiet", "unjudged"] | None = None,
) -> Alert:
    seen = NOW - age
    return Alert(
        event_id=uuid.uuid4(),
        alert_type=alert_type,
        state=state,
        severity=severity,
        rule=name,
        dimension=dimension,
        value=value,
        tenant=tenant,
        metric="spend" if alert_type == "budget" else "cost",
        observed=Decimal("12.5"),
        baseline=Decimal("10") if alert_type == "budget" else None,
        threshold=Decimal("80") if alert_type == "budget" else None,
        window_start=seen - H,
        window_end=seen,
        first_seen=seen,
        message=f"{name} on {dimension} {value}",
        period=period,
        resolution=resolution,
    )


ALERTS = [
    alert("cost-spike", 1 * H),  # acme's tenant
    alert("cost-spike", 2 * H, state="resolved", severity="info", resolution="quiet"),
    alert("cost-spike", 3 * H, value="globex"),
    alert("team-spike", 4 * H, dimension="team", value="search"),  # every tenant's "search"
    alert(
        "acme-monthly",
        5 * H,
        alert_type="budget",
        value="acme",
        severity="critical",
        period="month",
    ),
    alert("acme-search", 6 * H, alert_type="budget", dimension="team", value="search"),
    alert("alice-cap", 3 * D, alert_type="budget", dimension="user", value="alice"),
    alert("globex-all", 10 * D, alert_type="budget", value="globex"),
    alert("cost-spike", 100 * D),  # older than every range
]
BUDGETS = [
    BudgetConfig(name="acme-monthly", scope="tenant", value="acme", limit_usd=Decimal(10)),
    BudgetConfig(
        name="acme-search", scope="team", value="search", tenant="acme", limit_usd=Decimal(10)
    ),
    BudgetConfig(
        name="alice-cap", scope="user", value="alice", tenant="acme", limit_usd=Decimal(10)
    ),
    BudgetConfig(name="globex-all", scope="tenant", value="globex", limit_usd=Decimal(10)),
]


@dataclass
class AlertsApi:
    client: TestClient[Any, Any]
    keys: dict[str, str]  # name -> secret; "admin" too

    async def names(self, key: str, expect: int = 200, **query: str) -> Any:
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        async with self.client.get(
            "/api/v1/analytics/alerts", params=query, headers=headers
        ) as response:
            body = await response.json()
            assert response.status == expect, body
        if expect != 200:
            return body
        return [(r["rule"], r["value"]) for r in body["data"]]


@pytest.fixture
async def alerts_api(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[AlertsApi]:
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    store_batch(store, ALERTS, [], [])
    settings = Settings(
        data_dir=tmp_path,
        admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()],
        budgets=BUDGETS,
    )
    keys = {"admin": ADMIN_KEY}
    for name, tenant, team, user in [
        ("acme", "acme", "", ""),
        ("globex", "globex", "", ""),
        ("acme_search", "acme", "search", ""),
        ("acme_alice", "acme", "search", "alice"),
        ("nobody", "", "", ""),  # a key of no tenant (a key file written by hand)
    ]:
        keys[name], _ = create_key(settings.key_file, tenant=tenant, team=team, user=user)
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield AlertsApi(client, keys)


async def test_alerts_newest_first_with_every_field(alerts_api: AlertsApi) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with alerts_api.client.get(
        "/api/v1/analytics/alerts", params={"range": "7d"}, headers=headers
    ) as response:
        body = await response.json()
    assert (body["range"], body["limit"]) == ("7d", 100)
    assert [r["event_id"] for r in body["data"]] == [str(a.event_id) for a in ALERTS[:7]]
    first = body["data"][4]  # the budget alert
    assert first == {
        "event_id": str(ALERTS[4].event_id),
        "first_seen": iso(NOW - 5 * H),
        "alert_type": "budget",
        "state": "firing",
        "severity": "critical",
        "rule": "acme-monthly",
        "dimension": "tenant",
        "value": "acme",
        "tenant": "",  # stored before alerts had tenants
        "metric": "spend",
        "observed": "12.500000000",
        "baseline": "10.000000000",
        "threshold": "80.000000000",
        "window_start": iso(NOW - 6 * H),
        "window_end": iso(NOW - 5 * H),
        "message": "acme-monthly on tenant acme",
        "period": "month",  # a budget alert's
        "resolution": "",  # a resolved spike alert's only
    }
    assert body["data"][0]["baseline"] is None
    # Why a spike resolved; neither field on a firing spike, nor on a budget alert raised
    # before alerts carried its period.
    whys = [(r["state"], r["period"], r["resolution"]) for r in body["data"]]
    assert whys[:2] == [("firing", "", ""), ("resolved", "", "quiet")]
    assert whys[5] == ("firing", "", "")


async def test_alerts_filters(alerts_api: AlertsApi) -> None:
    api = alerts_api
    assert len(await api.names("admin", range="90d")) == 8
    assert len(await api.names("admin", range="24h")) == 6
    assert await api.names("admin", range="90d", alert_type="budget") == [
        ("acme-monthly", "acme"),
        ("acme-search", "search"),
        ("alice-cap", "alice"),
        ("globex-all", "globex"),
    ]
    assert await api.names("admin", state="resolved") == [("cost-spike", "acme")]
    assert await api.names("admin", severity="critical") == [("acme-monthly", "acme")]
    assert await api.names("admin", rule="cost-spike", limit="2") == [
        ("cost-spike", "acme"),
        ("cost-spike", "acme"),
    ]
    assert await api.names("admin", alert_type="", state="", rule="") == await api.names("admin")
    assert await api.names("admin", rule="cost-spike' OR 1=1 --") == []


async def test_alerts_read_page_by_page(alerts_api: AlertsApi) -> None:
    api = alerts_api
    every = await api.names("admin", range="90d")
    paged: list[Any] = []
    for offset in range(0, len(every) + 3, 3):
        paged += await api.names("admin", range="90d", limit="3", offset=str(offset))
    assert paged == every and len(every) == 8
    assert (
        await api.names("acme", range="90d", offset="1")
        == (await api.names("acme", range="90d"))[1:]
    )


async def test_a_virtual_key_sees_its_own_alerts(alerts_api: AlertsApi) -> None:
    """Its tenant's spikes (not spikes on a team, user, model... which count every
    tenant's calls) and the budgets it may see; a key bound to a team or a user only
    that team's or user's budgets."""
    api = alerts_api
    assert await api.names("acme", range="90d") == [
        ("cost-spike", "acme"),
        ("cost-spike", "acme"),
        ("acme-monthly", "acme"),
        ("acme-search", "search"),
        ("alice-cap", "alice"),
    ]
    assert await api.names("globex", range="90d") == [
        ("cost-spike", "globex"),
        ("globex-all", "globex"),
    ]
    assert await api.names("acme_search", range="90d") == [("acme-search", "search")]
    assert await api.names("acme_alice", range="90d") == [("alice-cap", "alice")]
    assert await api.names("acme_alice", range="90d", alert_type="spike") == []


async def test_a_budget_name_once_anothers_brings_none_of_its_alerts(
    alerts_api: AlertsApi, store: Store
) -> None:
    """Budget alerts are a key's by the budget's name, scope and value: alerts raised
    while a name now configured for acme was another owner's stay that owner's."""
    api = alerts_api
    before = {key: await api.names(key, range="90d") for key in ("acme", "acme_search")}
    others = [
        alert("acme-monthly", 7 * H, alert_type="budget", value="globex"),
        alert("acme-search", 8 * H, alert_type="budget", dimension="team", value="ml"),
        alert("alice-cap", 9 * H, alert_type="budget", dimension="feature", value="alice"),
    ]
    store_batch(store, others, [], [])
    for key, seen in before.items():
        assert await api.names(key, range="90d") == seen, key
    assert await api.names("globex", range="90d") == [
        ("cost-spike", "globex"),
        ("globex-all", "globex"),
    ]
    assert len(await api.names("admin", range="90d")) == 8 + len(others)


async def test_a_virtual_key_sees_the_spikes_on_its_tenants_series(
    alerts_api: AlertsApi, store: Store
) -> None:
    """Spikes carry their series' tenant: a key sees those on its tenant's teams, users,
    features and keys (two tenants' team "search" are two series), a key bound to a
    team or user only its team's or user's; spikes on a model or provider count every
    tenant's calls (tenant ""): admins only. A budget alert carries its budget's tenant:
    another tenant's budget of the same name, scope and value is not this key's."""
    api = alerts_api
    before = {key: await api.names(key, range="90d") for key in api.keys}
    new = [
        alert("team-spike", 7 * H, dimension="team", value="search", tenant="acme"),
        alert("team-spike", 8 * H, dimension="team", value="search", tenant="globex"),
        alert("user-spike", 9 * H, dimension="user", value="alice", tenant="acme"),
        alert("feature-spike", 10 * H, dimension="feature", value="chat", tenant="acme"),
        alert("tenant-spike", 11 * H, dimension="tenant", value="acme", tenant="acme"),
        alert("model-spike", 12 * H, dimension="model", value="gpt-4o"),
        alert(
            "acme-search",
            13 * H,
            alert_type="budget",
            dimension="team",
            value="search",
            tenant="globex",
        ),
    ]
    store_batch(store, new, [], [])

    async def added(key: str) -> list[Any]:
        return [row for row in await api.names(key, range="90d") if row not in before[key]]

    assert await added("acme") == [
        ("team-spike", "search"),
        ("user-spike", "alice"),
        ("feature-spike", "chat"),
        ("tenant-spike", "acme"),
    ]
    assert await added("globex") == [("team-spike", "search")]
    assert await added("acme_search") == [("team-spike", "search")]
    assert await added("acme_alice") == [("user-spike", "alice")]
    # Of no tenant: no spike but on the tenant "" itself, before as after (every spike
    # stored before alerts had tenants has tenant "", whoever's calls it counted).
    assert before["nobody"] == [] and await added("nobody") == []
    assert len(await api.names("admin", range="90d")) == len(before["admin"]) + len(new)


async def test_an_admin_naming_a_tenant_sees_what_its_key_sees(
    alerts_api: AlertsApi, store: Store
) -> None:
    """An admin's ``tenant`` filter: that tenant's spikes (not those on a model or
    provider, which count every tenant's calls, nor another tenant's team of the same
    name) and its budgets' alerts, those stored before alerts had tenants included; a
    virtual key may name its own tenant only."""
    api = alerts_api
    store_batch(
        store,
        [
            alert("team-spike", 7 * H, dimension="team", value="search", tenant="acme"),
            alert("team-spike", 8 * H, dimension="team", value="search", tenant="globex"),
            alert("model-spike", 9 * H, dimension="model", value="gpt-4o"),
        ],
        [],
        [],
    )
    for tenant in ("acme", "globex"):
        own = await api.names(tenant, range="90d")
        assert await api.names("admin", range="90d", tenant=tenant) == own
        assert own and len(own) < len(await api.names("admin", range="90d"))
    assert ("team-spike", "search") in await api.names("admin", range="90d", tenant="acme")
    assert await api.names("admin", range="90d", tenant="initech") == []
    assert await api.names("admin", range="90d", tenant="") == await api.names("admin", range="90d")
    assert await api.names("acme", range="90d", tenant="acme") == await api.names(
        "acme", range="90d"
    )
    refused = await api.names("acme", expect=403, tenant="globex")
    assert refused["error"]["param"] == "tenant"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"alert_type": "outage"}, "alert_type"),
        ({"state": "open"}, "state"),
        ({"severity": "high"}, "severity"),
        ({"limit": "0"}, "limit"),
        ({"provider": "openai"}, "provider"),  # alerts are not calls
        ({"team": "search"}, "team"),
    ],
)
async def test_alerts_bad_parameters(
    alerts_api: AlertsApi, query: dict[str, str], param: str
) -> None:
    body = await alerts_api.names("acme", expect=400, **query)
    assert body["error"]["param"] == param


# -- tenant scope ---------------------------------------------------------------------


CALL_QUERIES = [
    "analytics_costs",
    "analytics_models",
    "analytics_performance",
    "analytics_providers",
    "analytics_timeseries",
    "analytics_usage",
    "analytics_users",
]


@pytest.mark.parametrize("source", analytics.SOURCES)
@pytest.mark.parametrize("unit", ["hour", "day"])
@pytest.mark.parametrize("group_by", [*params.GROUP_BY, "property"])
def test_every_analytics_query_takes_the_shared_filters(
    source: str, unit: str, group_by: str
) -> None:
    """Every branch that reads calls or a rollup (rollup_parts.sql: daily, hourly, raw
    edges; several ranges for models) takes the filters, the tenant's first of all."""
    every = frozenset(params.FILTERS)
    queries = Path(params.__file__).parent / "queries"
    names = sorted(p.stem for p in queries.glob("analytics_*.sql"))
    assert names == sorted([*CALL_QUERIES, "analytics_alerts"])
    for name in CALL_QUERIES:
        structure = {
            "granularity": unit,
            "group_by": group_by,
            "by_model": True,
            "source": source,
            "unit": unit,
            "by_user": True,
        }
        sql = render(name, filters=every, **structure)
        reads = re.findall(r"\bFROM (calls|analytics_\w+)", sql)
        assert reads, name
        if source == "raw" or (name == "analytics_costs" and group_by == "property"):
            assert set(reads) == {"calls"}, name
        for condition in ("tenant = {tenant:String}", "provider = {provider:String}"):
            assert sql.count(condition) == len(reads), (name, condition)
        assert "{tenant:String}" not in render(name, filters=frozenset(), **structure)


async def test_tenant_filter_scopes_a_query(api: TestClient[Any, Any], store: Store) -> None:
    def scoped(tenant: str | None) -> Filters:
        return Filters(range="90d", since=NOW - RANGE["90d"], until=NOW, tenant=tenant)

    for tenant, expected in (("globex", 1), ("acme", len(within("90d")) - 1), (None, 12)):
        rows = await analytics.select(
            store, "analytics_usage", scoped(tenant), structure={"by_model": False}
        )
        assert rows[0]["requests"] == expected
    # The API, with an admin key, answers for every tenant.
    assert (await get(api, "usage", range="90d"))["totals"]["requests"] == 12


# -- retention: a range longer than the store keeps ------------------------------------


async def serve_kept(
    store: Store, tmp_path: Path, calls: list[Call], raw: int = 90, rollup: int = 400
) -> TestClient[Any, Any]:
    assert write_batch(store, Batch(events=[c.event() for c in calls])) == len(calls)
    admin = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    settings = Settings(
        data_dir=tmp_path,
        admin_key_hashes=[admin],
        raw_retention_days=raw,
        rollup_retention_days=rollup,
    )
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return TestClient(TestServer(app, host="127.0.0.1"), headers=headers)


ENDPOINT_QUERIES: list[tuple[str, dict[str, str]]] = [
    ("usage", {}),
    ("usage", {"team": "search"}),
    ("usage", {"user_id": "alice", "feature": "chat"}),  # raw `calls` only
    ("models", {}),
    ("timeseries", {"granularity": "hour", "team": "search"}),
    ("providers", {}),
    ("costs", {"group_by": "user"}),
    ("performance", {}),
    ("users", {}),
]


async def test_a_range_longer_than_raw_retention_is_refused(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept 7 days, calls no longer answer a 30d range right (the review's case: from
    the rollups 3 calls, by team 2, by user and feature 1, once `calls` lost the older
    two): every endpoint over calls refuses it, naming the range and the setting."""
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    async with await serve_kept(store, tmp_path, CALLS, raw=7) as api:
        for endpoint, query in ENDPOINT_QUERIES:
            for range_ in ("30d", "90d"):
                async with api.get(
                    f"/api/v1/analytics/{endpoint}", params={"range": range_, **query}
                ) as response:
                    assert response.status == 400, (endpoint, query)
                    error = (await response.json())["error"]
                assert error["param"] == "range"
                assert "keeps calls 7 days (raw_retention_days: 7)" in error["message"]
                assert error["message"].endswith("use 24h, 7d")
            await get(api, endpoint, range="7d", **query)  # what it keeps: answered
        # Asked for no range, each answers the longest it keeps (7d, not the 30d of a
        # store that keeps 90 days: every request without a range was a 400); alerts,
        # kept as long as the rollups, 30d.
        for endpoint, query in ENDPOINT_QUERIES:
            assert (await get(api, endpoint, **query))["range"] == "7d", endpoint
        assert (await get(api, "usage"))["totals"]["requests"] == len(within("7d"))
        assert (await get(api, "alerts"))["range"] == "30d"
        await get(api, "alerts", range="90d")
        # Models' rolling windows past 7 days are unknown (null), not short.
        rows = (await get(api, "models", range="24h"))["data"]
        assert {r["requests_30d"] for r in rows} == {r["cost_30d"] for r in rows} == {None}
        assert sum(r["requests_7d"] for r in rows) == len(within("7d"))
        assert sum(r["requests_24h"] for r in rows) == len(within("24h"))
        assert sum(r["requests"] for r in rows) == len(within("24h"))
        assert {(r["model"], r["provider"]) for r in rows} == {
            (c.model, c.provider) for c in within("7d")
        }


async def test_a_range_longer_than_rollup_retention_is_refused(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    async with await serve_kept(store, tmp_path, CALLS, rollup=20) as api:
        for endpoint in ("usage", "alerts"):
            async with api.get(f"/api/v1/analytics/{endpoint}", params={"range": "30d"}) as r:
                assert r.status == 400
                error = (await r.json())["error"]
            assert error["param"] == "range"
            assert "(rollup_retention_days: 20)" in error["message"]
        assert (await get(api, "usage", range="7d"))["totals"]["requests"] == len(within("7d"))
        rows = (await get(api, "models", range="7d"))["data"]
        assert {r["tokens_30d"] for r in rows} == {None}


def test_the_default_retention_keeps_the_longest_range() -> None:
    kept = params.Kept(Settings().raw_retention_days, Settings().rollup_retention_days)
    assert kept == params.Kept()
    for range_ in RANGE:
        filters = params.Query(MultiDict(range=range_)).filters()
        kept.check(filters)
        kept.check(filters, raw=False)


async def test_a_90d_range_over_a_90_day_ttl_counts_its_first_partial_day(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge, on real TTLs (set as `llmtap store` sets them, then applied by a merge):
    a 90d range starts where a 90-day retention cuts, and the calls of its first partial
    day, which it reads from `calls` alone, are still there; those just before it are
    gone. TTLs run on the wall clock, so this test's clock is the real one."""
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    monkeypatch.setattr(params, "utcnow", lambda: now)
    since = now - RANGE["90d"]

    def at(ts_end: datetime, cost: str) -> Call:  # (a Call's age is from NOW)
        return Call(NOW - ts_end, GPT4O, "openai", "alice", "search", cost=(cost, "0"))

    inside = [at(since + timedelta(minutes=2), "1"), at(since + H, "2"), at(now - D, "4")]
    before = [at(since - timedelta(minutes=2), "8"), at(since - D, "16")]
    async with await serve_kept(store, tmp_path, inside + before) as api:
        apply_retention(store, raw_days=90, rollup_days=400)
        async with asyncio.timeout(60):
            while store.rows("SELECT count() AS n FROM system.mutations WHERE NOT is_done")[0]["n"]:
                await asyncio.sleep(0.2)
        store.command("OPTIMIZE TABLE calls FINAL")
        assert store.rows("SELECT count() AS n FROM calls")[0]["n"] == len(inside)
        for query in ({}, {"team": "search"}, {"user_id": "alice", "feature": "chat"}):
            totals = (await get(api, "usage", range="90d", **query))["totals"]
            assert (totals["requests"], totals["cost"]) == (3, "7.000000000"), query


# -- bad parameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "query", "param"),
    [
        ("models", "range=1y", "range"),
        ("models", "range=", "range"),
        ("costs", "range=24h&range=7d", "range"),
        ("timeseries", "granularity=week", "granularity"),
        ("costs", "group_by=colour", "group_by"),
        ("costs", "group_by=property:", "group_by"),
        ("costs", "group_by=property:bad%20name", "group_by"),
        ("costs", "group_by=property:x'%5D%20OR%201=1", "group_by"),
        ("costs", "group_by=property:" + "a" * 65, "group_by"),
        ("users", "limit=0", "limit"),
        ("users", "limit=1001", "limit"),
        ("users", "limit=ten", "limit"),
        ("users", "limit=-5", "limit"),
        ("users", "limit=2.5", "limit"),
        ("costs", "limit=0", "limit"),
        ("costs", "limit=1001", "limit"),
        ("costs", "group_by=day&limit=x", "limit"),
        ("costs", "offset=-1", "offset"),
        ("users", "offset=1000001", "offset"),
        ("users", "offset=two", "offset"),
        ("alerts", "offset=1.5", "offset"),
        ("models", "offset=0", "offset"),  # only ranked answers take one
        ("models", "foo=1", "foo"),
        ("providers", "model_id=gpt-4o", "model_id"),
        ("performance", "user_id=alice", "user_id"),
        ("users", "user_id=alice", "user_id"),
        ("models", "granularity=day", "granularity"),
        ("alerts", "provider=openai", "provider"),  # alerts are not calls
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    api: TestClient[Any, Any], endpoint: str, query: str, param: str
) -> None:
    async with api.get(f"/api/v1/analytics/{endpoint}?{query}") as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["param"] == param
    assert param in error["message"]


async def test_unknown_endpoint_is_404(api: TestClient[Any, Any]) -> None:
    async with api.get("/api/v1/analytics/nope") as response:
        assert response.status == 404
        assert "unknown endpoint" in (await response.json())["error"]["message"]
