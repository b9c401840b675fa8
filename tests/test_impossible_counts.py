"""A usage count no call can have (past what ``calls`` holds, or below zero): some
OpenAI-compatible servers send -1 as an unsigned 64-bit number, 2^64-1. Read as a
count, it made a call of $1.8*10^14 (gpt-4o) that budgets counted and the store
dead-lettered: the ingress records such a usage as missing (unknown, a hard cap holds
its worst case)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from ingress.forward.capture import (
    AnthropicJsonCapture,
    AnthropicStreamCapture,
    OpenAIJsonCapture,
    OpenAIStreamCapture,
)
from ingress.forward.usage import ImpossibleCount, anthropic_usage, openai_usage
from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.events import UINT32_MAX, Usage
from tests.conftest import Broker, ingress_before
from tests.test_ingress_ops import response_event

SENTINEL = 2**64 - 1  # -1, sent as unsigned


def _usage(completion: int) -> dict[str, Any]:
    return {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3}


async def _answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.json_response(
            {
                "id": "chatcmpl-huge",
                "object": "chat.completion",
                "model": "gpt-4o",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
                "usage": _usage(SENTINEL),
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk = {"id": "chatcmpl-huge", "object": "chat.completion.chunk", "model": "gpt-4o"}
    delta = {"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}
    usage_only = {**chunk, "choices": [], "usage": _usage(SENTINEL)}
    for data in ({**chunk, "choices": [delta]}, usage_only):
        await response.write(b"data: " + orjson.dumps(data) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.mark.parametrize("stream", [False, True])
async def test_a_count_past_what_calls_holds_is_usage_missing(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stream: bool,
) -> None:
    """completion_tokens = 2^64-1, in a JSON answer or a stream's usage chunk: the call's
    usage is missing (never that count, never priced), said once in a warning naming the
    provider and the field; the client gets the answer as the provider sent it."""
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    caplog.set_level(logging.WARNING, logger="ingress")
    async with (
        ingress_before(_answer, ingress_settings, monkeypatch) as server,
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            json={"model": "gpt-4o", "messages": [], "stream": stream},
            headers={"Authorization": f"Bearer {secret}"},
        ) as response,
    ):
        assert response.status == 200
        answer = await response.read()
        request_id = response.headers["x-request-id"]
    assert (b"18446744073709551615" in answer) is not stream  # the stream's, not asked for
    event = await response_event(broker.bootstrap, request_id)
    assert event.status == "ok"
    assert event.usage.usage_missing
    assert event.usage.output_tokens <= UINT32_MAX and event.usage.input_tokens == 0
    warned = [r.getMessage() for r in caplog.records if "completion_tokens" in r.getMessage()]
    assert len(warned) == 1
    assert "openai" in warned[0] and "18446744073709551615" in warned[0]


@pytest.mark.parametrize("count", [SENTINEL, UINT32_MAX + 1, -1])
def test_a_count_no_call_can_have_is_no_count(count: int) -> None:
    """Past UInt32, or negative: refused, by the field's name, in every usage shape read
    (an Anthropic iteration's too); a count of UInt32's most is a count."""
    with pytest.raises(ImpossibleCount, match="completion_tokens"):
        openai_usage(_usage(count))
    with pytest.raises(ImpossibleCount, match="reasoning_tokens"):
        openai_usage({**_usage(5), "completion_tokens_details": {"reasoning_tokens": count}})
    with pytest.raises(ImpossibleCount, match="cache_read_input_tokens"):
        anthropic_usage({"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": count})
    advisor = {"type": "advisor_message", "model": "m", "input_tokens": count}
    with pytest.raises(ImpossibleCount, match="input_tokens"):
        anthropic_usage({"input_tokens": 1, "output_tokens": 1, "iterations": [advisor]})
    assert openai_usage(_usage(UINT32_MAX)) == Usage(input_tokens=3, output_tokens=UINT32_MAX)


def test_counts_adding_up_past_what_calls_holds_are_no_count() -> None:
    """Each count within, their normalised sum past it (Anthropic's input is its
    uncached, read and written tokens): refused as well, by the sum's name."""
    half = UINT32_MAX // 2 + 1
    with pytest.raises(ImpossibleCount, match="input_tokens"):
        anthropic_usage({"input_tokens": half, "cache_read_input_tokens": half})


def test_every_capture_records_an_impossible_count_as_missing() -> None:
    """Each capture: the usage missing, the field kept for the proxy's one warning."""
    huge = _usage(SENTINEL)
    json_capture = OpenAIJsonCapture(orjson.dumps({"model": "m", "usage": huge}))
    anthropic = {"model": "m", "usage": {"input_tokens": 1, "output_tokens": SENTINEL}}
    anthropic_capture = AnthropicJsonCapture(orjson.dumps(anthropic))
    for capture in (json_capture, anthropic_capture):
        assert capture.usage == Usage.missing()
    assert (json_capture.impossible, anthropic_capture.impossible) == (
        f"completion_tokens={SENTINEL}",
        f"output_tokens={SENTINEL}",
    )
    stream = OpenAIStreamCapture(strip_usage_chunk=True)
    usage_chunk = {"model": "m", "choices": [], "usage": huge}
    assert stream.feed(b"data: " + orjson.dumps(usage_chunk) + b"\n\n") == b""  # still cut
    assert stream.final_usage == Usage.missing() and stream.output_final
    assert stream.impossible == f"completion_tokens={SENTINEL}"
    messages = AnthropicStreamCapture()
    start = {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": -1}}}
    messages.feed(b"data: " + orjson.dumps(start) + b"\n\n")
    assert messages.final_usage == Usage.missing() and messages.impossible == "input_tokens=-1"
    delta = {"type": "message_delta", "usage": {"input_tokens": 4, "output_tokens": 2}}
    messages.feed(b"data: " + orjson.dumps(delta) + b"\n\n")  # counted again: real now
    assert messages.final_usage.input_tokens == 4 and not messages.impossible
