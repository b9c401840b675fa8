"""Input tokens Anthropic adds to a Messages API call with ``tools``, beyond its body.

A hard cap bounds a call's input by its body's bytes (ingress/guards/budgets.py), which
holds the tool definitions the client sends. Anthropic bills more than those:

- a tool-use system prompt, whenever the call has at least one tool, whose size
  depends on the model and on ``tool_choice`` (``auto``/``none``, or ``any``/``tool``);
- for each Anthropic-defined client tool (bash, text editor, computer use, browser use,
  memory), its definition, which the client names only by its ``type``
  (``bash_20250124``): fixed extra input tokens.

:func:`added_tokens` says how many, for the worst case only: what a call is charged
comes from the usage the provider reports, which holds these tokens already.

Sources (stored copies, read 2026-12-02): platform.claude.com's pricing page
(https://platform.claude.com/docs/en/about-claude/pricing, "Tool use system prompt
token count" and "Specific tool pricing", the copy with Claude Opus 5 and the
``*_toolset_20260801`` tools, and an earlier copy of the Claude 4.7 days), the tool use
overview (https://platform.claude.com/docs/en/agents-and-tools/tool-use/overview, same
table, copies of 2026-07 and later), the bash, text editor, computer use and memory tool
pages (https://platform.claude.com/docs/en/agents-and-tools/tool-use/<tool>), and the
older https://docs.anthropic.com/en/docs/tool-use-pricing-and-tokens (Claude 3). The
table was remeasured in 2026 (Opus 4.5: 346/313 tokens before, 496/588 after); where
the copies disagree, the larger is kept (a worst case must not be too small). No copy
lists Claude Opus 5.5, Sonnet 5.5, Haiku 5.5, Fable or Mythos: a model not in the table
takes the largest count known for its ``tool_choice``.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple


class ToolPrompt(NamedTuple):
    """The tool-use system prompt of a model, in tokens, by ``tool_choice``."""

    auto: int  # "auto" (the default) or "none"
    forced: int  # "any" or "tool"


# The tool-use system prompt by model family (dated and -latest names resolve to it).
# Two numbers where the copies differ: the larger is kept (latest table / earlier one).
TOOL_PROMPTS: dict[str, ToolPrompt] = {
    "claude-opus-5": ToolPrompt(286, 406),
    "claude-opus-4-8": ToolPrompt(290, 410),
    "claude-opus-4-7": ToolPrompt(675, 804),  # was 346/313
    "claude-opus-4-6": ToolPrompt(497, 589),  # was 346/313
    "claude-opus-4-5": ToolPrompt(496, 588),  # was 346/313
    "claude-opus-4-1": ToolPrompt(346, 315),  # now 313/315, was 346/313
    "claude-opus-4": ToolPrompt(346, 315),  # now 313/315, was 346/313
    "claude-opus-4-0": ToolPrompt(346, 315),
    "claude-sonnet-5": ToolPrompt(354, 474),
    "claude-sonnet-4-6": ToolPrompt(497, 589),  # was 346/313
    "claude-sonnet-4-5": ToolPrompt(496, 588),  # was 346/313
    "claude-sonnet-4": ToolPrompt(346, 315),  # now 313/315, was 346/313
    "claude-sonnet-4-0": ToolPrompt(346, 315),
    "claude-haiku-4-5": ToolPrompt(496, 588),  # was 346/313
    "claude-3-7-sonnet": ToolPrompt(346, 313),
    "claude-3-5-sonnet": ToolPrompt(346, 313),  # the October 2024 release's (June's is smaller)
    "claude-3-5-haiku": ToolPrompt(264, 355),  # now 264/355, was 264/340
    "claude-3-opus": ToolPrompt(530, 281),
    "claude-3-sonnet": ToolPrompt(159, 235),
    "claude-3-haiku": ToolPrompt(264, 340),
}
# A model not in the table: the most any model's prompt is, for each tool_choice.
UNKNOWN_MODEL = ToolPrompt(
    max(p.auto for p in TOOL_PROMPTS.values()), max(p.forced for p in TOOL_PROMPTS.values())
)

# Anthropic-defined client tools by the prefix of their type (every dated version), in
# input tokens a definition adds on top of the tool-use system prompt; the first prefix
# that matches counts. Model-independent: the most the pages give for any model.
TOOL_DEFINITIONS: tuple[tuple[str, int], ...] = (
    # "about 4,590" on Sonnet 5 (4,520 on Opus 5 and 4.8) with the default members: the
    # members' definitions and the tool-use system prompt; rounded up.
    ("computer_toolset_", 4_600),
    # computer_20241022/20250124/20251124: 735 a definition (683 in a secondary copy),
    # plus 466-499 tokens of the computer use system prompt.
    ("computer_", 735 + 499),
    # "about 6,670" on Sonnet 5 with the default members (6,610 on Opus 5 and 4.8), plus
    # "about 880" with all four optional ones enabled: 7,550, rounded up.
    ("browser_toolset_", 7_600),
    # 325 on Opus 4.7 and later; 244 on Opus 4.6, Sonnet 4.6 and earlier (a flat 245
    # before the per-model table).
    ("bash_", 325),
    # 700 for every version listed (text_editor_20241022 to 20250728).
    ("text_editor_", 700),
    # Not published. Its commands are the text editor's and two more, and it adds a
    # memory protocol to the system prompt (about 90 tokens): the text editor's 700
    # plus that, rounded up. An estimate, not a figure read.
    ("memory_", 800),
)

# Version suffixes of a model name: a date (claude-sonnet-4-5-20250929, or @20250929 as
# on Google Cloud) or -latest (claude-3-7-sonnet-latest).
_VERSION = re.compile(r"(-latest|[-@]\d{8})$")


def added_tokens(payload: dict[str, Any]) -> int:
    """The input tokens an Anthropic Messages API call is billed beyond its body: 0
    without tools; with tools, the tool-use system prompt for its model and
    ``tool_choice``, plus the fixed definition of each Anthropic-defined tool."""
    tools = payload.get("tools")
    if not isinstance(tools, list) or not tools:
        return 0  # no tool-use system prompt, whatever tool_choice says
    return tool_prompt(payload.get("model"), payload.get("tool_choice")) + sum(
        tool_definition(tool) for tool in tools
    )


def tool_prompt(model: Any, tool_choice: Any) -> int:
    """The tool-use system prompt of ``model`` (the largest known for a model not in
    the table) for ``tool_choice`` (``auto`` when not named; the larger of the two
    for one not known)."""
    name = model.strip().casefold() if isinstance(model, str) else ""
    prompt = TOOL_PROMPTS.get(_VERSION.sub("", name), UNKNOWN_MODEL)
    choice = tool_choice.get("type") if isinstance(tool_choice, dict) else None
    if tool_choice is None or choice in ("auto", "none"):
        return prompt.auto
    if choice in ("any", "tool"):
        return prompt.forced
    return max(prompt)


def tool_definition(tool: Any) -> int:
    """The input tokens an Anthropic-defined tool's definition adds (0 for the caller's
    own tools, whose definitions are in the body, and for server tools)."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if isinstance(kind, str):
        for prefix, tokens in TOOL_DEFINITIONS:
            if kind.startswith(prefix):
                return tokens
    return 0
