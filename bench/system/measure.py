"""Measuring: one load generator run against one target (latency, requests/s, CPU per
call, other load), the rounds in rotated order, and the ledger of every call sent to
llmtap."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from ingress_latency import machine_busy_seconds, percentile
from loadgen import Answer, MixEntry, call_mixed

from system.mix import CAPPED, KEYS, Entry
from system.processes import BENCH, ROOT, cpu_seconds, progress
from system.targets import System

DRAIN_TIMEOUT_S = 90.0


@dataclass
class Ledger:
    """Every call sent to llmtap, and what came back: the accounting's 'sent' side."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, entry: Entry, record: dict[str, Any]) -> None:
        tenant = CAPPED.tenant if entry.key < 0 else KEYS[entry.key].tenant
        self.rows.append({**record, "tenant": tenant, "model": entry.model})


@dataclass
class Segment:
    """One load generator run against one target."""

    phase: str  # latency | throughput
    target: str
    round: int
    p50_ms: float
    p99_ms: float
    class_ms: dict[str, list[float]]  # stream / non-stream: [p50, p99]
    answers: int
    statuses: dict[str, int]
    errors: int
    error_kinds: dict[str, int]
    rps: float
    sent: int  # warm-up included
    send_lag_p99_ms: float
    proxy_cpu_us: float  # per request: the serving process (llmtap: the ingress)
    system_cpu_us: float  # per request: every process of the target (llmtap: all five)
    loadgen_cpu_us: float
    other_cores: float
    drain_s: float | None  # llmtap: from the end of the load to every row in ClickHouse


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_loadgen(url: str, mix: Path, records: Path, extra: list[str]) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / "loadgen.py"), "--url", url, "--mix", str(mix)]
    argv += ["--records", str(records), *extra]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def class_percentiles(records: list[dict[str, Any]], mix: list[Entry]) -> dict[str, list[float]]:
    by_class: dict[str, list[float]] = {"non-stream": [], "stream": []}
    for r in records:
        if not r["warm"] and r["error"] is None and r["status"] is not None:
            by_class["stream" if mix[r["entry"]].stream else "non-stream"].append(r["lat"])
    return {k: [percentile(v, 50), percentile(v, 99)] for k, v in by_class.items()}


