"""A minimal fake OpenAI-compatible upstream for the benchmarks.

    python bench/fake_upstream.py --port 9001

Same answers as ``tests/fake_provider.py`` (chat completions as JSON, or as SSE with a
few chunks and the final usage chunk when ``stream_options.include_usage`` is set), but
nothing is remembered per request and nothing is delayed: the fake should cost as
little as possible, so what is measured is the proxy in front of it.
"""

from __future__ import annotations

import argparse
import time
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


def completion(model: str, created: int) -> bytes:
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
            "usage": USAGE,
        }
    )


def sse_chunks(model: str, created: int, include_usage: bool) -> list[bytes]:
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
                "usage": USAGE,
            }
        )
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    served = str(body.get("model", "")) + SNAPSHOT
    created = int(time.time())
    if not body.get("stream"):
        return web.Response(body=completion(served, created), content_type="application/json")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for data in sse_chunks(served, created, include_usage):
        await response.write(data)  # one write per SSE event, as a provider streams them
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def app() -> web.Application:
    application = web.Application()
    application.router.add_post("/v1/chat/completions", chat)
    application.router.add_get("/healthz", healthz)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
