"""The input tokens Anthropic bills a Messages API call with tools beyond its body
(ingress/forward/tool_tokens.py): the tool-use system prompt for its model and
tool_choice, and the fixed definitions of Anthropic's own tools."""

from __future__ import annotations

from typing import Any

import pytest

from ingress.forward.tool_tokens import TOOL_PROMPTS, added_tokens

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def call(model: str = "claude-sonnet-4-5", *tools: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": list(tools),
        **extra,
    }


@pytest.mark.parametrize(
    ("model", "tool_choice", "tokens"),
    [
        ("claude-sonnet-4-5-20250929", None, 496),  # none named: auto
        ("claude-sonnet-4-5-20250929", {"type": "auto"}, 496),
        ("claude-sonnet-4-5-20250929", {"type": "none"}, 496),
        ("claude-sonnet-4-5-20250929", {"type": "any"}, 588),
        ("claude-sonnet-4-5-20250929", {"type": "tool", "name": "get_weather"}, 588),
        ("claude-opus-4-7", {"type": "auto"}, 675),
        ("claude-opus-4-7", {"type": "any"}, 804),
        ("claude-opus-5", {"type": "any"}, 406),
        ("claude-sonnet-4-20250514", {"type": "auto"}, 346),  # the earlier table's, larger
        ("claude-sonnet-4-20250514", {"type": "tool", "name": "get_weather"}, 315),
        ("claude-3-5-haiku-latest", {"type": "any"}, 355),
        ("claude-3-opus-20240229", {"type": "auto"}, 530),
        ("Claude-Haiku-4-5@20251001", {"type": "auto"}, 496),  # Google Cloud's spelling
        ("claude-sonnet-4-5", {"type": "sometime"}, 588),  # a choice not known: the larger
    ],
)
def test_tools_add_the_models_tool_use_system_prompt_for_its_tool_choice(
    model: str, tool_choice: dict[str, Any] | None, tokens: int
) -> None:
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    assert added_tokens(call(model, WEATHER, **extra)) == tokens


@pytest.mark.parametrize(
    ("tool", "tokens"),
    [
        ({"type": "bash_20250124", "name": "bash"}, 325),
        ({"type": "bash_20241022", "name": "bash"}, 325),
        ({"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}, 700),
        ({"type": "text_editor_20250124", "name": "str_replace_editor"}, 700),
        # 735 a definition, and the computer use system prompt's 499
        ({"type": "computer_20250124", "name": "computer", "display_width_px": 1024}, 1234),
        ({"type": "computer_toolset_20260801"}, 4600),  # not computer_'s
        ({"type": "browser_toolset_20260801"}, 7600),
        ({"type": "memory_20250818", "name": "memory"}, 800),
        (WEATHER, 0),  # the caller's own: its definition is in the body
        ({"type": "custom", **WEATHER}, 0),
        ({"type": "web_search_20250305", "name": "web_search"}, 0),  # a server tool
    ],
)
def test_an_anthropic_defined_tool_adds_its_definitions_tokens(
    tool: dict[str, Any], tokens: int
) -> None:
    prompt = added_tokens(call("claude-haiku-4-5", WEATHER))
    assert prompt == 496
    assert added_tokens(call("claude-haiku-4-5", WEATHER, tool)) == prompt + tokens


def test_the_definitions_add_up_beside_the_system_prompt_counted_once() -> None:
    bash = {"type": "bash_20250124", "name": "bash"}
    editor = {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}
    assert added_tokens(call("claude-opus-4-8", bash, editor)) == 290 + 325 + 700


@pytest.mark.parametrize(
    "payload",
    [
        {"model": "claude-opus-4-7", "max_tokens": 100, "messages": []},
        call("claude-opus-4-7"),  # tools: []
        call("claude-opus-4-7", tool_choice={"type": "none"}),
        {**call("claude-opus-4-7"), "tools": None},
        {**call("claude-opus-4-7"), "tools": {"type": "bash_20250124"}},  # not a list
    ],
)
def test_no_tools_add_nothing(payload: dict[str, Any]) -> None:
    assert added_tokens(payload) == 0


@pytest.mark.parametrize("model", ["claude-opus-5-5", "claude-fable-5-1", "gpt-4o", "", None])
def test_a_model_not_in_the_table_takes_the_largest_count_known(model: Any) -> None:
    largest_auto = max(prompt.auto for prompt in TOOL_PROMPTS.values())
    largest_forced = max(prompt.forced for prompt in TOOL_PROMPTS.values())
    assert (largest_auto, largest_forced) == (675, 804)  # Claude Opus 4.7's
    assert added_tokens({**call("x", WEATHER), "model": model}) == largest_auto
    forced = {**call("x", WEATHER, tool_choice={"type": "any"}), "model": model}
    assert added_tokens(forced) == largest_forced