@dataclass
class Bench:
    system: System
    mix: list[Entry]
    capped_mix: list[Entry]
    ledger: Ledger = field(default_factory=Ledger)
    counter: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # calls sent per target, all phases

    def records_path(self) -> Path:
        self.counter += 1
        return self.system.tmp / f"records-{self.counter}.jsonl"

    def rows_in_clickhouse(self) -> int:
        return int(self.system.sql("SELECT count() FROM calls")[0][0])

    def drain(self) -> float:
        """Wait until ClickHouse holds a row for every call sent to llmtap so far (or the
        count stops moving for 10 s); the seconds it took."""
        start = time.monotonic()
        expected = len(self.ledger.rows)
        last, last_change = -1, start
        while time.monotonic() - start < DRAIN_TIMEOUT_S:
            rows = self.rows_in_clickhouse()
            if rows >= expected:
                break
            if rows != last:
                last, last_change = rows, time.monotonic()
            elif time.monotonic() - last_change > 10:
                progress(f"    ClickHouse stuck at {rows:,} rows of {expected:,} expected")
                break
            time.sleep(0.1)
        return time.monotonic() - start

    def measure(self, phase: str, target: str, round_: int, extra: list[str]) -> Segment:
        system = self.system
        serving = system.ingress_pids() if target == "llmtap" else system.pids(target)
        every = system.pids(target)
        records_path = self.records_path()
        ours0, busy0, wall0 = cpu_seconds(system.all_pids()), machine_busy_seconds(), time.time()
        proxy0, all0 = cpu_seconds(serving), cpu_seconds(every)
        result = run_loadgen(system.urls[target], system.mixes[target], records_path, extra)
        proxy1 = cpu_seconds(serving)
        records = read_records(records_path)
        self.sent[target] += len(records)
        drain_s = None
        if target == "llmtap":
            for record in records:
                self.ledger.add(self.mix[record["entry"]], record)
            drain_s = self.drain()
        all1, busy1, wall1 = cpu_seconds(every), machine_busy_seconds(), time.time()
        ours = cpu_seconds(system.all_pids()) - ours0 + result["loadgen_cpu_s"]
        sent = max(1, len(records))
        lat = result["latencies_ms"]
        segment = Segment(
            phase=phase,
            target=target,
            round=round_,
            p50_ms=percentile(lat, 50),
            p99_ms=percentile(lat, 99),
            class_ms=class_percentiles(records, self.mix),
            answers=result["ok"],
            statuses=result["statuses"],
            errors=result["errors"],
            error_kinds=result["error_kinds"],
            rps=result["throughput_rps"],
            sent=len(records),
            send_lag_p99_ms=percentile(result["send_lag_ms"], 99),
            proxy_cpu_us=(proxy1 - proxy0) / sent * 1e6,
            system_cpu_us=(all1 - all0) / sent * 1e6,
            loadgen_cpu_us=result["loadgen_cpu_s"] / sent * 1e6,
            other_cores=max(0.0, (busy1 - busy0 - ours) / (wall1 - wall0)),
            drain_s=drain_s,
        )
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(segment.statuses.items()))
        errors = f"  no answer {segment.error_kinds}" if segment.errors else ""
        drained = f"  rows in {drain_s:.1f}s" if drain_s is not None else ""
        progress(
            f"  {phase:10} round {round_ + 1} {target:7} {segment.sent:6,} sent  "
            f"p50 {segment.p50_ms:7.2f} ms  p99 {segment.p99_ms:7.2f} ms  "
            f"{segment.rps:7.0f} req/s  [{statuses}]  CPU {segment.proxy_cpu_us:5.0f} us/req  "
            f"other load {segment.other_cores:.2f}{drained}{errors}"
        )
        system.check_alive()
        return segment

    async def sanity(self) -> dict[str, dict[str, int]]:
        """One call of each kind through every target: the statuses each answers."""
        system = self.system
        kinds = {"ok": None, "500": 500, "429": 429}
        seen: dict[str, dict[str, int]] = {}
        async with aiohttp.ClientSession() as session:
            for target in system.targets:
                mix = json.loads(system.mixes[target].read_text())["requests"]
                seen[target] = {}
                for kind, error in kinds.items():
                    for stream in (False, True):
                        index = next(
                            i
                            for i, e in enumerate(self.mix)
                            if e.upstream_error == error and e.stream == stream
                        )
                        item = mix[index]
                        headers = {
                            "Content-Type": "application/json",
                            "Authorization": f"Bearer {item['key']}",
                            **item["headers"],
                        }
                        entry = MixEntry(json.dumps(item["body"]).encode(), headers, stream)
                        answer = await call_mixed(session, system.urls[target], entry)
                        label = f"{kind}{' stream' if stream else ''}"
                        seen[target][label] = answer.status or 0
                        self.sent[target] += 1
                        if target == "llmtap":
                            self.ledger.add(self.mix[index], as_record(answer))
                        want = 200 if error is None else error
                        if answer.status != want or answer.error is not None:
                            raise RuntimeError(
                                f"{target}: {label} call answered {answer.status} "
                                f"({answer.error}), expected {want}"
                            )
        return seen


def as_record(answer: Answer, end: float | None = None) -> dict[str, Any]:
    return {
        "status": answer.status,
        "error": answer.error,
        "rid": answer.request_id,
        "end": end if end is not None else time.time(),
        "usage": answer.usage,
        "code": answer.code,
        "warm": True,
        "entry": -1,
        "i": -1,
        "lat": 0.0,
    }


def rotations(targets: tuple[str, ...], rounds: int) -> Iterator[tuple[int, tuple[str, ...]]]:
    for r in range(rounds):
        k = r % len(targets)
        yield r, targets[k:] + targets[:k]
