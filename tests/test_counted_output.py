"""Output tokens of a stream the provider did not count (it broke off, its client went
away, or the provider sends no usage in streams): counted by llmtap from the text
streamed, flagged as counted, never zero. Pure capture tests and the real tokenizer
(a call through the ingress whose client hangs up: tests/test_ingress_ops.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ingress.forward import capture as capturing
from ingress.forward import tokens
from ingress.forward.capture import AnthropicStreamCapture, OpenAIStreamCapture, StreamCapture


def sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (c.encode() if isinstance(c, str) else orjson.dumps(c)) + b"\n\n"
        for c in chunks
    )


def chat(delta: dict[str, Any]) -> dict[str, Any]:
    return {"model": "gpt-4o", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def fed(capture: StreamCapture, stream: bytes) -> StreamCapture:
    assert capture.feed(stream) + capture.finish() == stream  # forwarded unchanged
    return capture


def test_the_tokenizer_is_openais_o200k() -> None:
    # o200k_base: "Hello", " world" and "!" are one token each; "tiktoken" is three.
    assert tokens.count("Hello world!") == 3
    assert tokens.count("tiktoken") == 3
    assert tokens.count("") == 0


def test_a_chat_stream_without_usage_has_its_text_counted() -> None:
    capture = fed(
        OpenAIStreamCapture(strip_usage_chunk=False),
        sse(
            chat({"role": "assistant", "content": ""}),
            chat({"content": "Hello"}),
            chat({"content": " world"}),
            chat({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]}),
            chat({"reasoning_content": "hm"}),
            "[DONE]",
        ),
    )
    assert capture.output_uncounted
    assert capture.streamed_text() == 'Hello worldf{"a"hm'
    counted = capture.counted_usage(tokens.count(capture.streamed_text()))
    assert counted.output_tokens == tokens.count('Hello worldf{"a"hm') > 0
    assert counted.output_tokens_counted
    assert counted.usage_missing  # the input is still unknown: no cost is made up


def test_a_chat_stream_with_usage_is_not_counted() -> None:
    usage_chunk = {"model": "gpt-4o", "choices": [], "usage": {"completion_tokens": 7}}
    capture = fed(
        OpenAIStreamCapture(strip_usage_chunk=False),
        sse(chat({"content": "Hello"}), usage_chunk, "[DONE]"),
    )
    assert not capture.output_uncounted
    assert capture.final_usage.output_tokens == 7
    assert not capture.final_usage.output_tokens_counted


def test_responses_and_completions_text_is_found() -> None:
    responses = fed(
        OpenAIStreamCapture(strip_usage_chunk=False),
        sse(
            {"type": "response.created", "response": {"model": "gpt-4o"}},
            {"type": "response.output_text.delta", "delta": "Hi"},
            {"type": "response.function_call_arguments.delta", "delta": "{}"},
        ),
    )
    assert responses.streamed_text() == "Hi{}"
    completions = fed(
        OpenAIStreamCapture(strip_usage_chunk=False),
        sse({"model": "gpt-3.5-turbo-instruct", "choices": [{"index": 0, "text": "Once"}]}),
    )
    assert completions.streamed_text() == "Once"


def anthropic_start() -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "model": "claude-sonnet-4-5",
            "usage": {"input_tokens": 20, "output_tokens": 1},
        },
    }


def text_delta(text: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


def test_an_anthropic_stream_cut_before_message_delta_counts_its_output() -> None:
    capture = fed(
        AnthropicStreamCapture(),
        sse(anthropic_start(), text_delta("Hello"), text_delta(" world, again and again")),
    )
    assert capture.output_uncounted
    counted = capture.counted_usage(tokens.count(capture.streamed_text()))
    # The input it reported at the start is kept; its output (1) is replaced by the count.
    assert counted.input_tokens == 20 and not counted.usage_missing
    assert counted.output_tokens == tokens.count("Hello world, again and again") > 1
    assert counted.output_tokens_counted


def test_an_anthropic_stream_cut_before_any_text_is_flagged_as_counted() -> None:
    """Cut off in a redacted thinking block (nothing streamed has text): its output is
    message_start's placeholder, not the provider's count, and must not pass for one (a
    hard cap settled it at one output token and let its worst case go, while the
    thinking was billed)."""
    redacted = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
    }
    capture = fed(AnthropicStreamCapture(), sse(anthropic_start(), redacted, {"type": "ping"}))
    assert capture.output_uncounted
    counted = capture.counted_usage(tokens.count(capture.streamed_text()))
    assert counted.input_tokens == 20 and not counted.usage_missing
    assert counted.output_tokens == 1  # the placeholder, now flagged as no count
    assert counted.output_tokens_counted


def test_an_anthropic_stream_that_ends_is_not_counted() -> None:
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 9},
    }
    capture = fed(AnthropicStreamCapture(), sse(anthropic_start(), text_delta("Hi"), delta))
    assert not capture.output_uncounted
    assert capture.final_usage.output_tokens == 9


def test_past_what_is_kept_the_count_is_scaled_by_the_bytes_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one = sse(chat({"content": "word "}))
    monkeypatch.setattr(capturing, "KEEP_STREAMED_BYTES", 10 * len(one) - 20)  # data, not "data: "
    capture = fed(OpenAIStreamCapture(strip_usage_chunk=False), one * 20)
    assert capture.streamed_text() == "word " * 10  # ten kept of twenty
    assert capture.counted_usage(10).output_tokens == 20


def test_reasoning_streamed_as_delta_reasoning_is_counted() -> None:
    """Groq (reasoning_format "parsed"), OpenRouter, Ollama and vLLM stream a reasoning
    model's thinking as ``delta.reasoning`` (DeepSeek's name is reasoning_content): it is
    generated, billed output, counted when the stream is cut before its usage."""
    capture = fed(
        OpenAIStreamCapture(strip_usage_chunk=True),
        sse(
            chat({"role": "assistant", "content": ""}),
            chat({"reasoning": "The user greets me; I should greet them back politely."}),
            chat({"reasoning": "Then greet.", "reasoning_content": "Then greet."}),
            chat({"content": "Hi"}),
        ),
    )
    thought = "The user greets me; I should greet them back politely.Then greet."
    assert capture.streamed_text() == thought + "Hi"
