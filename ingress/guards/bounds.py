"""What a request body says about the most a call can spend, before it is forwarded.

A hard cap reserves a call's worst case (ingress/guards/budgets.py): its input bounded
by the body's bytes (no token is shorter than a byte), its output by ``max_tokens`` for
each answer asked for. The bytes bound the input only when the body holds all of it.
A body that makes the provider add content of its own to the prompt does not:

- a conversation kept by the provider: OpenAI's Responses API ``previous_response_id``
  or ``conversation``, or a stored prompt (``prompt: {"id": ...}``);
- a file or an earlier item the provider fetches: a content part that names one by id
  or URL rather than holding it (the Responses API's ``item_reference``, a
  ``reasoning`` item without its ``encrypted_content``; chat's ``audio`` of an earlier
  answer by id; Anthropic's ``source`` of type ``url`` or ``file``,
  ``container_upload``);
- a document (a PDF), held inline too: the provider counts its pages as images, not
  its bytes. Chat's ``file``, the Responses API's ``input_file``, Anthropic's
  ``document`` (but a document of plain text, which is its bytes);
- tools the provider runs itself, whose results it reads back as input: the Responses
  API's built-in tools (web and file search, code interpreter, MCP), chat's
  ``web_search_options``, Anthropic's server tools (``web_search_...``, ``web_fetch_...``,
  ``code_execution_...``, ``advisor_...``: the advice) and ``mcp_servers``.

Such a call's input is bounded by ``budget_default_context_tokens`` instead (or the
model's context window, if larger) whatever its bytes. An image, held inline or named
by URL or id, is counted apart (:func:`images`): the provider counts its tokens by its
pixels, not its bytes (a 1x1 GIF of 43 bytes is 2,833 input tokens on gpt-4o-mini), up
to a most for an image, ``budget_image_tokens`` each. Only the parts of the messages
(``messages``, ``input``, and the content lists inside them) are looked at: a ``url`` in
a tool call's arguments, a citation or metadata is not fetched. A payload is as parsed,
so a name spelled with JSON escapes is read as the provider reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

# The fields naming a call's output ceiling, by API (the largest named is reserved).
_OUTPUT_CEILINGS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
# Top-level fields naming content kept by the provider, when set.
_KEPT = ("previous_response_id", "conversation", "web_search_options", "mcp_servers")
# Tools the provider runs on its own side, by type (dated versions too, as Anthropic's
# "web_search_20250305"): OpenAI's Responses API built-ins, Anthropic's server tools.
# Tools the caller runs (functions, Anthropic's bash and text editor, computer use)
# send their results back in a later request's body, bounded by its bytes.
_PROVIDER_TOOLS = (
    "web_search", "web_fetch", "file_search", "code_interpreter", "code_execution", "mcp",
    "tool_search", "advisor",
)  # fmt: skip


def choices(payload: dict[str, Any]) -> int:
    """How many answers the call asks for (OpenAI's ``n``; ``best_of`` on completions
    generates that many): each may spend up to ``max_tokens``."""
    asked = (_count(payload.get(name)) for name in ("n", "best_of"))
    return max([1, *(v for v in asked if v is not None)])


def prompts(payload: dict[str, Any], field: str | None) -> int:
    """How many prompts the provider answers apart: each string (or token list) of a
    list in ``field`` (completions' ``prompt``, each answered ``n`` times; embeddings'
    ``input``), each up to a whole context window. A list of integers is one prompt, in
    tokens; any other value, one prompt."""
    value = payload.get(field) if field is not None else None
    if not isinstance(value, list) or not value or isinstance(value[0], int):
        return 1
    return len(value)


def max_tokens(payload: dict[str, Any]) -> int | None:
    """The output ceiling the call names: the largest of the fields present, as an
    upstream may honour one and ignore another."""
    named = (_count(payload.get(name)) for name in _OUTPUT_CEILINGS)
    valid = [v for v in named if v is not None]
    return max(valid) if valid else None


def input_unbounded(payload: dict[str, Any]) -> bool:
    """True if the provider may add to the call's prompt content its body does not hold."""
    if any(payload.get(name) not in (None, "", []) for name in _KEPT):
        return True  # (web_search_options: {} asks for a search with the defaults)
    if _stored_prompt(payload):
        return True
    tools = payload.get("tools")
    if isinstance(tools, list) and any(_provider_run(tool) for tool in tools):
        return True
    return _fetches(payload)


def web_searches(payload: dict[str, Any]) -> int | None:
    """The most web searches the call lets the provider run, each billed on top of the
    tokens: 0 without a web search tool; the sum of each search tool's ``max_uses``
    (Anthropic), at most the Responses API's ``max_tool_calls`` (which bounds every
    built-in tool call of the response); None when nothing bounds them. A stored
    prompt's tools are not in the body: such a call may search, up to
    ``max_tool_calls``. (Chat Completions' ``web_search_options`` is not counted: its
    searches are not priced.)"""
    searching = _search_tools(payload)
    calls = _count(payload.get("max_tool_calls"))
    if not searching:
        return calls if _stored_prompt(payload) else 0
    uses = [_count(tool.get("max_uses")) for tool in searching]
    each = None if None in uses else sum(u for u in uses if u is not None)
    bounds = [bound for bound in (calls, each) if bound is not None]
    return min(bounds) if bounds else None


