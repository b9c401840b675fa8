"""A minimal fake OpenAI-compatible upstream for the benchmarks.

    python bench/fake_upstream.py --port 9001
    python bench/fake_upstream.py --port 9001 --latency-ms 50 --varied-usage --stats

Same answers as ``tests/fake_provider.py`` (chat completions as JSON, or as SSE with a
few chunks and the final usage chunk when ``stream_options.include_usage`` is set). By
default nothing is remembered per request and nothing is delayed: the fake should cost
as little as possible, so what is measured is the proxy in front of it.

Options for the system benchmark (``bench/run.py``), all off by default:

- ``--latency-ms N``: wait N ms before answering (the provider's time to first byte);
- ``--varied-usage``: usage depends on the request (see :func:`usage_for`) instead of
  the fixed :data:`USAGE`, so calls differ in cost;
- ``--stats``: count what was served per caller (the bearer token the fake received),
  by status, with the usage it reported per model; ``GET /stats`` answers the counts.

A request whose body contains ``fake-status:NNN`` (e.g. in a message) is answered,
after the same delay, with that HTTP status and an OpenAI-style error (429s with
``retry-after: 1``): this is how a load generator asks for a share of upstream errors
through any proxy, whatever it forwards (always on; a plain request never contains it).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections import Counter, defaultdict
from typing import Any

import orjson
from aiohttp import web

SNAPSHOT = "-2025-01-01"
WORDS = ("Hello", " from", " the", " fake", " provider")
USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 4},
    "completion_tokens_details": {"reasoning_tokens": 0},
}


FAKE_STATUS = re.compile(rb"fake-status:(\d{3})")
MAX_VARIED_COMPLETION = 256

LATENCY_S = web.AppKey("latency_s", float)
VARIED = web.AppKey("varied_usage", bool)


def usage_for(body: dict[str, Any]) -> dict[str, Any]:
    """Usage for ``--varied-usage``: 8 prompt tokens plus one per 4 characters of the
    messages' text, a quarter of them read from a cache, and ``max_tokens`` completion
    tokens (5 without it, at most 256). It depends on what the client asked for, not on
    how a proxy re-serialised it, so a load generator can price a call before sending."""
    text = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        text += len(content) if isinstance(content, str) else 0
    prompt = 8 + text // 4
    max_tokens = body.get("max_tokens")
    completion_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 5
    completion_tokens = min(completion_tokens, MAX_VARIED_COMPLETION)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": prompt // 4},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


class Stats:
    """What the fake served, per caller (bearer token) and per status."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: defaultdict[str, Counter[str]] = defaultdict(Counter)
        # caller -> model -> token counts, as the fake reported them
        self.usage: defaultdict[str, defaultdict[str, Counter[str]]] = defaultdict(
            lambda: defaultdict(Counter)
        )

    def served(self, request: web.Request, status: int, model: str, usage: dict[str, Any]) -> None:
        caller = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.requests[caller] += 1
        self.statuses[caller][str(status)] += 1
        if usage:
            tokens = self.usage[caller][model]
            tokens["calls"] += 1
            tokens["prompt_tokens"] += usage["prompt_tokens"]
            tokens["completion_tokens"] += usage["completion_tokens"]
            tokens["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
            tokens["reasoning_tokens"] += usage["completion_tokens_details"]["reasoning_tokens"]

    def as_json(self) -> dict[str, Any]:
        return {
            caller: {
                "requests": self.requests[caller],
                "statuses": dict(self.statuses[caller]),
                "usage": {m: dict(c) for m, c in self.usage[caller].items()},
            }
            for caller in self.requests
        }


STATS = web.AppKey("stats", Stats)


def error_body(status: int) -> bytes:
    kind = "rate_limit_exceeded" if status == 429 else "server_error"
    return orjson.dumps(
        {
            "error": {
                "message": f"fake upstream error {status} (asked for by the request)",
                "type": kind,
                "param": None,
                "code": kind,
            }
        }
    )


def completion(model: str, created: int, usage: dict[str, Any] = USAGE) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS)},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


def sse_chunks(
    model: str, created: int, include_usage: bool, usage: dict[str, Any] = USAGE
) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": word}) for word in WORDS]
    chunks.append(chunk({}, "stop"))
    if include_usage:
        chunks.append(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = orjson.loads(raw)
    stats = request.app.get(STATS)
    latency = request.app[LATENCY_S]
    if latency > 0:
        await asyncio.sleep(latency)
    asked = FAKE_STATUS.search(raw)
    if asked is not None:
        status = int(asked.group(1))
        if stats is not None:
            stats.served(request, status, "", {})
        headers = {"retry-after": "1"} if status == 429 else None
        return web.Response(
            status=status, body=error_body(status), content_type="application/json", headers=headers
        )
    model = str(body.get("model", ""))
    served = model + SNAPSHOT
    created = int(time.time())
    usage = usage_for(body) if request.app[VARIED] else USAGE
    stream = bool(body.get("stream"))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if stats is not None:
        stats.served(request, 200, model, usage if include_usage or not stream else {})
    if not stream:
        return web.Response(
            body=completion(served, created, usage), content_type="application/json"
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for data in sse_chunks(served, created, include_usage, usage):
        await response.write(data)  # one write per SSE event, as a provider streams them
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    counted = request.app.get(STATS)
    if counted is None:
        return web.json_response({"error": "started without --stats"}, status=404)
    return web.json_response(counted.as_json())


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})


def app(
    latency_ms: float = 0.0, varied_usage: bool = False, count: bool = False
) -> web.Application:
    application = web.Application()
    application[LATENCY_S] = latency_ms / 1000
    application[VARIED] = varied_usage
    if count:
        application[STATS] = Stats()
    application.router.add_post("/v1/chat/completions", chat)
    application.router.add_get("/v1/models", models)
    application.router.add_get("/healthz", healthz)
    application.router.add_get("/stats", stats)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay before each successful answer"
    )
    parser.add_argument(
        "--varied-usage", action="store_true", help="usage from the request (see usage_for)"
    )
    parser.add_argument("--stats", action="store_true", help="count calls per caller: GET /stats")
    args = parser.parse_args()
    web.run_app(
        app(args.latency_ms, args.varied_usage, args.stats),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
