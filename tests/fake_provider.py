"""A fake OpenAI-compatible provider: the only fake in the test suite.

It answers chat completions like OpenAI does (JSON, or SSE with an optional final
usage chunk), remembers every request it received and every chunk it sent, so tests
can compare both ends of the proxy.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SNAPSHOT = "-2025-01-01"  # served model = requested model + a dated snapshot suffix


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeProvider:
    prompt_tokens: int = 12
    cached_tokens: int = 4
    completion_tokens: int = 5
    reasoning_tokens: int = 0
    words: tuple[str, ...] = ("Hello", " from", " the", " fake", " provider")
    chunk_delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    sent_chunks: list[list[dict[str, Any]]] = field(default_factory=list)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        created = int(time.time())
        served = body["model"] + SNAPSHOT
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": served,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(self.words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": self.usage(),
                }
            )
        chunks: list[dict[str, Any]] = []

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": served,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        chunks.append(chunk({"role": "assistant", "content": ""}))
        chunks.extend(chunk({"content": word}) for word in self.words)
        chunks.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": served,
                    "choices": [],
                    "usage": self.usage(),
                }
            )
        self.sent_chunks.append(chunks)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for c in chunks:
            await response.write(b"data: " + orjson.dumps(c) + b"\n\n")
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
