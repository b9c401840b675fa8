"""Processes and helpers: process trees and their CPU time, the load-average wait,
progress lines, the llmtap CLI, JSON over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingress_latency import StartupFailed

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(stat.parent.name))
    return children


def process_tree(pid: int) -> list[int]:
    children, tree, todo = _ppid_map(), [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_quiet_machine(max_load: float, max_wait_s: float) -> list[str]:
    """Wait (polling every 60 s) until the 1-minute load average is at most max_load."""
    notes = []
    deadline = time.monotonic() + max_wait_s
    while (load := loadavg()) > max_load > 0:
        if time.monotonic() >= deadline:
            notes.append(f"load average still {load:.2f} after {max_wait_s / 60:.0f} min: ran")
            break
        progress(f"load average {load:.2f} > {max_load:g}: waiting 60 s for it to drop")
        notes.append(f"waited: load average {load:.2f} at {datetime.now(UTC):%H:%M} UTC")
        time.sleep(60)
    return notes


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_cli(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StartupFailed(f"{' '.join(argv)} failed:\n{done.stderr}")
    return done.stdout


def post_json(url: str, body: dict[str, Any], key: str, timeout: float = 30) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())
