"""Soak: `llmtap up` under moderate load for a long while; memory, errors and lag.

    python bench/soak.py [--minutes 10] [--rate 50] [--warmup-s 60] \
        [--out bench/results/soak.md]

Starts the fake upstream (bench/fake_upstream.py, 20 ms to first byte) and `llmtap up`
(every process as in production: broker, store, worker, ingress) on a temporary data
dir, makes a virtual key and an admin key, then sends ``--rate`` calls/s (open loop;
a third streamed; one in fifty asks the fake for a 500) for ``--minutes``. Every 10 s
it samples each llmtap process's resident memory (/proc/<pid>/status VmRSS), the calls
sent and failed, and the rows visible in ClickHouse (through the SQL API), so lag is
"sent minus stored". At the end it waits for the backlog to drain and checks that
ClickHouse holds every call exactly once.

Not a test (it takes its minutes); the report goes in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ADMIN_KEY = "lta_soak-admin-key"
SAMPLE_EVERY_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match[1]) / 1024 if match else None


def children(pid: int) -> dict[str, int]:
    """The `llmtap up` supervisor's children, by role."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        for role in ("broker", "store", "worker", "ingress"):
            if f" {role}" in cmdline or cmdline.endswith(role):
                found.setdefault(role, int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, theirs, and so on (read from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(kids.get(pid, ()))
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(kids.get(current, ()))
    return found


def rss_by_role(roles: dict[str, int]) -> dict[str, float]:
    """Resident memory (MB) of each role's process with its own child processes (the
    store's decode processes, started with its first batch, are the store's)."""
    return {
        role: sum(rss_mb(p) or 0.0 for p in [pid, *descendants(pid)]) for role, pid in roles.items()
    }


@dataclass
class Sample:
    at_s: float
    sent: int
    failed: int
    stored: int
    rss: dict[str, float] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def process(
    *argv: str, env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    out = log.open("wb")
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 60)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        out.close()


async def wait_for_line(
    log: Path, line: str, proc: asyncio.subprocess.Process, within_s: float
) -> None:
    deadline = time.monotonic() + within_s
    while line not in await asyncio.to_thread(log.read_text, errors="replace"):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"not up; see {log}")
        await asyncio.sleep(0.2)


async def stored(session: aiohttp.ClientSession, api: str) -> int:
    async with session.post(
        f"{api}/sql", json={"query": "SELECT count() AS n, uniqExact(request_id) AS u FROM calls"}
    ) as response:
        body = await response.json()
    n, unique = body["rows"][0]
    if int(n) != int(unique):
        raise AssertionError(f"duplicate rows in calls: {n} rows, {unique} request ids")
    return int(n)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        upstream_port, proxy_port, api_port = free_port(), free_port(), free_port()
        env = {
            # The soak's settings only: none of the caller's (a namespace, say) leaks in.
            **{k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")},
            "LLMTAP_DATA_DIR": str(data),
            "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "LLMTAP_PROXY_PORT": str(proxy_port),
            "LLMTAP_API_PORT": str(api_port),
            "LLMTAP_WORKER_METRICS_PORT": str(free_port()),
            "LLMTAP_OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "LLMTAP_OPENAI_API_KEY_ENV": "SOAK_PROVIDER_KEY",
            "SOAK_PROVIDER_KEY": "sk-soak",
            "LLMTAP_ADMIN_KEY_HASHES": json.dumps([hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]),
            "LLMTAP_LOG_LEVEL": "WARNING",
        }
        made = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmtap", "keys", "create", "--tenant", "soak",
            "--team", "load", env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        key = (await made.communicate())[0].decode().splitlines()[0]
        fake_argv = (sys.executable, str(HERE / "fake_upstream.py"), "--port", str(upstream_port))
        async with (
            process(*fake_argv, "--latency-ms", "20", env=env, log=Path(tmp) / "fake.log"),
            process(sys.executable, "-m", "llmtap", "up", env=env, log=Path(tmp) / "up.log") as up,
        ):
            await wait_for_line(Path(tmp) / "up.log", "llmtap is up", up, 180)
            roles = children(up.pid)
            print(f"up: {roles}", file=sys.stderr)
            samples, errors = await drive(args, key, proxy_port, api_port, up.pid, roles)
        logged = logged_errors((Path(tmp) / "up.log").read_text(errors="replace"))
        if logged:  # what the processes logged at ERROR or worse is an error too
            errors["logged ERROR/CRITICAL lines"] = logged
    report = render(args, samples, errors)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


async def drive(
    args: argparse.Namespace, key: str, proxy_port: int, api_port: int, up_pid: int,
    roles: dict[str, int],
) -> tuple[list[Sample], dict[str, int]]:  # fmt: skip
    proxy = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
    api = f"http://127.0.0.1:{api_port}/api/v1"
    sent = failed = 0
    errors: dict[str, int] = {}
    samples: list[Sample] = []
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as client,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin,
    ):

        async def call(i: int) -> None:
            nonlocal failed
            stream = i % 3 == 0
            content = "fake-status:500" if i % 50 == 0 else f"hello {i}"
            body = {
                "model": ("gpt-4o-mini", "gpt-4o", "gpt-4.1")[i % 3],
                "messages": [{"role": "user", "content": content}],
                "stream": stream,
            }
            try:
                async with client.post(proxy, json=body) as response:
                    await response.read()
                    expected = 500 if i % 50 == 0 else 200
                    if response.status != expected:
                        failed += 1
                        errors[str(response.status)] = errors.get(str(response.status), 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                failed += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        start = loop.time()
        total = int(args.rate * args.minutes * 60)
        next_sample = start + SAMPLE_EVERY_S
        for i in range(total):
            due = start + i / args.rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            task = asyncio.create_task(call(i))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
            if loop.time() >= next_sample:
                next_sample += SAMPLE_EVERY_S
                sample = Sample(loop.time() - start, sent, failed, await stored(admin, api))
                sample.rss = rss_by_role(roles)
                samples.append(sample)
                print(
                    f"{sample.at_s:6.0f}s sent {sent:,} failed {failed} stored {sample.stored:,} "
                    + " ".join(f"{r} {m:.0f}MB" for r, m in sample.rss.items()),
                    file=sys.stderr,
                )
        await asyncio.gather(*in_flight)
        deadline = loop.time() + 120
        final = await stored(admin, api)
        while final < sent and loop.time() < deadline:
            await asyncio.sleep(1)
            final = await stored(admin, api)
        last = Sample(loop.time() - start, sent, failed, final)
        last.rss = rss_by_role(roles)
        samples.append(last)
    return samples, errors


def logged_errors(log: str) -> int:
    """Lines of ``log`` (llmtap's JSON logs) at ERROR or CRITICAL, and tracebacks."""
    found = 0
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            found += line.startswith("Traceback")
            continue
        found += isinstance(entry, dict) and entry.get("level") in ("ERROR", "CRITICAL")
    return found


def render(args: argparse.Namespace, samples: list[Sample], errors: dict[str, int]) -> str:
    warm = [s for s in samples if s.at_s >= args.warmup_s] or samples
    final = samples[-1]
    roles = sorted(final.rss)
    lags = [s.sent - s.stored for s in samples[:-1]]
    missing = final.sent - final.stored
    outcome = "every call, once" if missing == 0 else f"MISSING {missing}"
    lines = [
        "# Soak: `llmtap up` under moderate load",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores, "
        f"1-min load average at the end {os.getloadavg()[0]:.1f}",
        f"- {args.minutes:g} minutes at {args.rate:g} calls/s (a third streamed, 2% upstream "
        "500s asked of the fake on purpose), fake upstream 20 ms to first byte",
        f"- calls sent {final.sent:,}; failed (other than the 500s asked for) {final.failed}"
        + (f" {errors}" if errors else ""),
        f"- rows in ClickHouse at the end: {final.stored:,} ({outcome})",
        f"- lag (sent minus stored, sampled every {SAMPLE_EVERY_S:g} s): median "
        f"{statistics.median(lags) if lags else 0:,.0f}, max {max(lags, default=0):,}",
        "",
        "| process (with its child processes) | RSS after warm-up (MB) | RSS at the end (MB) "
        "| max after warm-up (MB) |",
        "|---|---:|---:|---:|",
    ]
    for role in roles:
        after = [s.rss.get(role, 0.0) for s in warm]
        lines.append(
            f"| {role} | {after[0]:.0f} | {final.rss.get(role, 0.0):.0f} | {max(after):.0f} |"
        )
    lines += ["", f"Warm-up: the first {args.warmup_s:g} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
