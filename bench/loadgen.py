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

A mix (``--mix FILE``, for bench/run.py) replaces the one request: FILE is JSON,
``{"requests": [{"body": {...}, "key": "...", "stream": bool, "headers": {...}}]}``,
and request i is the mix's entry ``i % len``. Every HTTP answer is then a result,
whatever its status (a share of upstream errors is part of a realistic mix), with
its latency; ``errors`` counts only failures to get an answer (connection errors,
timeouts, a 200 stream cut short). ``--records FILE`` writes one JSON line per request
sent, warm-up included: its index and mix entry, status, ``x-request-id``, wall-clock
end, latency, the usage the answer reported and the error code of a non-200 answer.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
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
    statuses: Counter[str] = field(default_factory=Counter)  # mix: HTTP answers by status
    records: list[dict[str, Any]] = field(default_factory=list)  # mix: one per request


@dataclass(frozen=True)
class MixEntry:
    body: bytes
    headers: dict[str, str]
    stream: bool


@dataclass
class Answer:
    """What came back for one request of a mix."""

    status: int | None = None  # None: no HTTP answer
    error: str | None = None  # why there was no usable answer
    request_id: str = ""
    usage: list[int] | None = None  # prompt, completion, cached, reasoning
    code: str | None = None  # the error code of a non-200 answer


def load_mix(path: Path) -> list[MixEntry]:
    entries = []
    for item in json.loads(path.read_text())["requests"]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {item['key']}"}
        headers.update(item.get("headers") or {})
        body = json.dumps(item["body"]).encode()
        entries.append(MixEntry(body, headers, bool(item["body"].get("stream"))))
    if not entries:
        raise SystemExit(f"{path}: no requests in the mix")
    return entries


def _usage(data: dict[str, Any]) -> list[int] | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return [
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(prompt_details.get("cached_tokens") or 0),
        int(completion_details.get("reasoning_tokens") or 0),
    ]


def _stream_usage(data: bytes) -> list[int] | None:
    """The usage of the last SSE event that carries one."""
    for line in reversed(data.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                found = _usage(json.loads(line[6:]))
            except ValueError:
                continue
            if found is not None:
                return found
    return None


def _error_code(data: bytes) -> str | None:
    try:
        error = json.loads(data).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "") or None
    return None


async def call_mixed(session: aiohttp.ClientSession, url: str, entry: MixEntry) -> Answer:
    """One request of a mix, read to its last byte, with what the answer said."""
    answer = Answer()
    try:
        async with session.post(url, data=entry.body, headers=entry.headers) as response:
            answer.status = response.status
            answer.request_id = response.headers.get("x-request-id", "")
            if entry.stream and response.status == 200:
                chunks = [chunk async for chunk in response.content.iter_any()]
                data = b"".join(chunks)
                if not data.endswith(DONE):
                    answer.error = "stream_incomplete"
                answer.usage = _stream_usage(data)
            else:
                data = await response.read()
                if response.status == 200:
                    try:
                        answer.usage = _usage(json.loads(data))
                    except ValueError:
                        answer.error = "unreadable_body"
                else:
                    answer.code = _error_code(data)
    except (aiohttp.ClientError, TimeoutError) as exc:
        answer.error = type(exc).__name__
    return answer


def _record(
    results: Results, i: int, entry_index: int, warm: bool, answer: Answer, latency_ms: float
) -> None:
    results.records.append(
        {
            "i": i,
            "entry": entry_index,
            "warm": warm,
            "status": answer.status,
            "error": answer.error,
            "rid": answer.request_id,
            "end": time.time(),
            "lat": round(latency_ms, 3),
            "usage": answer.usage,
            "code": answer.code,
        }
    )


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


async def on_schedule(
    n_total: int, rate: float, one: Callable[[int, float], Coroutine[Any, Any, None]]
) -> int:
    """Start ``one(i, due)`` for i in range(n_total) at its due time, ``rate`` a second
    (open loop: a late answer delays no later request), and wait for them all; those
    unfinished DRAIN_TIMEOUT_S after the last start are cancelled. Returns how many."""
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
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
    for task in pending:
        task.cancel()
    return len(pending)


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

    if unfinished := await on_schedule(n_total, rate, one):
        results.errors["unfinished"] += unfinished
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


def _count(results: Results, answer: Answer, latency_ms: float) -> None:
    if answer.error is None and answer.status is not None:
        results.latencies_ms.append(latency_ms)
        results.statuses[str(answer.status)] += 1
    else:
        results.errors[answer.error or "no_answer"] += 1


async def open_loop_mix(
    session: aiohttp.ClientSession,
    url: str,
    mix: list[MixEntry],
    rate: float,
    warmup: float,
    duration: float,
) -> Results:
    """As :func:`open_loop`, request i being the mix's entry ``i % len(mix)``."""
    results = Results()
    n_warmup = round(warmup * rate)
    n_total = n_warmup + round(duration * rate)

    async def one(i: int, due: float) -> None:
        sent = time.perf_counter()
        entry = i % len(mix)
        answer = await call_mixed(session, url, mix[entry])
        latency_ms = (time.perf_counter() - due) * 1000
        results.completed_total += 1
        _record(results, i, entry, i < n_warmup, answer, latency_ms)
        if i < n_warmup:
            return
        results.send_lag_ms.append((sent - due) * 1000)
        _count(results, answer, latency_ms)

    if unfinished := await on_schedule(n_total, rate, one):
        results.errors["unfinished"] += unfinished
    return results


async def closed_loop_mix(
    session: aiohttp.ClientSession,
    url: str,
    mix: list[MixEntry],
    workers: int,
    warmup: float,
    duration: float,
) -> Results:
    """As :func:`closed_loop`, the workers taking the mix's entries in turn."""
    results = Results()
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration
    counter = itertools.count()

    async def worker() -> None:
        while (begin := time.perf_counter()) < end:
            i = next(counter)
            entry = i % len(mix)
            answer = await call_mixed(session, url, mix[entry])
            done = time.perf_counter()
            results.completed_total += 1
            counted = measure_from <= done < end
            _record(results, i, entry, not counted, answer, (done - begin) * 1000)
            if counted:
                _count(results, answer, (done - begin) * 1000)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    body = request_body(args.stream)
    pool = args.closed or args.pool
    connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.mix is not None:
            mix = load_mix(args.mix)
            if args.closed:
                results = await closed_loop_mix(
                    session, args.url, mix, args.closed, args.warmup, args.duration
                )
            else:
                results = await open_loop_mix(
                    session, args.url, mix, args.rate, args.warmup, args.duration
                )
        elif args.closed:
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
    if args.records is not None:
        with args.records.open("w") as out:
            for record in results.records:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
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
        "statuses": dict(results.statuses),
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
    parser.add_argument("--mix", type=Path, help="JSON file of requests to cycle through")
    parser.add_argument("--records", type=Path, help="with --mix: JSON lines, one per request")
    args = parser.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