def searches_by_preview(payload: dict[str, Any]) -> bool:
    """Whether the call's web searches are run by the Responses API's older
    ``web_search_preview`` tool (``web_search_preview_2025_03_11`` too), which OpenAI
    prices apart on some models: it is the call's only kind of web search tool. (With
    the current ``web_search`` beside it, which tool ran a search cannot be told: its
    ``web_search_call`` items are alike. They count as ``web_search``'s.)"""
    return _preview_kinds(payload) == {True}


def preview_named(payload: dict[str, Any]) -> bool:
    """Whether the call names the ``web_search_preview`` tool, alone or not, or may have
    it from a stored prompt: its searches may cost that tool's fee (what a hard cap
    reserves for them)."""
    return True in _preview_kinds(payload) or _stored_prompt(payload)


def _stored_prompt(payload: dict[str, Any]) -> bool:
    """A Responses API call of a stored prompt (``prompt: {"id": ...}``; a string is
    the completions API's prompt), whose input and tools the provider adds."""
    return isinstance(payload.get("prompt"), dict)


def _preview_kinds(payload: dict[str, Any]) -> set[bool]:
    """For each web search tool the call names, whether it is ``web_search_preview``."""
    return {tool["type"].startswith("web_search_preview") for tool in _search_tools(payload)}


