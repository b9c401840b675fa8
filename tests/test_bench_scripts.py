"""The benchmark scripts (bench/) measure and compute what their reports say.

No benchmark runs here: the scripts' own functions are called with made-up inputs,
and their processes are stubbed where a function would start one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the scripts import each other as top-level modules


# --- issue #3: the ingress benchmark's target is "with metering, auth, and budget checks on"


def test_ingress_bench_measures_llmtap_with_a_hard_cap_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ingress_latency

    started: dict[str, dict[str, Any]] = {}

    class Dummy:
        def alive(self) -> bool:
            return True

    def start(
        self: ingress_latency.Fleet, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> Any:
        started[name] = {"argv": argv, "env": env or {}}
        return Dummy()

    monkeypatch.setattr(ingress_latency.Fleet, "start", start)
    monkeypatch.setattr(ingress_latency, "wait_until", lambda *args, **kwargs: None)
    ingress_latency.start_all(ingress_latency.Fleet(tmp_path), tmp_path)

    env = started["ingress"]["env"]
    budgets = json.loads(env.get("LLMTAP_BUDGETS", "[]"))
    keys = (tmp_path / "llmtap" / "keys.yaml").read_text()
    capped = [
        b
        for b in budgets
        if b.get("hard_cap", True) and b["scope"] == "tenant" and f"tenant: {b['value']}" in keys
    ]
    assert capped, "the ingress runs with no hard-capped budget over the bench key's tenant"
    # Budget states come from the stream worker, as in production: without one, every
    # settled cost stays held (and scanned at each admission) for an hour.
    assert "worker" in started
    assert started["worker"]["env"].get("LLMTAP_BUDGETS") == env["LLMTAP_BUDGETS"]


# --- issue #7: the soak's "RSS of every process"


def test_soak_memory_counts_the_store_decode_processes(tmp_path: Path) -> None:
    import soak

    # A parent standing for `llmtap up`, its child "store", which has a child of its own
    # holding ~64 MB (as the store's decode processes do, ~330 MB each at their peak).
    script = (
        "import subprocess, sys, time\n"
        "if sys.argv[-1] == 'up':\n"
        "    subprocess.Popen([sys.executable, __file__, 'store'])\n"
        "elif sys.argv[-1] == 'store':\n"
        "    subprocess.Popen([sys.executable, __file__, 'decode'])\n"
        "else:\n"
        "    held = bytearray(64 * 1024 * 1024)\n"
        "time.sleep(30)\n"
    )
    path = tmp_path / "tree.py"
    path.write_text(script)
    up = subprocess.Popen([sys.executable, str(path), "up"])
    try:
        deadline = time.monotonic() + 20
        rss: dict[str, float] = {}
        while time.monotonic() < deadline:
            roles = soak.children(up.pid)
            if "store" in roles:
                rss = soak.rss_by_role(roles)
                if rss["store"] > 60:
                    break
            time.sleep(0.2)
        assert rss.get("store", 0.0) > 60, f"the store's child process is not counted: {rss}"
    finally:
        for pid in soak.descendants(up.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        up.kill()
        up.wait()


# --- the stream bench's lag percentiles


def test_stream_lag_percentiles_are_not_a_rank_high() -> None:
    from stream_throughput import percentile

    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    # p99 of 100 values is not their maximum
    assert percentile([float(v) for v in range(1, 101)], 0.99) == pytest.approx(99.01)


# --- the stream floor: events/s "from its first batch to its last"


def test_stream_floor_rate_counts_what_arrived_on_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiokafka
    import stream_floor

    class FakeConsumer:
        """Hands over 1,000 records every 50 ms: 20,000 events/s."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

        async def commit(self) -> None:
            pass

        async def getmany(self, timeout_ms: int, max_records: int) -> dict[str, list[int]]:
            await asyncio.sleep(0.05)
            return {"tp": [0] * 1000}

    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", FakeConsumer)
    asyncio.run(stream_floor.aiokafka_reader("unused:0", 4000, str(tmp_path)))
    rate, _ = stream_floor.read_result(tmp_path) or (0.0, 0.0)
    # 3 batches of 1,000 came in the ~150 ms between the first and the last: ~20,000/s,
    # not 4,000 / 0.15 s = ~26,700/s.
    assert rate == pytest.approx(20_000, rel=0.12)


def test_soak_counts_what_the_processes_logged_as_errors() -> None:
    import soak

    log = "\n".join(
        [
            '{"ts":"2026-12-05T00:00:00.000+00:00","level":"INFO","message":"llmtap is up"}',
            '{"ts":"2026-12-05T00:00:01.000+00:00","level":"ERROR","message":"insert failed"}',
            '{"level":"WARNING","message":"slow"}',
            '{"level":"CRITICAL","message":"crashed"}',
            "Traceback (most recent call last):",
            "not json at all",
        ]
    )
    assert soak.logged_errors(log) == 3
