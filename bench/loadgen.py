"""Load generator for the ingress benchmark, run as its own process.

    python bench/loadgen.py --url http://127.0.0.1:8080/v1/chat/completions \\
        --rate 500 --warmup 1 --duration 6 [--stream] [--key KEY]
    python bench/loadgen.py --url ... --closed 64 --warmup 1 --duration 3

Open loop (default): request i is due at ``start + i / rate``, whatever happened to
the ones before it; its latency runs from that scheduled time (not from when it was
actually sent) to the last byte of the answer, so a stall in the target, or in the
load generator, is charged to every request it delayed (no coordinated omission).

Closed loop (``--closed N``): N workers each send the next request as soon as the
last one is answered; reports completed requests per second.

Only requests due (open) or completed (closed) after the warm-up are counted. Prints
one JSON object on stdout: latencies in ms, counts, errors by kind, and how late the
sender itself was (``send_lag_ms``: a loaded load generator shows here first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DONE = b"data: [DONE]\n\n"
DRAIN_TIMEOUT_S = 30.0


@dataclass
class Results:
    latencies_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    completed_total: int = 0  # warm-up included: for CPU time per request


def request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "stream": stream,
    }
    if stream:
        # Asked for by the client, so every target sends the same bytes back (the
        # ingress adds this option itself when a client does not, and strips the chunk).
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def call(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stream: bool
) -> str | None:
    """One request, read to its last byte; None if it went well, else what went wrong."""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if stream:
                tail = b""
                async for chunk in response.content.iter_any():
                    tail = (tail + chunk)[-len(DONE) :]
            else:
                data = await response.read()
            if response.status != 200:
                return f"http_{response.status}"
            if stream and tail != DONE:
                return "stream_incomplete"
            if not stream and not data:
                return "empty_body"
            return None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def open_loop(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    rate: float,
    warmup: float,
    duration: float,
) -> Results:
    results = Results()
    n_warmup = round(warmup * rate)
    n_total = n_warmup + round(duration * rate)

    async def one(i: int, due: float) -> None:
        sent = time.perf_counter()
        error = await call(session, url, body, headers, stream)
        done = time.perf_counter()
        results.completed_total += 1
        if i < n_warmup:
            return
        results.send_lag_ms.append((sent - due) * 1000)
        if error is None:
            results.latencies_ms.append((done - due) * 1000)
        else:
            results.errors[error] += 1

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.01
    for i in range(n_total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        results.errors["unfinished"] += len(pending)
    return results


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    workers: int,
    warmup: float,
    duration: float,
) -> Results:
    results = Results()
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration

    async def worker() -> None:
        while (begin := time.perf_counter()) < end:
            error = await call(session, url, body, headers, stream)
            done = time.perf_counter()
            results.completed_total += 1
            if measure_from <= done < end:
                if error is None:
                    results.latencies_ms.append((done - begin) * 1000)
                else:
                    results.errors[error] += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    body = request_body(args.stream)
    pool = args.closed or args.pool
    connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.closed:
            results = await closed_loop(
                session,
                args.url,
                body,
                headers,
                args.stream,
                workers=args.closed,
                warmup=args.warmup,
                duration=args.duration,
            )
        else:
            results = await open_loop(
                session,
                args.url,
                body,
                headers,
                args.stream,
                rate=args.rate,
                warmup=args.warmup,
                duration=args.duration,
            )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ok = len(results.latencies_ms)
    return {
        "url": args.url,
        "mode": f"closed({args.closed})" if args.closed else f"open({args.rate}/s)",
        "stream": args.stream,
        "duration_s": args.duration,
        "ok": ok,
        "errors": sum(results.errors.values()),
        "error_kinds": dict(results.errors),
        "throughput_rps": ok / args.duration,
        "completed_total": results.completed_total,
        "latencies_ms": results.latencies_ms,
        "send_lag_ms": results.send_lag_ms,
        "loadgen_cpu_s": usage.ru_utime + usage.ru_stime,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the chat completions URL of the target")
    parser.add_argument("--rate", type=float, default=500.0, help="open loop: requests/s")
    parser.add_argument("--closed", type=int, default=0, metavar="N", help="closed loop: workers")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds, not counted")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured")
    parser.add_argument("--stream", action="store_true", help="SSE streaming requests")
    parser.add_argument("--key", default="sk-bench", help="sent as the bearer token")
    parser.add_argument("--pool", type=int, default=256, help="open loop: max connections")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    args = parser.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
