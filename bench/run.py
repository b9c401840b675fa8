"""System benchmark: the whole llmtap system under a realistic mix, side by side with
LiteLLM's proxy and a bare aiohttp pass-through, against one fake upstream.

    python bench/run.py [--upstream-latency-ms 50] [--rate 30] [--rounds 5] \\
        [--duration 60] [--concurrency 128] [--throughput-duration 25] [--smoke]

Starts, each its own process on 127.0.0.1 (ports chosen free):

- the fake upstream (bench/fake_upstream.py) with ``--latency-ms``, usage that depends
  on the request, and per-caller counts (``/stats``);
- llmtap, whole: ``llmtap up`` with a config in a temporary data dir (broker, store
  with the analytics API, stream worker, ingress), virtual keys for several tenants
  made with ``llmtap keys create``, an admin key from ``llmtap keys admin``, the fake
  as the OpenAI (and Anthropic) upstream, and budgets: a hard cap never reached
  (admission runs on every call of that tenant), a soft budget, and a hard cap on a
  tenant of its own sized so that the budget step crosses it;
- the bare aiohttp pass-through (bench/bare_proxy.py);
- LiteLLM's proxy (``litellm --config``, the ``bench`` extra): one worker, no database,
  a fixed master key, every model routed to the fake as an OpenAI-compatible
  ``api_base``, no retries, no cooldowns, no callbacks, errors-only logging.

The load is bench/loadgen.py with a mix (a new process per measurement): several
models, ~30% streaming, a share of upstream 500s and 429s, several tenants and keys,
prompts of several sizes, ``max_tokens`` on some calls, an attribution header on some.

1. Latency at a fixed rate (open loop, no coordinated omission): direct, bare, llmtap
   and LiteLLM in interleaved rounds, the order rotated each round. Added latency =
   target minus direct, per round, at p50 and p99; medians over rounds.
2. Maximum sustained requests/s: closed loop, N concurrent workers, same rounds.
3. llmtap only: freshness (from a call's end to its row being visible through the
   read-only SQL endpoint, by its ``x-request-id``) under the same mixed load; budget
   enforcement (from the call that crosses a hard cap to the first 429); accounting
   (calls and cost in ClickHouse against what the load generator sent and got back,
   and against the usage the fake reported, priced with the catalog).

Progress goes to stderr; the report to bench/results/system.md and system.json.
Issue target: llmtap's added latency at most a tenth of LiteLLM's at p50 and p99, and
its sustained requests/s at least 5x LiteLLM's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from ingress_latency import Fleet, StartupFailed
from system.llmtap_checks import accounting, budget, freshness
from system.measure import Bench, Segment, rotations
from system.mix import budget_mix, make_mix
from system.processes import BENCH, get_json, loadavg, progress, wait_for_quiet_machine
from system.report import render, summary
from system.targets import UPSTREAM_CALLER, start_system, stop_system


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--upstream-latency-ms", type=float, default=50.0, help="the fake's delay per answer")
    add("--rate", type=float, default=30.0, help="open loop requests/s (a rate LiteLLM sustains)")
    add("--duration", type=float, default=60.0, help="latency: seconds measured per target")
    add("--warmup", type=float, default=10.0, help="latency: warm-up seconds per target")
    add("--rounds", type=int, default=5, help="interleaved rounds")
    add("--concurrency", type=int, default=128, help="closed loop workers")
    add("--target-warmup", type=float, default=5.0, help="seconds of load per target first")
    add("--throughput-duration", type=float, default=25.0, help="seconds per target")
    add("--stream-share", type=float, default=0.3, help="share of streaming calls")
    add("--error-share", type=float, default=0.05, help="share of upstream 500/429s")
    add("--mix-size", type=int, default=500, help="distinct requests in the mix")
    add("--seed", type=int, default=7)
    add("--freshness-duration", type=float, default=30.0, help="seconds of probes")
    add("--freshness-rate", type=float, default=100.0, help="mixed load on llmtap meanwhile")
    add("--probe-rate", type=float, default=5.0, help="freshness probe calls/s")
    add("--poll-interval", type=float, default=0.1, help="freshness: seconds between polls")
    add("--budget-rate", type=float, default=100.0, help="capped tenant's calls/s")
    add("--budget-duration", type=float, default=12.0, help="seconds of the budget step")
    add("--budget-cross-after-s", type=float, default=5.0, help="when the load crosses the cap")
    add("--max-load", type=float, default=2.0, help="wait until the load average is <= this")
    add("--max-wait-min", type=float, default=20.0, help="...for at most this long")
    add("--no-litellm", action="store_true", help="leave LiteLLM out")
    add("--smoke", action="store_true", help="short run to check that everything works")
    add("--out", type=Path, help="default results/system.md (--smoke: in the temp dir)")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.warmup, args.rounds = 4.0, 2.0, 2
        args.throughput_duration, args.freshness_duration = 4.0, 5.0
        args.target_warmup = 2.0
        args.budget_duration, args.budget_cross_after_s = 6.0, 2.0
        args.max_load = 0.0
    if args.out is None:
        smoke = Path(tempfile.gettempdir()) / "llmtap-system-smoke.md"
        args.out = smoke if args.smoke else BENCH / "results" / "system.md"
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    notes = wait_for_quiet_machine(args.max_load, args.max_wait_min * 60)
    started, t0, load_start = datetime.now(UTC), time.monotonic(), loadavg()
    segments: list[Segment] = []
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmtap-system-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fleet = Fleet(tmp)
        try:
            system = start_system(fleet, tmp, args)
            mix = make_mix(args.mix_size, args.stream_share, args.error_share, args.seed)
            bench = Bench(system, mix, budget_mix(args.mix_size, args.seed + 1))
            progress(f"up: {', '.join(system.targets)}; checking one call of each kind")
            sanity = asyncio.run(bench.sanity())
            progress(f"warm-up: {args.target_warmup:g} s of the mix at {args.rate:g}/s per target")
            for target in system.targets:
                extra = ["--rate", str(args.rate), "--warmup", "0"]
                extra += ["--duration", str(args.target_warmup)]
                bench.measure("warm-up", target, 0, extra)
            per = ["--duration", str(args.duration / args.rounds)]
            per += ["--warmup", str(args.warmup / args.rounds)]
            progress(f"latency: open loop at {args.rate:g}/s, {args.rounds} rounds")
            for r, order in rotations(system.targets, args.rounds):
                for target in order:
                    extra = ["--rate", str(args.rate), *per]
                    segments.append(bench.measure("latency", target, r, extra))
            progress(f"throughput: closed loop, {args.concurrency} workers, {args.rounds} rounds")
            closed = ["--closed", str(args.concurrency), "--warmup", "2"]
            closed += ["--duration", str(args.throughput_duration / args.rounds)]
            for r, order in rotations(system.targets, args.rounds):
                for target in order:
                    segments.append(bench.measure("throughput", target, r, closed))
            progress("llmtap freshness (probes under the mixed load)")
            fresh = asyncio.run(freshness(bench, args))
            progress("llmtap budget enforcement")
            bud = budget(bench, args)
            progress("llmtap accounting")
            acc = accounting(bench)
            stats = get_json(f"{system.fake_url}/stats")
            upstream_calls = {}
            for target in system.targets:
                if target == "llmtap":
                    expected = acc.fake_expected_calls
                else:
                    expected = bench.sent[target]
                got = stats.get(UPSTREAM_CALLER[target], {}).get("requests", 0)
                upstream_calls[target] = got / expected if expected else float("nan")
            report = {
                "started": f"{started:%Y-%m-%d %H:%M}",
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "targets": list(system.targets),
                "environment": {
                    "cores": os.cpu_count(),
                    "system": f"{platform.system()} {platform.release()}",
                    "python": platform.python_version(),
                    "aiohttp": aiohttp.__version__,
                    "load_start": load_start,
                    "notes": notes,
                },
                "litellm": {
                    "version": system.litellm_version,
                    "config": system.litellm_config,
                    "skipped": system.litellm_skipped,
                },
                "budgets": system.budgets,
                "sanity": sanity,
                "summary": summary(segments, system.targets),
                "freshness": asdict(fresh),
                "budget": asdict(bud),
                "accounting": asdict(acc),
                "upstream_calls": upstream_calls,
                "segments": [asdict(s) for s in segments],
            }
        except StartupFailed as exc:
            progress(f"startup failed: {exc}")
            return 1
        except KeyboardInterrupt:
            progress("interrupted: stopping every process started")
            return 130
        except Exception:
            for server in fleet.servers.values():
                progress(f"--- {server.name} log tail:\n{server.log_tail(15)}")
            raise
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                progress("stopping everything")
                stop_system(fleet)
    report["took_s"] = time.monotonic() - t0
    report["environment"]["load_end"] = loadavg()
    text = render(report, segments)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
