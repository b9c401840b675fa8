"""What a body says about a call's worst case (ingress/guards/bounds.py): when its bytes
bound its input, and when the provider adds content the body does not hold."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from ingress.guards.bounds import input_unbounded
from tests.test_budget_book import MIDNIGHT, book

PNG = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4" * 4


def unbounded(payload: dict[str, Any]) -> bool:
    return input_unbounded(payload, orjson.dumps(payload))


def chat(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": list(parts)}], **extra}


TEXT = {"type": "text", "text": "what is in the picture?"}


@pytest.mark.parametrize(
    "payload",
    [
        chat(TEXT),
        chat(TEXT, {"type": "image_url", "image_url": {"url": PNG}}),  # its bytes are here
        # A user's words that look like keys are inside a string: their quotes escaped.
        chat({"type": "text", "text": 'set "file_id": "file-1" and "url": "https://x.io"'}),
        {"model": "gpt-4o", "prompt": "once upon a time"},  # completions: prompt is text
        {"model": "gpt-4.1", "input": "hi", "previous_response_id": None},
        chat(TEXT, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        # A tool's parameter named url is a schema, not something to fetch.
        chat(
            TEXT,
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "get",
                        "parameters": {"type": "object", "properties": {"url": {"type": "string"}}},
                    },
                }
            ],
        ),
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": PNG[22:],
                            },
                        }
                    ],
                }
            ],
        },
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [],
            "tools": [
                {"name": "lookup", "input_schema": {"type": "object"}},
                {"type": "bash_20250124", "name": "bash"},
            ],
        },
    ],
)
def test_the_bytes_bound_the_input(payload: dict[str, Any]) -> None:
    assert not unbounded(payload)


@pytest.mark.parametrize(
    "payload",
    [
        {"model": "gpt-4.1", "input": "and then?", "previous_response_id": "resp_123"},
        {"model": "gpt-4.1", "input": "hi", "conversation": "conv_123"},
        {"model": "gpt-4.1", "prompt": {"id": "pmpt_123", "version": "2"}},
        chat(TEXT, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
        chat(TEXT, {"type": "file", "file": {"file_id": "file-123"}}),
        {
            "model": "gpt-4.1",
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}],
                }
            ],
        },
        {
            "model": "gpt-4.1",
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_file", "file_url": "https://example.com/a.pdf"}],
                }
            ],
        },
        {"model": "gpt-4.1", "input": "news?", "tools": [{"type": "web_search_preview"}]},
        {
            "model": "gpt-4.1",
            "input": "?",
            "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}],
        },
        {"model": "gpt-4o-search-preview", "messages": [], "web_search_options": {}},
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "url", "url": "https://example.com/a.pdf"},
                        }
                    ],
                }
            ],
        },
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "file", "file_id": "file_011"}}
                    ],
                }
            ],
        },
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [],
            "mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}],
        },
    ],
)
def test_content_the_provider_adds_unbounds_the_input(payload: dict[str, Any]) -> None:
    assert unbounded(payload)


def test_an_unbounded_input_is_reserved_as_a_whole_context() -> None:
    budgets, _ = book("10")
    bounded = budgets.worst_case("gpt-4o", 200, 100, MIDNIGHT)
    whole = budgets.worst_case("gpt-4o", 200, 100, MIDNIGHT, input_unbounded=True)
    assert bounded is not None and whole is not None
    output = 100 * Decimal("10.00") / 1_000_000
    assert bounded - output == 200 * Decimal("2.50") / 1_000_000
    # 1,000,000 prompt tokens (budget_default_context_tokens) at gpt-4o's input rate.
    assert whole - output == Decimal("2.50")
