"""What a body says about a call's worst case (ingress/guards/bounds.py): when its bytes
bound its input, and when the provider adds content the body does not hold."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from ingress.guards.bounds import (
    MAX_COUNT,
    choices,
    images,
    input_unbounded,
    max_tokens,
    prompts,
    reach,
    searches_by_preview,
    web_searches,
)
from tests.test_budget_book import MIDNIGHT, book

PNG = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4" * 4


def unbounded(payload: dict[str, Any]) -> bool:
    return input_unbounded(orjson.loads(orjson.dumps(payload)))


def chat(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": list(parts)}], **extra}


TEXT = {"type": "text", "text": "what is in the picture?"}


@pytest.mark.parametrize(
    "payload",
    [
        chat(TEXT),
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
        # A document of plain text is its bytes.
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "x"},
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
        # URLs that are not parts to fetch: a tool call's arguments, citations, metadata.
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "fetch",
                            "input": {"url": "https://example.com"},
                        }
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "text",
                            "text": "see",
                            "citations": [
                                {
                                    "type": "web_search_result_location",
                                    "url": "https://example.com",
                                    "cited_text": "x",
                                }
                            ],
                        }
                    ],
                },
            ],
        },
        {
            "model": "gpt-4.1",
            "input": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [
                        {
                            "type": "output_text",
                            "text": "see",
                            "annotations": [{"type": "url_citation", "url": "https://example.com"}],
                        }
                    ],
                }
            ],
        },
        chat(TEXT, metadata={"url": "https://my.app/page"}),
        # Reasoning passed back whole (stateless): it is in the body.
        {
            "model": "o4-mini",
            "input": [
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA..."}
            ],
            "store": False,
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
        chat(TEXT, {"type": "file", "file": {"file_id": "file-123"}}),
        # A file in a Responses function call's output
        {
            "model": "gpt-4.1",
            "input": [
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [{"type": "input_file", "file_id": "file-1"}],
                }
            ],
        },
        # Documents held inline: the provider counts their pages as images, not bytes.
        chat(TEXT, {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:..."}}),
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {
                                "type": "base64",
                                "media_type": "application/pdf",
                                "data": "x",
                            },
                        },
                    ],
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
            "messages": [],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [],
            "mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}],
        },
        {"model": "gpt-4.1", "input": [{"type": "item_reference", "id": "msg_123"}]},
        {"model": "o4-mini", "input": [{"type": "reasoning", "id": "rs_1", "summary": []}]},
        {
            "model": "gpt-4o-audio-preview",
            "messages": [{"role": "assistant", "audio": {"id": "audio_123"}}],
        },
        {
            "model": "gpt-4.1",
            "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-123"}]}],
        },
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": [{"type": "container_upload", "file_id": "file_1"}]}
            ],
        },
    ],
)
def test_content_the_provider_adds_unbounds_the_input(payload: dict[str, Any]) -> None:
    assert unbounded(payload)


def test_a_name_spelled_with_escapes_is_still_found() -> None:
    """JSON lets a string be written with escapes; the provider reads what they spell."""
    body = b'{"model": "gpt-4.1", "input": [{"type": "item\\u005freference", "id": "msg_1"}]}'
    payload = orjson.loads(body)
    assert payload["input"][0]["type"] == "item_reference"
    assert b"item_reference" not in body
    assert input_unbounded(payload)


def _anthropic(*parts: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "tool_result", "tool_use_id": "t", "content": list(parts)}]
    return {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("payload", "count"),
    [
        (chat(TEXT, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}), 1),
        (chat(TEXT, *[{"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}] * 40), 40),
        (
            {
                "model": "gpt-4.1",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_image", "image_url": PNG},
                            {"type": "input_image", "image_url": "https://example.com/a.png"},
                            {"type": "input_image", "file_id": "file-1"},
                        ],
                    }
                ],
            },
            3,
        ),
        # Anthropic's, inline or by file, in a tool result's parts too
        (
            _anthropic(
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "x"},
                },
                {"type": "image", "source": {"type": "file", "file_id": "file_011"}},
            ),
            2,
        ),
        # in a Responses tool call's output: a function's parts, a computer's screenshot
        (
            {
                "model": "gpt-4o-mini",
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c1",
                        "output": [{"type": "input_image", "image_url": PNG}] * 15,
                    },
                    {
                        "type": "computer_call_output",
                        "call_id": "c2",
                        "output": {"type": "computer_screenshot", "file_id": "file-1"},
                    },
                ],
            },
            16,
        ),
        # in an Anthropic document of content blocks
        (
            {
                "model": "claude-sonnet-4-5",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {
                                    "type": "content",
                                    "content": [
                                        {"type": "text", "text": "x"},
                                        {"type": "image", "source": {"type": "url", "url": "u"}},
                                        {"type": "image", "source": {"type": "url", "url": "v"}},
                                    ],
                                },
                            }
                        ],
                    }
                ],
            },
            2,
        ),
        (chat(TEXT), 0),
    ],
)
def test_images_are_counted_apart_from_the_bytes(payload: dict[str, Any], count: int) -> None:
    """A provider counts an image's pixels, not its bytes (a 1x1 GIF of 43 bytes is
    2,833 tokens on gpt-4o-mini): each adds budget_image_tokens to the worst case,
    wherever it comes from; the rest of the input stays bounded by the bytes."""
    assert images(payload) == count
    assert not unbounded(payload)
    assert reach(payload).images == count


def test_each_image_adds_its_most_tokens_to_the_worst_case() -> None:
    budgets, _ = book("10")
    plain = budgets.worst.cost("gpt-4o-mini", 5_000, 1, MIDNIGHT)
    two = budgets.worst.cost("gpt-4o-mini", 5_000, 1, MIDNIGHT, images=2)
    forty = budgets.worst.cost("gpt-4o-mini", 5_000, 1, MIDNIGHT, images=40)
    assert plain is not None and two is not None and forty is not None
    # two images of 50,000 tokens (budget_image_tokens) at gpt-4o-mini's $0.15 a million
    assert two - plain == 2 * 50_000 * Decimal("0.15") / 1_000_000
    # forty: the prompt is still at most the model's context window (128,000 tokens)
    output = Decimal("0.60") / 1_000_000
    assert forty == 128_000 * Decimal("0.15") / 1_000_000 + output


def test_an_unbounded_input_is_reserved_as_a_whole_context() -> None:
    budgets, _ = book("10")
    bounded = budgets.worst.cost("gpt-4o", 200, 100, MIDNIGHT)
    whole = budgets.worst.cost("gpt-4o", 200, 100, MIDNIGHT, input_unbounded=True)
    assert bounded is not None and whole is not None
    output = 100 * Decimal("10.00") / 1_000_000
    assert bounded - output == 200 * Decimal("2.50") / 1_000_000
    # 1,000,000 prompt tokens (budget_default_context_tokens) at gpt-4o's input rate.
    assert whole - output == Decimal("2.50")


def test_the_prompts_a_call_sends_at_once_are_counted_where_the_api_answers_each() -> None:
    assert prompts({"prompt": ["a", "b", "c"]}, "prompt") == 3  # completions
    assert prompts({"prompt": [[1, 2], [3]]}, "prompt") == 2  # two prompts in tokens
    assert prompts({"prompt": [1, 2, 3]}, "prompt") == 1  # one prompt in tokens
    assert prompts({"prompt": "abc"}, "prompt") == 1
    assert prompts({"input": ["a"] * 5}, "input") == 5  # embeddings
    assert prompts({"input": ["a"] * 5}, None) == 1  # a Responses input list is one prompt
    assert prompts({"prompt": []}, "prompt") == 1


def test_each_prompt_may_fill_a_context_window_and_spend_max_tokens_per_answer() -> None:
    budgets, _ = book("10")
    one = budgets.worst.cost("gpt-4o", 1_000_000, 100, MIDNIGHT, choices=2)
    four = budgets.worst.cost("gpt-4o", 1_000_000, 100, MIDNIGHT, choices=2, prompts=4)
    assert one is not None and four is not None
    # gpt-4o reads at most 128,000 tokens a prompt ($0.32) and writes 100 an answer.
    assert one == Decimal("0.32") + 2 * 100 * Decimal("10.00") / 1_000_000
    assert four == 4 * one


def test_the_largest_output_ceiling_named_is_the_one_reserved() -> None:
    """An OpenAI-compatible upstream may honour max_tokens and ignore the newer name."""
    assert max_tokens({"max_completion_tokens": 1, "max_tokens": 393_216}) == 393_216
    assert max_tokens({"max_output_tokens": 50}) == 50
    assert max_tokens({"max_tokens": True, "max_completion_tokens": -1}) is None


def test_a_count_written_as_a_float_or_a_string_is_read_as_servers_read_it() -> None:
    """OpenAI-compatible servers built on pydantic (vLLM...) read "100000" and 1e5 as
    100000: skipped, a max_completion_tokens of "100000" left 16 reserved."""
    assert max_tokens({"max_tokens": 16, "max_completion_tokens": "100000"}) == 100_000
    assert max_tokens({"max_tokens": 1e5}) == 100_000
    assert max_tokens({"max_tokens": "2.0e3"}) == 2_000
    assert choices({"n": "8"}) == 8 and choices({"n": 8.0}) == 8
    assert max_tokens({"max_tokens": "many", "max_output_tokens": 0.5}) is None
    assert max_tokens({"max_tokens": float("inf")}) is None
    # past any model's ceiling, a count is taken as the most there is (1e308 tokens
    # overflowed the float of a key's rate-limit bucket, and every later call was a 500)
    assert max_tokens({"max_tokens": 1e308}) == MAX_COUNT
    assert choices({"n": 10**30}) == MAX_COUNT


SEARCH = {"type": "web_search_20250305", "name": "web_search"}


@pytest.mark.parametrize(
    ("payload", "most"),
    [
        ({"tools": [{"type": "function", "name": "f"}]}, 0),
        ({"web_search_options": {}}, 0),  # chat's search models: not counted, not priced
        ({"tools": [SEARCH]}, None),
        ({"tools": [{**SEARCH, "max_uses": 5}]}, 5),
        ({"tools": [{**SEARCH, "max_uses": 5}, {**SEARCH, "max_uses": 2}]}, 7),
        ({"tools": [{**SEARCH, "max_uses": 5}, SEARCH]}, None),
        ({"tools": [{**SEARCH, "max_uses": "5"}]}, 5),  # read as pydantic servers read it
        ({"tools": [{**SEARCH, "max_uses": "five"}]}, None),
        ({"tools": [{"type": "web_search"}], "max_tool_calls": 3}, 3),  # Responses API
        ({"tools": [{"type": "web_search_preview"}], "max_tool_calls": 0}, 0),
        ({"tools": [{**SEARCH, "max_uses": 9}], "max_tool_calls": 4}, 4),
        ({"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}, 0),  # no fee
        # a stored prompt's tools are not in the body: it may search
        ({"prompt": {"id": "pmpt_1"}}, None),
        ({"prompt": {"id": "pmpt_1"}, "max_tool_calls": 2}, 2),
        ({"prompt": "Once upon", "max_tool_calls": 2}, 0),  # completions: no tools
    ],
)
def test_the_searches_a_call_allows(payload: dict[str, Any], most: int | None) -> None:
    assert web_searches(payload) == most


def test_a_hard_cap_reserves_the_fee_of_the_searches_a_call_allows() -> None:
    budgets, _ = book("10")
    tokens = budgets.worst.cost("claude-sonnet-4-5", 200, 100, MIDNIGHT, provider="anthropic")
    five = budgets.worst.cost(
        "claude-sonnet-4-5", 200, 100, MIDNIGHT, provider="anthropic", web_searches=5
    )
    unbounded = budgets.worst.cost(
        "claude-sonnet-4-5", 200, 100, MIDNIGHT, provider="anthropic", web_searches=None
    )
    assert tokens is not None and five is not None and unbounded is not None
    assert five - tokens == Decimal("0.05")  # $10 per 1,000
    assert unbounded - tokens == Decimal("1.00")  # budget_default_web_searches: 100


@pytest.mark.parametrize(
    ("tools", "preview"),
    [
        ([{"type": "web_search_preview"}], True),
        ([{"type": "web_search_preview_2025_03_11"}, {"type": "function", "name": "f"}], True),
        ([{"type": "web_search"}], False),
        ([{"type": "web_search_2025_08_26"}], False),
        ([{"type": "function", "name": "web_search_preview"}], False),
        ([], False),
        ("web_search_preview", False),
    ],
)
def test_searches_are_the_preview_tool_s_when_it_is_the_only_search_tool(
    tools: Any, preview: bool
) -> None:
    assert searches_by_preview({"tools": tools}) is preview
    assert reach({"tools": tools}).preview_named is preview


def test_searches_beside_both_tools_are_web_search_s_but_may_cost_the_preview_fee() -> None:
    both = {"tools": [{"type": "web_search_preview"}, {"type": "web_search"}]}
    assert searches_by_preview(both) is False  # which tool ran a search cannot be told
    assert reach(both).preview_named is True  # a hard cap reserves the dearer fee
    stored = {"prompt": {"id": "pmpt_1"}}  # its tools are the provider's to add
    assert (searches_by_preview(stored), reach(stored).preview_named) == (False, True)


def test_a_hard_cap_reserves_searches_by_the_preview_tool_at_its_fee() -> None:
    budgets, _ = book("10")

    def worst(searches: int, preview_named: bool, model: str = "gpt-4o") -> Decimal:
        cost = budgets.worst.cost(
            model,
            200,
            100,
            MIDNIGHT,
            provider="openai",
            web_searches=searches,
            preview_named=preview_named,
        )
        assert cost is not None
        return cost

    tokens = worst(0, True)
    assert worst(4, False) - tokens == Decimal("0.04")  # web_search: $10 per 1,000
    assert worst(4, True) - tokens == Decimal("0.1")  # web_search_preview on gpt-4o: $25
    assert worst(4, True, "o3") - worst(0, True, "o3") == Decimal("0.04")  # no fee of its own


def test_the_geography_a_body_asks_its_inference_to_run_in() -> None:
    """Anthropic's inference_geo, as named (cased as Anthropic's own values); None when
    the body names none, as its workspace's default then decides."""
    assert reach({"inference_geo": "us"}).geo == "us"
    assert reach({"inference_geo": " US "}).geo == "us"
    assert reach({"inference_geo": "global"}).geo == "global"
    for body in ({}, {"inference_geo": None}, {"inference_geo": 1}):
        assert reach(body).geo is None
