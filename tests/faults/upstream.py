"""The fake provider of tests/fake_provider.py, plus the ways a real provider fails.

A model name picks the failure, so one upstream serves a whole scenario; any other
model gets the fake's normal answer:

| model            | what the provider does                                                 |
|------------------|------------------------------------------------------------------------|
| ``fault-500``    | 500 with OpenAI's error body (type ``server_error``)                    |
| ``fault-429``    | 429 with ``retry-after: 7`` and OpenAI's rate-limit error body           |
| ``fault-slow``   | answers only after ``slow_s`` (past the proxy's read timeout)            |
| ``fault-stall``  | a stream: two chunks, then silence for ``slow_s``                        |
| ``fault-cut``    | a stream: two chunks, half of a third, then the connection is dropped   |
| ``fault-badjson``| a stream whose second chunk is not JSON; the rest as usual (usage too)  |
| ``fault-529``    | (Anthropic) 529 with Anthropic's ``overloaded_error`` body              |
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fake_provider import SNAPSHOT, FakeProvider

RETRY_AFTER = "7"


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model + SNAPSHOT,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _sse(data: dict[str, Any] | bytes) -> bytes:
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    return b"data: " + raw + b"\n\n"


@dataclass
class FaultyProvider:
    fake: FakeProvider = field(default_factory=FakeProvider)
    slow_s: float = 4.0
    faults_served: list[str] = field(default_factory=list)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", ""))
        if not model.startswith("fault-"):
            return await self.fake.chat(request)  # aiohttp kept the body: read again
        self.faults_served.append(model)
        if model == "fault-500":
            return web.json_response(
                {
                    "error": {
                        "message": "The server had an error while processing your request.",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=500,
            )
        if model == "fault-429":
            return web.json_response(
                {
                    "error": {
                        "message": "Rate limit reached for requests",
                        "type": "requests",
                        "param": None,
                        "code": "rate_limit_exceeded",
                    }
                },
                status=429,
                headers={"retry-after": RETRY_AFTER},
            )
        if model == "fault-slow":
            await asyncio.sleep(self.slow_s)
            return await self.fake.chat(request)  # aiohttp kept the body: read again
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse(_chunk(model, {"role": "assistant", "content": ""})))
        await response.write(_sse(_chunk(model, {"content": "Hello"})))
        if model == "fault-stall":
            await asyncio.sleep(self.slow_s)
        elif model == "fault-cut":
            await response.write(b'data: {"id": "chatcmpl-fault", "object": "chat.comp')
            assert request.transport is not None
            request.transport.abort()  # no end of chunked encoding: a broken stream
        elif model == "fault-badjson":
            await response.write(b"data: {this is not json\n\n")
            await response.write(_sse(_chunk(model, {}, "stop")))
            await response.write(
                _sse(
                    {
                        "id": "chatcmpl-fault",
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": model + SNAPSHOT,
                        "choices": [],
                        "usage": self.fake.usage(),
                    }
                )
            )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("model") == "fault-529":
            self.faults_served.append("fault-529")
            return web.json_response(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                status=529,
            )
        return await self.fake.messages(request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/embeddings", self.fake.embeddings)
        app.router.add_post("/v1/responses", self.fake.responses)
        app.router.add_get("/v1/models", self.fake.models)
        return app
