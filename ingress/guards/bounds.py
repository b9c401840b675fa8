"""What a request body says about the most a call can spend, before it is forwarded.

A hard cap reserves a call's worst case (ingress/guards/budgets.py): its input bounded
by the body's bytes (no token is shorter than a byte), its output by ``max_tokens`` for
each answer asked for. The bytes bound the input only when the body holds all of it.
A body that makes the provider add content of its own to the prompt does not:

- a conversation kept by the provider: OpenAI's Responses API ``previous_response_id``
  or ``conversation``, or a stored prompt (``prompt: {"id": ...}``);
- a file or an image the provider fetches: a ``file_id``, a ``file_url``, an image or
  document ``url`` that is not a ``data:`` URL (OpenAI's chat and Responses parts,
  Anthropic's ``source``);
- tools the provider runs itself, whose results it reads back as input: the Responses
  API's built-in tools (web and file search, code interpreter, MCP), chat's
  ``web_search_options``, Anthropic's server tools (``web_search_...``, ``web_fetch_...``,
  ``code_execution_...``) and ``mcp_servers``.

Such a call's input is bounded by ``budget_default_context_tokens`` instead (a context
window) whatever its bytes. Nested references are looked for only in bodies whose bytes
hold one of their keys, quoted: inside a JSON string a quote is escaped, so an
unescaped ``"file_id"`` is a key or a whole string, never a user's text.
"""

from __future__ import annotations

from typing import Any

# Top-level fields naming content kept by the provider, when set.
_KEPT = ("previous_response_id", "conversation", "web_search_options", "mcp_servers")
# Keys whose (string) value names content the provider fetches, when not a data: URL.
_FETCHED = frozenset({"file_id", "file_url", "image_url", "url"})
_MARKERS = tuple(f'"{key}"'.encode() for key in _FETCHED)
# Tools the provider runs on its own side, by type (dated versions too, as Anthropic's
# "web_search_20250305"): OpenAI's Responses API built-ins, Anthropic's server tools.
# Tools the caller runs (functions, Anthropic's bash and text editor, computer use)
# send their results back in a later request's body, bounded by its bytes.
_PROVIDER_TOOLS = (
    "web_search", "web_fetch", "file_search", "code_interpreter", "code_execution", "mcp",
    "tool_search",
)  # fmt: skip


def choices(payload: dict[str, Any]) -> int:
    """How many answers the call asks for (OpenAI's ``n``; ``best_of`` on completions
    generates that many): each may spend up to ``max_tokens``."""
    asked = [payload.get(name) for name in ("n", "best_of")]
    return max([1, *(v for v in asked if isinstance(v, int) and not isinstance(v, bool))])


def max_tokens(payload: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def input_unbounded(payload: dict[str, Any], body: bytes) -> bool:
    """True if the provider may add to the call's prompt content its body does not hold."""
    if any(payload.get(name) not in (None, "", []) for name in _KEPT):
        return True  # (web_search_options: {} asks for a search with the defaults)
    if isinstance(payload.get("prompt"), dict):  # a stored prompt (a string: completions)
        return True
    tools = payload.get("tools")
    if isinstance(tools, list) and any(_provider_run(tool) for tool in tools):
        return True
    return any(marker in body for marker in _MARKERS) and _fetches(payload)


def _provider_run(tool: Any) -> bool:
    kind = tool.get("type") if isinstance(tool, dict) else None
    return isinstance(kind, str) and kind.startswith(_PROVIDER_TOOLS)


def _fetches(value: Any) -> bool:
    """Does ``value`` (a parsed body, walked whole) name a file or a URL to fetch?"""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if key in _FETCHED and isinstance(inner, str) and inner:
                    if not inner.startswith("data:"):
                        return True
                elif isinstance(inner, (dict, list)):
                    stack.append(inner)
        elif isinstance(item, list):
            stack.extend(inner for inner in item if isinstance(inner, (dict, list)))
    return False
