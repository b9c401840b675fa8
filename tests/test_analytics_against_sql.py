"""An analyst's read of the analytics API over a realistic store.

Many tenants, teams, users, models and providers; days across a month boundary and a
DST change (UTC throughout); statuses with usage missing, a client gone, a budget's
refusal; cached, cache-write and reasoning tokens; custom properties. Every number
the API returns is compared with plain SQL over ``calls``, and the rollups' answer
with the raw table's for the same question, for admin and key-bound callers.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.events import Attribution, Cost, CostedEvent, Status, Usage
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sql import analytics, params
from sql.store import Store
from tests import sample
from tests.test_analytics import ADMIN_KEY, HTTP_STATUS, quantile, same

# 2026-11-01: a month's first day, and the day US clocks go back (EU's was 2026-10-25).
NOW = datetime(2026, 11, 1, 7, 42, 13, 517000, tzinfo=UTC)
NANO = Decimal("0.000000001")
TENANTS = ["acme", "globex", "initech", "umbrella"]
TEAMS = ["search", "ads", "infra", ""]
USERS = ["alice", "bob", "carol", "dave", "erin", ""]
MODELS = [
    ("gpt-4o", "openai"),
    ("o3-mini", "openai"),
    ("claude-sonnet-4", "anthropic"),
    ("gemini-2.5-pro", "google"),
    ("llama-3-70b", "groq"),
]
STATUSES: tuple[Status, ...] = (
    "ok",
    "upstream_error",
    "client_disconnected",
    "budget_exceeded",
    "rate_limited",
    "upstream_unreachable",
)


def realistic_calls(seed: int = 7) -> list[CostedEvent]:
    rng = random.Random(seed)
    events = []
    for _ in range(900):
        end = NOW - timedelta(milliseconds=rng.randrange(0, 95 * 86_400_000))
        if rng.random() < 0.05:
            end = NOW + timedelta(seconds=rng.randrange(1, 600))  # a clock ahead
        model, provider = rng.choice(MODELS)
        status = rng.choices(STATUSES, weights=(20, 2, 2, 2, 1, 1))[0]
        kind = rng.choice(["priced"] * 6 + ["unpriced", "usage_missing"])
        answered = status in ("ok", "client_disconnected") and kind != "usage_missing"
        inp = rng.randrange(1, 20_000) if answered else 0
        out = rng.randrange(1, 4000) if answered else 0
        cached = rng.randrange(0, inp + 1) if inp and rng.random() < 0.4 else 0
        writes = rng.randrange(0, inp - cached + 1) if inp and rng.random() < 0.2 else 0
        reasoning = rng.randrange(0, out + 1) if out and rng.random() < 0.3 else 0
        latency = round(rng.uniform(3, 30_000), 3)
        stream = rng.random() < 0.5
        ttft = round(rng.uniform(1, min(latency, 2000)), 3) if stream and answered else None
        cost = None
        if kind == "priced":
            p = Decimal(rng.randrange(1, 50_000)) * NANO
            parts = {
                "input": p * (inp - cached - writes),
                "cached_input": p / 10 * cached,
                "cache_write": p * Decimal("1.25") * writes,
                "output": p * 4 * (out - reasoning),
                "reasoning": p * 4 * reasoning,
                "web_search": Decimal("0.01") * rng.choice([0, 0, 0, 1, 2]),
            }
            parts = {k: v.quantize(NANO) for k, v in parts.items()}
            cost = Cost(**parts, total=sum(parts.values(), Decimal(0)))
        props = rng.choice(
            [{}, {"customer": "c1"}, {"customer": "c2", "plan": "pro"}, {"plan": "free"},
             {"customer": ""}, {"customer": "c1", "region": "eu"}]
        )  # fmt: skip
        response = sample.response(
            end,
            ts_start=end - timedelta(milliseconds=latency),
            provider=provider,
            model_requested=model,
            model_served=model,
            stream=stream,
            status=status,
            http_status=HTTP_STATUS[status],
            usage=Usage(
                input_tokens=inp,
                output_tokens=out,
                cached_input_tokens=cached,
                cache_creation_input_tokens=writes,
                reasoning_tokens=reasoning,
                usage_missing=kind == "usage_missing",
            ),
            latency_ms=latency,
            ttft_ms=ttft,
            attribution=Attribution(
                tenant=rng.choice(TENANTS),
                team=rng.choice(TEAMS),
                user=rng.choice(USERS),
                feature=rng.choice(["chat", "summarize", "rag", ""]),
                env=rng.choice(["prod", "dev", "staging"]),
                key_id=rng.choice(["k1", "k2", "k3", ""]),
                properties=props,
            ),
        )
        events.append(
            CostedEvent(
                event_id=uuid.uuid4(),
                response=response,
                cost=cost,
                unpriced=cost is None and kind != "usage_missing",
            )
        )
    return events


@dataclass
class Analyst:
    rollup: TestClient[Any, Any]
    raw: TestClient[Any, Any]
    keys: dict[str, str]
    store: Store


@pytest.fixture
async def analyst(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Analyst]:
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    events = realistic_calls()
    assert write_batch(store, Batch(events=events)) == len(events)
    settings = Settings(
        data_dir=tmp_path, admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]
    )
    keys = {"admin": ADMIN_KEY}
    for name, tenant, team, user in [
        ("acme", "acme", "", ""),
        ("acme_search", "acme", "search", ""),
        ("acme_alice", "acme", "", "alice"),
        ("acme_search_alice", "acme", "search", "alice"),
        ("globex_noteam", "globex", "", ""),
    ]:
        keys[name], _ = create_key(settings.key_file, tenant=tenant, team=team, user=user)
    clients = []
    for source in ("rollup", "raw"):
        app = web.Application(middlewares=[analytics.api_errors])
        app[analytics.STORE] = store
        analytics.add_routes(app, settings, source=source)
        clients.append(TestClient(TestServer(app, host="127.0.0.1")))
    async with clients[0] as rollup, clients[1] as raw:
        yield Analyst(rollup, raw, keys, store)


async def ask(client: TestClient[Any, Any], key: str, endpoint: str, **query: str) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    async with client.get(
        f"/api/v1/analytics/{endpoint}", params=query, headers=headers
    ) as response:
        body = await response.json()
        assert response.status == 200, (endpoint, query, body)
        return body


QUERIES: list[tuple[str, dict[str, str]]] = [
    ("models", {}),
    ("timeseries", {"granularity": "hour"}),
    ("timeseries", {"granularity": "day"}),
    ("timeseries", {"granularity": "day", "team": "ads"}),
    ("providers", {}),
    ("providers", {"env": "dev"}),
    *[("costs", {"group_by": g, "limit": "1000"}) for g in params.GROUP_BY],
    *[("costs", {"group_by": g, "limit": "1000", "tenant": "acme"}) for g in params.GROUP_BY],
    *[("costs", {"group_by": g, "limit": "1000", "feature": "rag"}) for g in params.GROUP_BY],
    ("costs", {"group_by": "property:customer", "limit": "1000"}),
    ("costs", {"group_by": "property:Customer", "limit": "1000", "tenant": "globex"}),
    ("costs", {"group_by": "property:plan", "limit": "1000", "team": "ads"}),
    ("costs", {"group_by": "property:region", "limit": "1000", "env": "prod"}),
    ("costs", {"group_by": "property:nothing", "limit": "1000"}),
    ("costs", {"group_by": "day", "limit": "1000", "provider": "anthropic"}),
    ("usage", {}),
    ("usage", {"user_id": "bob", "feature": "chat"}),
    ("usage", {"model_id": "o3-mini", "team": "infra", "env": "staging"}),
    ("usage", {"user_id": "", "team": ""}),
    ("performance", {}),
    ("performance", {"model_id": "gpt-4o"}),
    ("performance", {"team": "search", "feature": "chat"}),
    ("users", {"limit": "1000"}),
    ("users", {"limit": "1000", "env": "dev"}),
]


KEYS = ["admin", "acme", "acme_search", "acme_alice", "acme_search_alice", "globex_noteam"]


@pytest.mark.parametrize("range_", list(params.RANGES))
async def test_rollups_answer_as_raw_for_every_caller(analyst: Analyst, range_: str) -> None:
    for key in KEYS:
        for endpoint, query in QUERIES:
            if key != "admin" and query.get("tenant", key.split("_")[0]) != key.split("_")[0]:
                continue  # another tenant's: a 403
            if key.endswith("alice") and "user_id" in query:
                continue
            if "search" in key and query.get("team", "search") != "search":
                continue
            rollup = await ask(analyst.rollup, analyst.keys[key], endpoint, range=range_, **query)
            raw = await ask(analyst.raw, analyst.keys[key], endpoint, range=range_, **query)
            same(rollup, raw, f"{key} {endpoint} {query}")


def money(value: Any) -> str | None:
    return None if value is None else f"{Decimal(value):.9f}"


GROUP_SQL = {
    "model": "toString(model)",
    "provider": "toString(provider)",
    "day": "toString(toDate(ts_end))",
    "tenant": "toString(tenant)",
    "team": "toString(team)",
    "user": "toString(user)",
    "feature": "toString(feature)",
    "key": "toString(key_id)",
    "property:customer": "properties['customer']",
    "property:region": "properties['region']",
}
PER_TENANT = {"tenant", "team", "user", "feature", "key", "property:customer", "property:region"}


@pytest.mark.parametrize("range_", ["24h", "30d"])
async def test_costs_are_plain_sql_over_calls(analyst: Analyst, range_: str) -> None:
    since = NOW - params.RANGES[range_]
    for group_by, expression in GROUP_SQL.items():
        tenant = "toString(tenant)" if group_by in PER_TENANT else "NULL"
        rows = analyst.store.rows(
            f"""
            SELECT {expression} AS key, {tenant} AS tenant, count() AS requests,
                   countIf(unpriced) AS unpriced_requests,
                   sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                   countIf(cost_total IS NOT NULL) AS priced,
                   toString(sum(ifNull(cost_input, 0))) AS cost_input,
                   toString(sum(ifNull(cost_cached_input, 0))) AS cost_cached_input,
                   toString(sum(ifNull(cost_cache_write, 0))) AS cost_cache_write,
                   toString(sum(ifNull(cost_output, 0))) AS cost_output,
                   toString(sum(ifNull(cost_reasoning, 0))) AS cost_reasoning,
                   toString(sum(ifNull(cost_web_search, 0))) AS cost_web_search,
                   toString(sum(ifNull(cost_total, 0))) AS cost
            FROM calls WHERE ts_end >= {{since:DateTime64(3, 'UTC')}}
            GROUP BY key, tenant
            """,
            {"since": since},
        )
        expected = {}
        for r in rows:
            priced = r.pop("priced")
            for part in ("cost_input", "cost_cached_input", "cost_cache_write", "cost_output",
                         "cost_reasoning", "cost_web_search", "cost"):  # fmt: skip
                r[part] = money(r[part]) if priced else None
            r["total_tokens"] = r["input_tokens"] + r["output_tokens"]
            expected[r["key"], r["tenant"]] = r
        body = await ask(
            analyst.rollup, ADMIN_KEY, "costs", range=range_, group_by=group_by, limit="1000"
        )
        got = {(r["key"], r["tenant"]): r for r in body["data"]}
        assert got.keys() == expected.keys(), group_by
        for k, row in got.items():
            assert row == expected[k], (group_by, k)


@pytest.mark.parametrize("range_", ["24h", "7d", "90d"])
async def test_models_users_performance_are_plain_sql(analyst: Analyst, range_: str) -> None:
    since = {"since": NOW - params.RANGES[range_]}
    where = "FROM calls WHERE ts_end >= {since:DateTime64(3, 'UTC')}"
    body = await ask(analyst.rollup, ADMIN_KEY, "models", range=range_)
    rows = analyst.store.rows(
        f"""SELECT toString(model) AS model, toString(provider) AS provider, count() AS requests,
            countIf(status != 'ok') AS errors, sum(cached_input_tokens) AS cached_input_tokens,
            sum(reasoning_tokens) AS reasoning_tokens, countIf(usage_missing) AS usage_missing,
            countIf(unpriced) AS unpriced, avg(latency_ms) AS avg_latency
            {where} GROUP BY model, provider""",
        since,
    )
    got = {(r["model"], r["provider"]): r for r in body["data"]}
    for r in rows:
        row = got[r["model"], r["provider"]]
        assert row["requests"] == r["requests"]
        assert row["errors"] == r["errors"]
        assert row["cached_input_tokens"] == r["cached_input_tokens"]
        assert row["reasoning_tokens"] == r["reasoning_tokens"]
        assert row["usage_missing_requests"] == r["usage_missing"]
        assert row["unpriced_requests"] == r["unpriced"]
        assert row["avg_latency_ms"] == pytest.approx(r["avg_latency"], rel=1e-9)
        assert row["error_rate"] == pytest.approx(r["errors"] / r["requests"])
    [perf] = analyst.store.rows(
        f"""SELECT avg(latency_ms) AS avg_latency,
            quantilesExact(0.5, 0.95, 0.99)(latency_ms) AS q,
            avgIf(ttft_ms, ttft_ms IS NOT NULL) AS avg_ttft,
            groupArrayIf(ttft_ms, ttft_ms IS NOT NULL) AS ttfts, groupArray(latency_ms) AS lat,
            sumIf(output_tokens, status = 'ok' AND NOT usage_missing) * 1000
              / sumIf(latency_ms, status = 'ok' AND NOT usage_missing) AS tps,
            count() AS n
            {where}""",
        since,
    )
    data = (await ask(analyst.rollup, ADMIN_KEY, "performance", range=range_))["data"]
    assert data["avg_latency_ms"] == pytest.approx(perf["avg_latency"], rel=1e-9)
    assert data["avg_ttft_ms"] == pytest.approx(perf["avg_ttft"], rel=1e-9)
    assert data["output_tokens_per_second"] == pytest.approx(perf["tps"], rel=1e-9)
    # A t-digest of a few values each its own centroid: the nearest rank (documented);
    # of hundreds, an estimate.
    rel = 1e-6 if perf["n"] < 200 else 0.01
    for level, name in [
        (0.5, "p50_latency_ms"),
        (0.95, "p95_latency_ms"),
        (0.99, "p99_latency_ms"),
    ]:
        assert data[name] == pytest.approx(quantile(perf["lat"], level), rel=rel), name
    for level, name in [(0.5, "p50_ttft_ms"), (0.95, "p95_ttft_ms")]:
        assert data[name] == pytest.approx(quantile(perf["ttfts"], level), rel=rel), name
    users = (await ask(analyst.rollup, ADMIN_KEY, "users", range=range_, limit="1000"))["data"]
    rows = analyst.store.rows(
        f"""SELECT toString(user) AS user, toString(tenant) AS tenant, count() AS requests,
            countIf(status = 'budget_exceeded') AS rejections,
            uniqExact(toDate(ts_start)) AS days, uniqExact(model) AS models,
            max(toUInt64(input_tokens) + output_tokens) AS max_tokens,
            toString(sum(ifNull(cost_total, 0))) AS cost, countIf(cost_total IS NOT NULL) AS priced
            {where} GROUP BY user, tenant""",
        since,
    )
    got = {(r["user"], r["tenant"]): r for r in users}
    assert got.keys() == {(r["user"], r["tenant"]) for r in rows}
    for r in rows:
        row = got[r["user"], r["tenant"]]
        assert row["requests"] == r["requests"]
        assert row["budget_rejections"] == r["rejections"]
        assert row["days_active"] == r["days"]
        assert row["unique_models"] == r["models"]
        assert row["max_tokens_per_request"] == r["max_tokens"]
        assert row["cost"] == (money(r["cost"]) if r["priced"] else None)


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("acme", "tenant = 'acme'"),
        ("acme_search", "tenant = 'acme' AND team = 'search'"),
        ("acme_alice", "tenant = 'acme' AND user = 'alice'"),
        ("acme_search_alice", "tenant = 'acme' AND team = 'search' AND user = 'alice'"),
    ],
)
async def test_a_bound_key_sees_its_calls_as_sql_counts_them(
    analyst: Analyst, key: str, where: str
) -> None:
    since = {"since": NOW - params.RANGES["30d"]}
    [row] = analyst.store.rows(
        f"""SELECT count() AS requests, countIf(status != 'ok') AS errors,
            sum(input_tokens) + sum(output_tokens) AS total_tokens,
            countIf(cost_total IS NOT NULL) AS priced, toString(sum(ifNull(cost_total, 0))) AS cost
            FROM calls WHERE ts_end >= {{since:DateTime64(3, 'UTC')}} AND {where}""",
        since,
    )
    totals = (await ask(analyst.rollup, analyst.keys[key], "usage", range="30d"))["totals"]
    assert totals["requests"] == row["requests"]
    assert totals["errors"] == row["errors"]
    assert totals["total_tokens"] == row["total_tokens"]
    assert totals["cost"] == (money(row["cost"]) if row["priced"] else None)
    days = (await ask(analyst.rollup, analyst.keys[key], "costs", range="30d", group_by="day",
                      limit="1000"))["data"]  # fmt: skip
    assert sum(d["requests"] for d in days) == row["requests"]
    series = (await ask(analyst.rollup, analyst.keys[key], "timeseries", range="30d"))["data"]
    assert sum(b["requests"] for b in series) == row["requests"]
