"""Analytics API benchmark: every endpoint, every range, over millions of calls (chDB).

    python bench/analytics.py DIR [--rows 10000000] [--reps 20] [--raw-reps 5]
                              [--out bench/results/analytics.md]

Fills a chDB store in DIR (created and migrated if new) with ``--rows`` synthetic calls
over 90 days (bench/analytics_calls.sql: ClickHouse generates them with INSERT ...
SELECT FROM numbers() straight into `calls`, so the materialized views fill the rollups
exactly as the writer's inserts do), plus a few thousand alerts through the webhook
dispatcher's store path. A store already holding that many calls is reused as it is;
its data's "now" (kept in DIR/bench_now.txt) becomes the API's clock, so the ranges
cover the same calls whenever the benchmark runs.

Then it serves the real aiohttp app (sql.analytics.add_routes, an admin key) on
127.0.0.1 and times GET requests end to end (HTTP, JSON), one at a time: every
endpoint for every range (24h, 7d, 30d, 90d) and its main parameters (costs by each
group, timeseries by hour and by day, usage and performance filtered, a key bound to
one tenant), ``--reps`` times each after one warm-up request. It reports the median and
p95 per endpoint and range, and for a few endpoints the same requests answered from
the raw `calls` table alone (add_routes(source="raw")) side by side with the rollups.
Target (issue): p95 under 150 ms per endpoint at 10M calls.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.events import Alert
from sinks.webhooks.records import store_batch
from sql import analytics, params
from sql.migrate import migrate
from sql.params import RANGES
from sql.retention import ROLLUP_TABLES
from sql.store import Store

ADMIN_KEY = "admin-key-for-the-analytics-benchmark"
CHUNK = 1_000_000  # calls per INSERT ... SELECT
DAYS = 90
ALERTS = 5_000
TARGET_MS = 150.0
FILL_SQL = Path(__file__).with_name("analytics_calls.sql")
SIZES_SQL = Path(__file__).with_name("analytics_sizes.sql")
MERGE_SQL = Path(__file__).with_name("analytics_merge.sql")
MERGES_SQL = "SELECT count() FROM system.merges"
# The analytics rollups: the tables whose rows expire with rollup_retention_days, less
# the stream's windows.
ROLLUPS = tuple(table for table in ROLLUP_TABLES if table.startswith("analytics_by_"))


# -- the data -------------------------------------------------------------------------


def fill(store: Store, rows: int, now: datetime) -> float:
    """Insert ``rows`` synthetic calls ending in the DAYS days before ``now``; seconds."""
    sql = FILL_SQL.read_text()
    started = time.perf_counter()
    for first in range(0, rows, CHUNK):
        count = min(CHUNK, rows - first)
        store.command(sql, {"first": first, "count": count, "now": now, "days": DAYS})
        done = first + count
        rate = done / (time.perf_counter() - started)
        print(f"  {done:,} calls ({rate:,.0f}/s)", file=sys.stderr)
    return time.perf_counter() - started


def synthetic_alerts(now: datetime, n: int) -> list[Alert]:
    """Spike and budget alerts spread over the DAYS days before ``now``."""
    out = []
    for i in range(n):
        seen = now - timedelta(seconds=(i * 7919) % (DAYS * 86400))
        budget = i % 5 == 0
        out.append(
            Alert(
                event_id=uuid.UUID(int=i + 1),
                alert_type="budget" if budget else "spike",
                state="resolved" if i % 3 == 0 and not budget else "firing",
                severity=("info", "warning", "critical")[i % 3],
                rule=f"budget-{i % 40}" if budget else f"rule-{i % 12}",
                dimension=("tenant", "team", "user", "model", "provider")[i % 5],
                value=f"value-{i % 50}",
                metric="spend" if budget else "cost",
                observed=Decimal(i % 1000) / 7,
                baseline=Decimal(100),
                threshold=Decimal(80) if budget else None,
                window_start=seen - timedelta(minutes=1),
                window_end=seen,
                first_seen=seen,
                message=f"alert {i}",
            )
        )
    return out


def settle(store: Store, quiet_s: float = 5.0, limit_s: float = 900.0) -> float:
    """Wait until no merge has run for ``quiet_s`` (background merges after a fill make
    timings noisy); seconds waited."""
    started = time.perf_counter()
    calm_since = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if int(store.command(MERGES_SQL)):
            calm_since = time.perf_counter()
        elif time.perf_counter() - calm_since >= quiet_s:
            break
        time.sleep(0.5)
    return time.perf_counter() - started


def prepare(directory: Path, rows: int) -> tuple[Store, datetime, float | None]:
    """The store (filled if new), its data's now, and the fill's seconds (None when
    reused)."""
    directory.mkdir(parents=True, exist_ok=True)
    store = Store(f"chdb:///{directory / 'clickhouse'}")
    migrate(store)
    stamp = directory / "bench_now.txt"
    have = int(store.command("SELECT count() FROM calls"))
    if have == rows and stamp.exists():
        print(f"reusing {have:,} calls in {directory}", file=sys.stderr)
        return store, datetime.fromisoformat(stamp.read_text().strip()), None
    if have:
        store.close()
        raise SystemExit(f"{directory} holds {have:,} calls, not {rows:,}: use a new directory")
    now = datetime.now(UTC).replace(microsecond=0)
    print(f"filling {rows:,} calls...", file=sys.stderr)
    took = fill(store, rows, now)
    store_batch(store, synthetic_alerts(now, ALERTS), [], [])
    stamp.write_text(now.isoformat())
    print("waiting for merges to settle...", file=sys.stderr)
    settle(store)
    return store, now, took


def merge(store: Store) -> float:
    """Merge the rollups' parts, as their min_age_to_force_merge_seconds does an hour
    after the calls arrived; seconds."""
    started = time.perf_counter()
    for statement in MERGE_SQL.read_text().split(";"):
        lines = [line for line in statement.splitlines() if not line.startswith("--")]
        if "".join(lines).strip():
            store.command("\n".join(lines))
    return time.perf_counter() - started


def table_sizes(store: Store) -> list[dict[str, Any]]:
    """Rows, active parts and bytes of `calls`, `alerts` and the rollups."""
    return store.rows(SIZES_SQL.read_text(), {"tables": ["calls", "alerts", *ROLLUPS]})


# -- the requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    endpoint: str
    query: tuple[tuple[str, str], ...] = ()
    key: str = "admin"  # or "tenant": a virtual key bound to one tenant

    @property
    def label(self) -> str:
        shown = "&".join(f"{k}={v}" for k, v in self.query)
        scope = " (tenant key)" if self.key == "tenant" else ""
        return f"`{self.endpoint}`{' ' + shown if shown else ''}{scope}"


def cases() -> Iterator[Case]:
    yield Case("models")
    yield Case("timeseries")
    yield Case("timeseries", (("granularity", "hour"),))
    yield Case("providers")
    for group in (*params.GROUP_BY, "property:customer"):
        yield Case("costs", (("group_by", group),))
    yield Case("usage")
    yield Case("usage", (("user_id", "user-3"),))
    yield Case("usage", (("model_id", "openai-model-0"),))
    yield Case("usage", (), key="tenant")
    yield Case("performance")
    yield Case("performance", (("model_id", "anthropic-model-1"),))
    yield Case("users")
    yield Case("users", (("limit", "1000"),))
    yield Case("alerts")


RAW_CASES = (Case("usage"), Case("models"), Case("costs", (("group_by", "team"),)))


def app_for(store: Store, settings: Settings, source: str) -> web.Application:
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings, source=source)
    return app


async def timed(
    client: TestClient[Any, Any], case: Case, range_: str, reps: int, keys: dict[str, str]
) -> list[float]:
    """Milliseconds per request, ``reps`` requests after one warm-up."""
    query = {"range": range_, **dict(case.query)}
    headers = {"Authorization": f"Bearer {keys[case.key]}"}
    out = []
    for i in range(reps + 1):
        started = time.perf_counter()
        async with client.get(
            f"/api/v1/analytics/{case.endpoint}", params=query, headers=headers
        ) as response:
            body = await response.read()
            assert response.status == 200, (case, range_, body[:300])
        if i:  # the first is a warm-up
            out.append((time.perf_counter() - started) * 1000)
    return out


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def measure(
    store: Store, now: datetime, directory: Path, reps: int, raw_reps: int
) -> tuple[dict[tuple[Case, str], list[float]], dict[tuple[Case, str], list[float]]]:
    params.utcnow = lambda: now  # the data's clock (see the module docstring)
    settings = Settings(
        data_dir=directory, admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]
    )
    tenant_key, _ = create_key(settings.key_file, tenant="acme")
    keys = {"admin": ADMIN_KEY, "tenant": tenant_key}
    rollup: dict[tuple[Case, str], list[float]] = {}
    raw: dict[tuple[Case, str], list[float]] = {}
    async with TestClient(TestServer(app_for(store, settings, "rollup"))) as client:
        for case in cases():
            for range_ in RANGES:
                rollup[case, range_] = await timed(client, case, range_, reps, keys)
            row = [f"{statistics.median(rollup[case, r]):.0f}" for r in RANGES]
            print(f"  {case.label}: median ms {' / '.join(row)}", file=sys.stderr)
    async with TestClient(TestServer(app_for(store, settings, "raw"))) as client:
        for case in RAW_CASES:
            for range_ in RANGES:
                raw[case, range_] = await timed(client, case, range_, raw_reps, keys)
            row = [f"{statistics.median(raw[case, r]):.0f}" for r in RANGES]
            print(f"  raw {case.label}: median ms {' / '.join(row)}", file=sys.stderr)
    return rollup, raw


# -- the report -----------------------------------------------------------------------


def render(
    args: argparse.Namespace,
    now: datetime,
    fill_s: float | None,
    sizes: list[dict[str, Any]],
    rollup: dict[tuple[Case, str], list[float]],
    raw: dict[tuple[Case, str], list[float]],
) -> str:
    load = os.getloadavg()
    lines = [
        "# Analytics API benchmark (chDB, rollups)",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores "
        f"(shared with other work: load average {load[0]:.1f} at the end), "
        f"Python {platform.python_version()}",
        f"- data: {args.rows:,} calls over {DAYS} days before {now:%Y-%m-%d %H:%M} UTC "
        "(bench/analytics_calls.sql: 50 models, 5 providers, 1,000 users, 4 tenants, "
        "20 teams, 5 features, Zipf-like skew, ~4.7% errors, ~4% without a cost), "
        f"{ALERTS:,} alerts"
        + (
            f"; filled in {fill_s:.0f} s ({args.rows / fill_s:,.0f} calls/s into `calls`, "
            f"its {len(ROLLUPS)} materialized views and its by_time projection)"
            if fill_s
            else "; store reused"
        ),
        (
            "- rollups: their parts merged first (`bench/analytics_merge.sql`), as "
            "`min_age_to_force_merge_seconds` leaves them an hour after the calls arrive"
            if not args.no_merge
            else "- rollups: as the fill left them (`--no-merge`: several parts a partition)"
        ),
        f"- each request: GET through the real aiohttp app on 127.0.0.1 (admin key unless "
        f"noted), end to end; {args.reps} requests after one warm-up, one at a time",
        "",
        "| table | rows | parts | MiB |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{s['table']}` | {s['rows']:,} | {s['parts']} | {s['bytes'] / 2**20:,.0f} |"
        for s in sizes
    ]
    lines += [
        "",
        f"## Rollup-backed endpoints: median / p95 ms (target p95 < {TARGET_MS:.0f} ms)",
        "",
        "| endpoint | " + " | ".join(RANGES) + " |",
        "|---|" + "---:|" * len(RANGES),
    ]
    missed = []
    seen_cases = list(dict.fromkeys(case for case, _ in rollup))
    for case in seen_cases:
        cells = []
        for range_ in RANGES:
            samples = rollup[case, range_]
            tail = p95(samples)
            mark = "" if tail < TARGET_MS else " ✗"
            if tail >= TARGET_MS:
                missed.append((case, range_, tail))
            cells.append(f"{statistics.median(samples):.0f} / {tail:.0f}{mark}")
        lines.append(f"| {case.label} | " + " | ".join(cells) + " |")
    worst = max(rollup.items(), key=lambda kv: p95(kv[1]))
    lines += [
        "",
        f"Slowest p95: {worst[0][0].label} {worst[0][1]}: {p95(worst[1]):.0f} ms. "
        + (
            f"{len(missed)} of {len(rollup)} endpoint/range pairs miss the target (✗)."
            if missed
            else f"Every endpoint/range pair is under {TARGET_MS:.0f} ms at p95."
        ),
        "",
        f"## The same requests from the raw `calls` table ({args.raw_reps} requests each)",
        "",
        "| endpoint | range | raw median / p95 ms | rollups median / p95 ms | raw / rollups |",
        "|---|---|---:|---:|---:|",
    ]
    for case in RAW_CASES:
        for range_ in RANGES:
            a, b = raw[case, range_], rollup[case, range_]
            ratio = statistics.median(a) / statistics.median(b)
            lines.append(
                f"| {case.label} | {range_} | {statistics.median(a):.0f} / {p95(a):.0f} | "
                f"{statistics.median(b):.0f} / {p95(b):.0f} | {ratio:.1f}x |"
            )
    lines.append("")
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("directory", type=Path, help="where the chDB store lives (reused)")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--raw-reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/analytics.md"))
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="measure the rollups as the fill left them (several parts a partition)",
    )
    args = parser.parse_args()

    store, now, fill_s = prepare(args.directory, args.rows)
    try:
        if not args.no_merge:
            print(f"merged the rollups' parts in {merge(store):.0f} s", file=sys.stderr)
        sizes = table_sizes(store)
        rollup, raw = await measure(store, now, args.directory, args.reps, args.raw_reps)
    finally:
        store.close()
    report = render(args, now, fill_s, sizes, rollup, raw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