def _search_tools(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The web search tools the call names (any version: ``web_search_20250305``)."""
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return []
    return [
        tool
        for tool in tools
        if isinstance(tool, dict)
        and isinstance(tool.get("type"), str)
        and tool["type"].startswith("web_search")
    ]


# The most a count is taken for: past it, no model's ceiling (nor anyone's intent), and
# an arithmetic with 1e308 tokens overflows a float (a key's rate-limit bucket).
MAX_COUNT = 2**31 - 1


def _count(value: Any) -> int | None:
    """A count the body gives: a non-negative integer (not a bool), at most MAX_COUNT,
    else None. Also written as an integral float (``1e5``) or a string of one (``"8"``):
    OpenAI refuses them, but OpenAI-compatible servers built on pydantic (vLLM...) read
    them so."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return None
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    return min(value, MAX_COUNT) if isinstance(value, int) and value >= 0 else None


def fast(payload: dict[str, Any]) -> bool:
    """Whether the call asks for Anthropic's fast mode (``speed: "fast"``), which bills
    every token at a premium when it serves the call (it may serve it at standard speed:
    the answer's usage says which)."""
    return payload.get("speed") == "fast"


def inference_geo(payload: dict[str, Any]) -> str | None:
    """Where the call asks Anthropic to run its inference (``inference_geo``: ``"us"``
    bills every token at a premium, ``"global"`` at standard rates), or None when it
    names none: its workspace's ``default_inference_geo`` then decides, which llmtap
    cannot see (the answer's usage says where it ran)."""
    geo = payload.get("inference_geo")
    return geo.strip().casefold() if isinstance(geo, str) else None


def priority(payload: dict[str, Any], project_tier: str = "standard") -> bool:
    """Whether OpenAI may serve the call at its priority tier, and bill it so: it asks
    for it (``service_tier: "priority"``, or ``"fast"``: Priority processing's name since
    2026-07-30), or names no tier (or ``"auto"``) on a provider
    whose project's own tier is priority (``project_tier``:
    ProviderConfig.default_service_tier), which llmtap cannot see otherwise. A call
    asking for flex or the default tier cannot be billed above the standard rates."""
    asked = payload.get("service_tier")
    if asked is None or asked == "auto":
        return project_tier == "priority"
    return asked in ("priority", "fast")


def ultrafast(payload: dict[str, Any]) -> bool:
    """Whether the call asks OpenAI for its ultrafast tier (``service_tier:
    "ultrafast"``), which bills every token at a multiple of the standard rates when it
    serves the call (it may serve it at the standard tier: the answer says which)."""
    return payload.get("service_tier") == "ultrafast"


class Advisor(NamedTuple):
    """Anthropic's advisor tool (``advisor_20260301``) as a call names it: the advisor
    ``model``, billed at its own rates, the most calls of it (``max_uses``; None:
    unlimited) and the most output tokens a call (``max_tokens``; None: the model's
    own cap). Each call reads the whole transcript as its input."""

    model: str
    max_uses: int | None
    max_tokens: int | None


def advisor(payload: dict[str, Any]) -> Advisor | None:
    """The advisor tool the call names, or None (the API takes one, named ``advisor``)."""
    tools = payload.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith("advisor_"):
            model = tool.get("model")
            return Advisor(
                model if isinstance(model, str) else "",
                _count(tool.get("max_uses")),
                _count(tool.get("max_tokens")),
            )
    return None


class Reach(NamedTuple):
    """What a body leaves unbounded: whether its input is all in it
    (:func:`input_unbounded`), the most web searches it allows (:func:`web_searches`),
    the images it holds or names (:func:`images`), whether its searches may cost the
    ``web_search_preview`` tool's fee (:func:`preview_named`), whether its tokens may
    cost fast mode's rates (:func:`fast`), the input tokens the provider adds to its
    bytes (Anthropic's tool-use system prompt and its tools' definitions:
    ingress/forward/tool_tokens.py), the advisor tool it names (:func:`advisor`),
    where it asks its inference to run (:func:`inference_geo`; None: its workspace's
    default), and whether its tokens may cost OpenAI's priority tier rates
    (:func:`priority`) or its ultrafast tier's (:func:`ultrafast`)."""

    input_unbounded: bool
    web_searches: int | None
    images: int = 0
    preview_named: bool = False
    fast: bool = False
    added_tokens: int = 0
    advisor: Advisor | None = None
    geo: str | None = None
    priority: bool = False
    ultrafast: bool = False


def reach(
    payload: dict[str, Any],
    added_tokens: Callable[[dict[str, Any]], int] | None = None,
    project_tier: str = "standard",
    geo: str | None = None,
) -> Reach:
    """What ``payload`` leaves unbounded; ``added_tokens``: the endpoint's count of the
    input tokens its provider adds (:attr:`Endpoint.added_tokens`); ``project_tier``:
    the tier its provider serves a call naming none (:func:`priority`); ``geo``: where
    the provider's endpoint runs every call (an OpenAI data-residency endpoint's region,
    or "global": routing.endpoint_geo), None: where the body asks
    (:func:`inference_geo`)."""
    return Reach(
        input_unbounded(payload),
        web_searches(payload),
        images(payload),
        preview_named(payload),
        fast(payload),
        added_tokens(payload) if added_tokens is not None else 0,
        advisor(payload),
        inference_geo(payload) if geo is None else geo,
        priority=priority(payload, project_tier),
        ultrafast=ultrafast(payload),
    )


def _provider_run(tool: Any) -> bool:
    kind = tool.get("type") if isinstance(tool, dict) else None
    return isinstance(kind, str) and kind.startswith(_PROVIDER_TOOLS)


def _fetches(payload: dict[str, Any]) -> bool:
    """Does a message or input item, or a part of one, name content to fetch? (A few
    dict lookups an item: ~0.3 µs.)"""
    for items in (payload.get("messages"), payload.get("input")):
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and _holds_reference(item, 0):
                    return True
    return False


def _holds_reference(item: dict[str, Any], depth: int) -> bool:
    if _refers(item):
        return True
    return depth < 3 and any(_holds_reference(part, depth + 1) for part in _parts(item))


def _parts(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts an item or part holds: its ``content`` (a tool result's parts hold
    parts in turn); a Responses tool call's ``output`` (a function's parts, a computer
    call's screenshot); an Anthropic document's ``source`` of type ``content``."""
    held: list[Any] = []
    for name in ("content", "output"):
        value = item.get(name)
        if isinstance(value, list):
            held.extend(value)
        elif name == "output" and isinstance(value, dict):
            held.append(value)
    source = item.get("source")
    if isinstance(source, dict) and isinstance(source.get("content"), list):
        held.extend(source["content"])
    return [part for part in held if isinstance(part, dict)]


# Parts whose tokens their bytes do not bound: documents, by id, URL or inline (chat,
# the Responses API; Anthropic's are read by their source below).
_DOCUMENTS = ("input_file", "file")
# Image parts: chat, the Responses API (a computer call's screenshot too), Anthropic
# (counted by images()).
_IMAGES = ("image_url", "input_image", "image", "computer_screenshot")


def _refers(part: dict[str, Any]) -> bool:
    """One part whose input its bytes do not bound: content named by id or URL instead
    of held, or a document (an image is counted apart)."""
    kind = part.get("type")
    if kind in _DOCUMENTS or kind in ("item_reference", "container_upload"):
        return True
    if kind in _IMAGES:
        return False
    if kind == "reasoning":  # passed back by id: the provider reads it from its store
        return not part.get("encrypted_content")
    if part.get("role") == "assistant" and isinstance(part.get("audio"), dict):
        return bool(part["audio"].get("id"))  # chat: an earlier answer's audio, by id
    source = part.get("source")  # Anthropic: documents, inline or not
    if not isinstance(source, dict):
        return False
    if source.get("type") in ("url", "file"):
        return True
    return kind == "document" and source.get("type") not in ("text", "content")


def images(payload: dict[str, Any]) -> int:
    """How many images the messages (or input items) hold or name, in their parts at
    any depth :func:`_parts` reads (a tool result's, a tool call's output...)."""
    return sum(
        _images_in(item, 0)
        for items in (payload.get("messages"), payload.get("input"))
        if isinstance(items, list)
        for item in items
        if isinstance(item, dict)
    )


def _images_in(item: dict[str, Any], depth: int) -> int:
    if item.get("type") in _IMAGES:
        return 1
    return sum(_images_in(part, depth + 1) for part in _parts(item)) if depth < 3 else 0
