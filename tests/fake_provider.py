"""A fake OpenAI-compatible provider: the only fake in the test suite.

It answers chat completions like OpenAI does (JSON, or SSE with an optional final
usage chunk), remembers every request it received and every chunk it sent, so tests
can compare both ends of the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SNAPSHOT = "-2025-01-01"  # served model = requested model + a dated snapshot suffix
ANTHROPIC_SNAPSHOT = "-20241022"
PROVIDER_REQUEST_ID = "req_fake0123456789"  # OpenAI's own request id, on chat answers
# Azure OpenAI's first chunk of a stream, sent as it takes the call: its prompt filter's
# results, no choices (no token yet).
AZURE_FIRST_CHUNK = {
    "id": "",
    "object": "",
    "created": 0,
    "model": "",
    "prompt_filter_results": [
        {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False}}}
    ],
    "choices": [],
}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    query: str = ""  # as sent, still encoded


@dataclass
class FakeProvider:
    prompt_tokens: int = 12
    cached_tokens: int = 4
    completion_tokens: int = 5
    reasoning_tokens: int = 0
    cache_write_tokens: int = 3
    # Web searches run for each Responses or Messages call, reported as those APIs do.
    web_searches: int = 0
    words: tuple[str, ...] = ("Hello", " from", " the", " fake", " provider")
    chunk_delay_s: float = 0.0
    # Tokens of each call of Anthropic's advisor tool, for a Messages call naming one
    # (its advisor runs advisor_calls times), reported as Anthropic does: in the usage's
    # iterations, of type advisor_message, left out of its top-level counts.
    advisor_calls: int = 1
    advisor_input_tokens: int = 900
    advisor_cached_tokens: int = 300
    advisor_output_tokens: int = 1500
    # Set: a chat stream's first event is written in two halves, the second only once
    # this event is set (by a test that has seen the first half arrive).
    second_half: asyncio.Event | None = None
    # Set: a chat answer that is not a stream waits for this event before it is sent.
    answer_held: asyncio.Event | None = None
    # Anthropic streams end in an "overloaded_error" event after the text, as Anthropic's
    # do when it is overloaded mid-answer (the 200 already sent).
    overloaded_mid_stream: bool = False
    # The speed a Messages call is served at, reported in its usage ("fast" or
    # "standard"); None: the speed its body asks for, if it names one (as Anthropic's
    # fast mode does when it has the capacity), else none reported.
    served_speed: str | None = None
    # Where a Messages call's inference runs, reported in its usage's inference_geo
    # ("us", "global", ...); None: the geography its body asks for, if it names one (as
    # Anthropic's data residency does), else none reported (a workspace default "us"
    # is set here).
    served_geo: str | None = None
    # The service tier an OpenAI call (chat, Responses) is served at, reported as the
    # answer's service_tier (every chat chunk's too); None: the tier its body asks for
    # ("flex", "priority", "default"), else "default", as OpenAI serves a project whose
    # own tier is standard. A Responses stream's response.created echoes what the body
    # asked ("auto" when nothing), as the final response.completed tells the served.
    served_tier: str | None = None
    received: list[Received] = field(default_factory=list)
    sent_chunks: list[list[dict[str, Any]]] = field(default_factory=list)
    sent_events: list[list[tuple[str, dict[str, Any]]]] = field(default_factory=list)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def tier(self, body: dict[str, Any]) -> str:
        """The service tier a call's answer says served it."""
        if self.served_tier is not None:
            return self.served_tier
        asked = body.get("service_tier")
        return asked if asked in ("flex", "priority", "default") else "default"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(
            Received(request.path, dict(request.headers), body, request.rel_url.raw_query_string)
        )
        created = int(time.time())
        served = body["model"] + SNAPSHOT
        tier = self.tier(body)
        if not body.get("stream"):
            if self.answer_held is not None:
                await self.answer_held.wait()
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
                    "service_tier": tier,
                },
                headers={"x-request-id": PROVIDER_REQUEST_ID},
            )
        chunks: list[dict[str, Any]] = []
        # As OpenAI does: asked for usage, every chunk but the last carries "usage": null.
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        usage_null = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": served,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "service_tier": tier,
                **usage_null,
            }

        chunks.append(chunk({"role": "assistant", "content": ""}))
        chunks.extend(chunk({"content": word}) for word in self.words)
        chunks.append(chunk({}, "stop"))
        if include_usage:
            chunks.append(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": served,
                    "choices": [],
                    "usage": self.usage(),
                    "service_tier": tier,
                }
            )
        self.sent_chunks.append(chunks)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-request-id": PROVIDER_REQUEST_ID}
        )
        await response.prepare(request)
        for i, c in enumerate(chunks):
            event = b"data: " + orjson.dumps(c) + b"\n\n"
            if i == 0 and self.second_half is not None:
                await response.write(event[: len(event) // 2])
                await self.second_half.wait()
                event = event[len(event) // 2 :]
            await response.write(event)
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
                "model": body["model"],
                "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens},
            }
        )

    def responses_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        text = "".join(self.words)
        response = {
            "id": "resp_fake",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body["model"] + SNAPSHOT,
            "output": [
                *(
                    {
                        "type": "web_search_call",
                        "id": f"ws_{i}",
                        "status": "completed",
                        "action": {"type": "search", "query": "llmtap"},
                    }
                    for i in range(self.web_searches)
                ),
                {
                    "type": "message",
                    "id": "msg_fake",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                },
            ],
            "usage": self.responses_usage(),
            "service_tier": self.tier(body),
        }
        if not body.get("stream"):
            return web.json_response(response)
        asked = body.get("service_tier") or "auto"
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "response.created",
                {
                    "type": "response.created",
                    "response": {
                        **response,
                        "status": "in_progress",
                        "output": [],
                        "usage": None,
                        "service_tier": asked,
                    },
                },
            ),
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "item_id": "msg_fake",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": text,
                },
            ),
            ("response.completed", {"type": "response.completed", "response": response}),
        ]
        return await self._sse(request, events)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API."""
        body = await request.json()
        self.received.append(Received(request.path, dict(request.headers), body))
        served = body["model"] + ANTHROPIC_SNAPSHOT
        usage: dict[str, Any] = {
            "input_tokens": self.prompt_tokens,  # Anthropic: excludes cache reads/writes
            "output_tokens": self.completion_tokens,
            "cache_creation_input_tokens": self.cache_write_tokens,
            "cache_read_input_tokens": self.cached_tokens,
        }
        searched = {"web_search_requests": self.web_searches} if self.web_searches else None
        if searched:
            usage["server_tool_use"] = searched
        speed = self.served_speed or body.get("speed")
        if speed:
            usage["speed"] = speed  # in message_start's usage, when streamed
        geo = self.served_geo or body.get("inference_geo")
        if geo:
            usage["inference_geo"] = geo  # as speed: message_start's, not message_delta's
        advice = self._advice(body)
        if advice:
            usage["iterations"] = advice[1]
        text = "".join(self.words)
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": served,
                    "content": [*(advice[0] if advice else []), {"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        start = {**usage, "output_tokens": 1}
        start.pop("server_tool_use", None)  # Anthropic counts searches in the last delta
        start.pop("iterations", None)  # and the advisor's calls in a message_delta
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "model": served,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": start,
                    },
                },
            ),
        ]
        for index, block in enumerate(advice[0] if advice else []):
            # The advisor's call, then its result whole in one content_block_start.
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                )
            )
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        text_index = len(advice[0]) if advice else 0
        events.append(
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": text_index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        )
        events.extend(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": text_index,
                    "delta": {"type": "text_delta", "text": word},
                },
            )
            for word in self.words
        )
        if self.overloaded_mid_stream:
            overloaded = {"type": "overloaded_error", "message": "Overloaded"}
            events.append(("error", {"type": "error", "error": overloaded}))
            return await self._sse(request, events)
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": text_index}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {
                        "output_tokens": self.completion_tokens,
                        **({"server_tool_use": searched} if searched else {}),
                        **({"iterations": advice[1]} if advice else {}),
                    },
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return await self._sse(request, events)

    def _advice(
        self, body: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """For a Messages call naming the advisor tool: the content blocks of its
        advisor's calls (server_tool_use, advisor_tool_result) and the usage's
        iterations (the executor's, then each advisor call's at the tool's model)."""
        tools = body.get("tools") or []
        named = [t for t in tools if str(t.get("type", "")).startswith("advisor_")]
        if not named:
            return None
        blocks: list[dict[str, Any]] = []
        iterations: list[dict[str, Any]] = [
            {
                "type": "message",
                "input_tokens": self.prompt_tokens,
                "cache_read_input_tokens": self.cached_tokens,
                "cache_creation_input_tokens": self.cache_write_tokens,
                "output_tokens": 1,
            }
        ]
        for i in range(self.advisor_calls):
            blocks.append(
                {"type": "server_tool_use", "id": f"srvtoolu_{i}", "name": "advisor", "input": {}}
            )
            blocks.append(
                {
                    "type": "advisor_tool_result",
                    "tool_use_id": f"srvtoolu_{i}",
                    "content": {"type": "advisor_result", "text": "Plan it first."},
                }
            )
            iterations.append(
                {
                    "type": "advisor_message",
                    "model": named[0]["model"],
                    "input_tokens": self.advisor_input_tokens,
                    "cache_read_input_tokens": self.advisor_cached_tokens,
                    "cache_creation_input_tokens": 0,
                    "output_tokens": self.advisor_output_tokens,
                }
            )
        iterations.append(
            {
                "type": "message",
                "input_tokens": self.prompt_tokens + 100,
                "cache_read_input_tokens": self.cached_tokens,
                "cache_creation_input_tokens": 0,
                "output_tokens": max(self.completion_tokens - 1, 0),
            }
        )
        return blocks, iterations

    async def _sse(
        self, request: web.Request, events: list[tuple[str, dict[str, Any]]]
    ) -> web.StreamResponse:
        self.sent_events.append(events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for name, data in events:
            await response.write(
                f"event: {name}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"
            )
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), {}))
        if "anthropic-version" in request.headers:  # Anthropic's shape
            claude = {
                "type": "model",
                "id": "claude-3-5-haiku" + ANTHROPIC_SNAPSHOT,
                "display_name": "Claude Haiku 3.5",
                "created_at": "2024-10-22T00:00:00Z",
            }
            return web.json_response(
                {"data": [claude], "has_more": False, "first_id": claude["id"],
                 "last_id": claude["id"]}
            )  # fmt: skip
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    async def counted(self, request: web.Request) -> web.Response:
        """Anthropic's count_tokens, the Responses API's input_tokens and a moderation:
        free answers about a call, none made."""
        body = await request.json()
        self.received.append(
            Received(request.path, dict(request.headers), body, request.rel_url.raw_query_string)
        )
        if request.path.endswith("/moderations"):
            flagged = {"flagged": False, "categories": {}, "category_scores": {}}
            return web.json_response(
                {"id": "modr-fake", "model": body.get("model", "omni-moderation-latest"),
                 "results": [{**flagged, "category_applied_input_types": {}}]}
            )  # fmt: skip
        counted = {"input_tokens": self.prompt_tokens}
        if request.path.endswith("/input_tokens"):
            counted["object"] = "response.input_tokens"  # type: ignore[assignment]
        return web.json_response(counted)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages/count_tokens", self.counted)
        app.router.add_post("/v1/responses/input_tokens", self.counted)
        app.router.add_post("/v1/moderations", self.counted)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.models)
        app.router.add_get("/{anything:.*}", self.not_found)  # recorded: nothing else is asked
        return app

    async def not_found(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), {}))
        return web.json_response({"error": {"message": "not found"}}, status=404)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket is held until all are bound (one
    closed before the next is asked for can be handed out again, and `llmtap up` then
    refused two of its services the same port)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
