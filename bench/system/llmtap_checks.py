"""llmtap only: freshness (a call's end to its row visible through SQL), budget
enforcement (the call crossing a hard cap to the first 429), accounting (what was sent
against ClickHouse and the fake upstream's counts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
from ingress_latency import percentile
from loadgen import MixEntry, call_mixed

from llmtap.events import Usage
from stream.catalog import load_catalog
from system.measure import Bench, as_record, read_records, run_loadgen
from system.mix import Entry, fake_usage, price, usage_of
from system.processes import BENCH, ROOT, get_json, progress
from system.targets import UPSTREAM_CALLER


@dataclass
class Freshness:
    sampled: int
    seen: int
    p50_s: float
    p99_s: float
    max_s: float
    poll_interval_s: float
    poll_p50_ms: float  # how long one SQL poll took
    background: dict[str, Any]


async def freshness(bench: Bench, args: argparse.Namespace) -> Freshness:
    """Probe calls (non-stream, gpt-4o-mini) at --probe-rate while the mix runs against
    llmtap at --rate; poll the SQL endpoint for their request ids."""
    system = bench.system
    records_path = bench.records_path()
    argv = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--url",
        system.urls["llmtap"],
        "--mix",
        str(system.mixes["llmtap"]),
        "--records",
        str(records_path),
        "--rate",
        str(args.freshness_rate),
        "--warmup",
        "0",
        "--duration",
        str(args.freshness_duration),
    ]
    background = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    probe_index = next(i for i, e in enumerate(bench.mix) if e.upstream_error is None)
    probe = bench.mix[probe_index]
    body = dict(probe.body, stream=False, model="gpt-4o-mini")
    body.pop("stream_options", None)
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {system.llmtap_keys[probe.key]}",
    }
    entry = MixEntry(json.dumps(body).encode(), headers, False)
    ended: dict[str, float] = {}
    visible: dict[str, float] = {}
    poll_ms: list[float] = []
    stop = asyncio.Event()

    async def prober(session: aiohttp.ClientSession) -> None:
        next_at = time.monotonic()
        until = next_at + args.freshness_duration
        while time.monotonic() < until:
            answer = await call_mixed(session, system.urls["llmtap"], entry)
            end = time.time()
            bench.ledger.add(
                Entry(probe.key, body, {}, "gpt-4o-mini", False, None), as_record(answer, end)
            )
            if answer.status == 200 and answer.request_id:
                ended[str(uuid.UUID(answer.request_id))] = end
            next_at += 1 / args.probe_rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        stop.set()

    async def poller() -> None:
        grace_until: float | None = None
        while True:
            if stop.is_set() and grace_until is None:
                grace_until = time.monotonic() + 30
            pending = [rid for rid in ended if rid not in visible]
            if stop.is_set() and (not pending or time.monotonic() > (grace_until or 0)):
                return
            if pending:
                ids = ", ".join(f"toUUID('{rid}')" for rid in pending)
                query = f"SELECT toString(request_id) FROM calls WHERE request_id IN ({ids})"
                sent = time.monotonic()
                rows = await asyncio.to_thread(system.sql, query)
                poll_ms.append((time.monotonic() - sent) * 1000)
                now = time.time()
                for (rid,) in rows:
                    visible.setdefault(rid, now)
            await asyncio.sleep(args.poll_interval)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(prober(session), poller())
    out, err = await asyncio.wait_for(background.communicate(), args.freshness_duration + 120)
    if background.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{err.decode(errors='replace')}")
    result = json.loads(out)
    for record in read_records(records_path):
        bench.ledger.add(bench.mix[record["entry"]], record)
    delays = [visible[rid] - end for rid, end in ended.items() if rid in visible]
    fresh = Freshness(
        sampled=len(ended),
        seen=len(delays),
        p50_s=percentile(delays, 50),
        p99_s=percentile(delays, 99),
        max_s=max(delays, default=float("nan")),
        poll_interval_s=args.poll_interval,
        poll_p50_ms=percentile(poll_ms, 50),
        background={
            "rate": args.freshness_rate,
            "answers": result["ok"],
            "statuses": result["statuses"],
            "errors": result["errors"],
            "p50_ms": percentile(result["latencies_ms"], 50),
            "p99_ms": percentile(result["latencies_ms"], 99),
        },
    )
    progress(
        f"  freshness: {fresh.seen}/{fresh.sampled} probe calls visible; p50 {fresh.p50_s:.2f} s"
        f"  p99 {fresh.p99_s:.2f} s  max {fresh.max_s:.2f} s  (background "
        f"{result['ok']:,} calls at {args.freshness_rate:g}/s)"
    )
    return fresh


@dataclass
class BudgetResult:
    cap_usd: str
    rate: float
    sent: int
    admitted: int
    refused: int
    other: dict[str, int]
    offered_cross_index: int | None  # the call with which the offered load crosses the cap
    first_refusal_index: int | None
    first_refusal_vs_offered_s: float | None  # negative: refused before the load crossed
    crossing_call_index: int | None  # the admitted call that took real spend over the cap
    lag_ms: float | None  # from that call's end to the first 429's end
    spent_at_first_refusal_pct: float | None
    spent_final_usd: str
    spent_final_pct: float
    admitted_after_first_refusal: int


def budget(bench: Bench, args: argparse.Namespace) -> BudgetResult:
    system = bench.system
    records_path = bench.records_path()
    extra = ["--rate", str(args.budget_rate), "--warmup", "0"]
    extra += ["--duration", str(args.budget_duration)]
    result = run_loadgen(system.urls["llmtap"], system.budget_mix_path, records_path, extra)
    records = sorted(read_records(records_path), key=lambda r: r["i"])
    catalog = load_catalog()
    cap = system.cap_usd
    # The offered load: every call as if admitted, in the order they were due.
    offered = Decimal(0)
    offered_cross = None
    for r in records:
        offered += price(
            catalog, "gpt-4o-mini", usage_of(list(fake_usage(bench.capped_mix[r["entry"]].body)))
        )
        if offered > cap:
            offered_cross = r["i"]
            break
    refused = [r for r in records if r["status"] == 429 and r["code"] == "budget_exceeded"]
    refused_ids = {r["i"] for r in refused}
    first = min(refused, key=lambda r: r["end"]) if refused else None
    spent = Decimal(0)
    spent_at_first = None
    crossing = None
    admitted = [r for r in records if r["status"] == 200 and r["usage"]]
    for r in sorted(admitted, key=lambda r: r["end"]):
        if first is not None and spent_at_first is None and r["end"] > first["end"]:
            spent_at_first = spent
        spent += price(catalog, "gpt-4o-mini", usage_of(r["usage"]))
        if crossing is None and spent > cap:
            crossing = r
    if first is not None and spent_at_first is None:
        spent_at_first = spent
    for record in records:
        bench.ledger.add(bench.capped_mix[record["entry"]], record)
    other = Counter(
        str(r["status"]) if r["error"] is None else str(r["error"])
        for r in records
        if r["status"] != 200 and r["i"] not in refused_ids
    )
    outcome = BudgetResult(
        cap_usd=str(cap),
        rate=args.budget_rate,
        sent=len(records),
        admitted=len(admitted),
        refused=len(refused),
        other=dict(other),
        offered_cross_index=offered_cross,
        first_refusal_index=first["i"] if first else None,
        first_refusal_vs_offered_s=(
            (first["i"] - offered_cross) / args.budget_rate
            if first is not None and offered_cross is not None
            else None
        ),
        crossing_call_index=crossing["i"] if crossing else None,
        lag_ms=(first["end"] - crossing["end"]) * 1000 if first and crossing else None,
        spent_at_first_refusal_pct=(
            float(spent_at_first / cap * 100) if spent_at_first is not None else None
        ),
        spent_final_usd=str(spent),
        spent_final_pct=float(spent / cap * 100),
        admitted_after_first_refusal=sum(1 for r in admitted if first and r["end"] > first["end"]),
    )
    progress(
        f"  budget: cap ${cap}; {outcome.admitted} admitted, {outcome.refused} refused "
        f"(first at call #{outcome.first_refusal_index}, the offered load crosses at "
        f"#{outcome.offered_cross_index}); spent {outcome.spent_final_pct:.1f}% of the cap; "
        f"lag {'none crossed' if outcome.lag_ms is None else f'{outcome.lag_ms:.0f} ms'}"
        f"  ({result['ok']} answers)"
    )
    return outcome


@dataclass
class Accounting:
    sent: int
    sent_with_id: int
    sent_by_status: dict[str, int]
    rows: int
    distinct_ids: int
    missing: int  # sent (with an id) but not in ClickHouse
    unexpected: int  # in ClickHouse but never sent
    duplicates: int
    ch_by_status: dict[str, int]
    cost_sent_usd: str  # per call: usage the load generator got back x catalog price
    cost_ch_usd: str
    cost_fake_usd: str  # the fake's usage totals for llmtap's calls x catalog price
    fake_calls: int
    fake_expected_calls: int
    tokens_sent: list[int]  # prompt, completion
    tokens_ch: list[int]
    tokens_fake: list[int]
    drain_s: float
    by_tenant: dict[str, dict[str, Any]]


def money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.000000001")))


def sent_status(row: dict[str, Any]) -> str:
    status, code = row["status"], row["code"]
    if status == 200 and row["error"] is None:
        return "ok"
    if status == 429 and code == "budget_exceeded":
        return "budget_exceeded"
    if status in (429, 500):
        return "upstream_error"
    return f"other ({row['error'] or status})"


def accounting(bench: Bench) -> Accounting:
    system = bench.system
    drain_s = bench.drain()
    catalog = load_catalog()
    rows = bench.ledger.rows
    ids = {str(uuid.UUID(r["rid"])) for r in rows if r["rid"]}
    in_ch: list[str] = []
    while True:
        page = system.sql(
            "SELECT toString(request_id) FROM calls ORDER BY request_id "
            f"LIMIT 10000 OFFSET {len(in_ch)}"
        )
        in_ch += [r[0] for r in page]
        if len(page) < 10000:
            break
    ch_ids = set(in_ch)
    by_status = {
        str(status): int(n)
        for status, n in system.sql("SELECT status, count() FROM calls GROUP BY status")
    }
    cost_row = system.sql(
        "SELECT toString(sum(cost_total)), sum(input_tokens), sum(output_tokens) FROM calls"
    )[0]
    cost_sent = Decimal(0)
    tokens_sent = [0, 0]
    tenants: dict[str, dict[str, Any]] = defaultdict(lambda: {"sent": 0, "cost_sent": Decimal(0)})
    for r in rows:
        tenants[r["tenant"]]["sent"] += 1
        if sent_status(r) == "ok" and r["usage"]:
            cost = price(catalog, r["model"], usage_of(r["usage"]))
            cost_sent += cost
            tenants[r["tenant"]]["cost_sent"] += cost
            tokens_sent[0] += r["usage"][0]
            tokens_sent[1] += r["usage"][1]
    for tenant, calls, cost in system.sql(
        "SELECT tenant, count(), toString(sum(cost_total)) FROM calls GROUP BY tenant"
    ):
        tenants[tenant]["rows"] = int(calls)
        tenants[tenant]["cost_ch"] = Decimal(cost)
    fake = get_json(f"{system.fake_url}/stats").get(UPSTREAM_CALLER["llmtap"], {})
    cost_fake = Decimal(0)
    tokens_fake = [0, 0]
    for model, t in fake.get("usage", {}).items():
        usage = Usage(
            input_tokens=t["prompt_tokens"],
            output_tokens=t["completion_tokens"],
            cached_input_tokens=t["cached_tokens"],
            reasoning_tokens=t["reasoning_tokens"],
        )
        cost_fake += price(catalog, model, usage)
        tokens_fake[0] += t["prompt_tokens"]
        tokens_fake[1] += t["completion_tokens"]
    sent_by = Counter(sent_status(r) for r in rows)
    result = Accounting(
        sent=len(rows),
        sent_with_id=len(ids),
        sent_by_status=dict(sent_by),
        rows=len(in_ch),
        distinct_ids=len(ch_ids),
        missing=len(ids - ch_ids),
        unexpected=len(ch_ids - ids),
        duplicates=len(in_ch) - len(ch_ids),
        ch_by_status=by_status,
        cost_sent_usd=money(cost_sent),
        cost_ch_usd=money(Decimal(cost_row[0])),
        cost_fake_usd=money(cost_fake),
        fake_calls=int(fake.get("requests", 0)),
        fake_expected_calls=sum(
            n for status, n in sent_by.items() if status in ("ok", "upstream_error")
        ),
        tokens_sent=tokens_sent,
        tokens_ch=[int(cost_row[1]), int(cost_row[2])],
        tokens_fake=tokens_fake,
        drain_s=drain_s,
        by_tenant={
            k: {kk: money(vv) if isinstance(vv, Decimal) else vv for kk, vv in v.items()}
            for k, v in sorted(tenants.items())
        },
    )
    progress(
        f"  accounting: sent {result.sent:,} calls, ClickHouse {result.rows:,} rows "
        f"({result.missing} missing, {result.duplicates} duplicated, {result.unexpected} "
        f"unexpected); cost sent ${result.cost_sent_usd}, in ClickHouse ${result.cost_ch_usd}, "
        f"fake usage x price ${result.cost_fake_usd}"
    )
    return result
