"""What a provider's usage object says, normalised to the contract's :class:`Usage`
(OpenAI's and Anthropic's shapes, the Responses API's search items). Pure functions;
``capture.py`` finds these objects in what the provider sent. A count no call can have
is refused (:class:`ImpossibleCount`): the call's usage is then unknown."""

from __future__ import annotations

import re
from typing import Any, TypeGuard

from llmtap.events import (
    GEO_PATTERN,
    GLOBAL_GEO,
    STANDARD_TIER,
    TIER_PATTERN,
    UINT32_MAX,
    AdvisorUsage,
    ServiceTier,
    Usage,
)

# The counts of an OpenAI usage object besides its total, by either API's names.
_COUNTS = ("prompt_tokens", "input_tokens", "completion_tokens", "output_tokens")
# Those of an Anthropic usage object (its cache writes' split is in cache_creation).
_ANTHROPIC_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)
_ANTHROPIC_SPLIT = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")


class ImpossibleCount(ValueError):
    """A usage count no call can have: below zero, or past what the store's ``calls``
    holds (:data:`~llmtap.events.UINT32_MAX`; some OpenAI-compatible servers send -1 as
    an unsigned 64-bit number, 2^64-1), read or normalised (a sum of counts). It is no
    count: the call's usage is unknown (``usage_missing``), never priced at it. Says
    ``field=value``."""

    def __init__(self, field: str, value: int) -> None:
        super().__init__(f"{field}={value}")


def openai_usage(usage: Any) -> Usage | None:
    """Normalise an OpenAI ``usage`` object (chat completions / completions / embeddings,
    the Responses API's). Its prompt count includes cache reads (``cached_tokens``) and,
    from GPT-5.6 on, cache writes (``cache_write_tokens``, billed above the input rate;
    before GPT-5.6 writes were free and not reported), as llmtap's does. The writes are
    split by retention in ``cache_write_tokens_details`` (``ttl_30m_tokens``,
    ``ttl_12h_tokens``): the 12-hour part, priced higher, is kept as the longer-lived
    writes (``cache_creation_1h_input_tokens``); when only the split is reported, the
    writes are its sum. A usage that counts only its ``total_tokens`` (embeddings) is
    all input. One that counts nothing (empty, or its counts null) is no usage: None."""
    if not isinstance(usage, dict) or not any(
        is_count(usage.get(key)) for key in (*_COUNTS, "total_tokens")
    ):
        return None
    prompt = _count(usage, "prompt_tokens" if "prompt_tokens" in usage else "input_tokens")
    completion = _count(
        usage, "completion_tokens" if "completion_tokens" in usage else "output_tokens"
    )
    total = _count(usage, "total_tokens")
    if not any(key in usage for key in _COUNTS):
        # A total alone (Voyage's embeddings, some OpenAI-compatible servers'): an
        # embedding has no output, so all of it is input.
        prompt = total
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get(
        "output_tokens_details"
    )
    details = prompt_details if isinstance(prompt_details, dict) else {}
    cached = _count(details, "cached_tokens")
    if not cached:  # DeepSeek names its cache reads apart
        cached = _count(usage, "prompt_cache_hit_tokens")
    cached = min(cached, prompt)
    by_ttl = details.get("cache_write_tokens_details")
    by_ttl = by_ttl if isinstance(by_ttl, dict) else {}
    written_12h = _count(by_ttl, "ttl_12h_tokens")
    written = _count(details, "cache_write_tokens") or written_12h + _count(
        by_ttl, "ttl_30m_tokens"
    )
    written = min(written, prompt - cached)
    reasoning = (
        _count(completion_details, "reasoning_tokens")
        if isinstance(completion_details, dict)
        else 0
    )
    if reasoning and (reasoning > completion or total == prompt + completion + reasoning):
        # Counted apart from the completion (xAI's; total_tokens holds both), not within
        # it as OpenAI's is: output all the same, billed as such.
        completion += reasoning
    elif (
        not reasoning
        and total > prompt + completion
        and ("completion_tokens" in usage or "output_tokens" in usage)
    ):
        # Thinking counted in total_tokens alone (Gemini's OpenAI-compatible endpoint:
        # completion_tokens is the visible answer, no reasoning_tokens): output, billed
        # as such by the provider.
        reasoning = total - prompt - completion
        completion += reasoning
    return Usage(
        input_tokens=prompt,
        output_tokens=_within("output_tokens", completion),
        cached_input_tokens=cached,
        cache_creation_input_tokens=written,
        cache_creation_1h_input_tokens=min(written_12h, written),
        reasoning_tokens=min(reasoning, completion),
    )


_TIER = re.compile(TIER_PATTERN)
# OpenAI's names of its standard tier as an answer says them: "default", Scale Tier's
# "scale" (its prepaid units, valued at standard rates), "auto" (a request's value, not
# a served tier).
_STANDARD_NAMES = frozenset({STANDARD_TIER, "default", "scale", "auto"})
# A tier named as no tier can be (not a name): kept as a tier no price covers.
UNNAMED_TIER = "unknown"


def served_tier(value: Any) -> ServiceTier:
    """The tier an OpenAI answer's ``service_tier`` says served the call: ``"flex"``,
    ``"priority"`` and ``"ultrafast"`` as said, ``"fast"`` as priority (OpenAI renamed
    Priority processing Fast mode on 2026-07-30, one tier by either name); ``"default"``,
    ``"scale"`` (Scale Tier's prepaid units, valued at standard rates), ``"auto"`` or
    none: standard. Any other tier is kept as named (``"unknown"`` when not a name), so
    that pricing finds no price for it rather than guessing at the standard rates."""
    if value is None:
        return STANDARD_TIER
    tier = value.strip().casefold() if isinstance(value, str) else ""
    if tier in _STANDARD_NAMES:
        return STANDARD_TIER
    if tier == "fast":
        return "priority"
    return tier if _TIER.fullmatch(tier) else UNNAMED_TIER


def with_tier(usage: Usage, tier: ServiceTier) -> Usage:
    """``usage`` served at ``tier`` (a copy only when it is not standard)."""
    return usage.model_copy(update={"service_tier": tier}) if tier != STANDARD_TIER else usage


def anthropic_usage(usage: Any, model: str = "") -> Usage | None:
    """Normalise an Anthropic ``usage`` object.

    Anthropic's ``input_tokens`` excludes cache reads and cache writes; llmtap's
    includes both (see :class:`llmtap.events.Usage`), so they are added back. The
    writes are split by lifetime in ``cache_creation`` (``ephemeral_5m_input_tokens``,
    ``ephemeral_1h_input_tokens``): the one-hour part is kept, as it is priced higher.
    When only the split is reported, the writes are its sum. ``speed`` is the speed
    that served the call (fast mode's ``"fast"``, billed at its premium rates; a call
    that asked for it may be served at ``"standard"``); any other value, or none, is
    standard. The calls of the advisor tool are its ``iterations`` of type
    ``advisor_message``, each with its model, and are not in the top-level counts
    (:func:`advisor_usage`); nor are those of threshold compaction (``compaction``
    iterations, run at the call's ``model``), kept with them to be priced as calls of
    their own. ``inference_geo`` is where the call's inference ran (:func:`inference_geo`).
    One that counts no tokens (empty, or its counts null) is no usage: None.
    """
    if not isinstance(usage, dict) or not _anthropic_counts(usage):
        return None
    return _anthropic_tokens(usage, model)


def _anthropic_counts(usage: dict[str, Any]) -> bool:
    """Whether an Anthropic usage object counts any tokens (not all absent or null)."""
    split = usage.get("cache_creation")
    return any(is_count(usage.get(key)) for key in _ANTHROPIC_COUNTS) or (
        isinstance(split, dict) and any(is_count(split.get(key)) for key in _ANTHROPIC_SPLIT)
    )


def _anthropic_tokens(usage: dict[str, Any], model: str = "") -> Usage:
    """:func:`anthropic_usage` of a usage object, counted or not (absent counts zero)."""
    uncached = _count(usage, "input_tokens")
    read = _count(usage, "cache_read_input_tokens")
    split = usage.get("cache_creation")
    split = split if isinstance(split, dict) else {}
    written_5m = _count(split, "ephemeral_5m_input_tokens")
    written_1h = _count(split, "ephemeral_1h_input_tokens")
    written = _count(usage, "cache_creation_input_tokens") or written_5m + written_1h
    server_tools = usage.get("server_tool_use")
    searches = _count(server_tools, "web_search_requests") if isinstance(server_tools, dict) else 0
    return Usage(
        input_tokens=_within("input_tokens", uncached + read + written),
        output_tokens=_count(usage, "output_tokens"),
        cached_input_tokens=read,
        cache_creation_input_tokens=written,
        cache_creation_1h_input_tokens=min(written_1h, written),
        web_search_requests=searches,
        speed="fast" if usage.get("speed") == "fast" else "standard",
        advisor=advisor_usage(usage.get("iterations"), model),
        inference_geo=inference_geo(usage.get("inference_geo")),
    )


_GEO = re.compile(GEO_PATTERN)
# Said when no geography can be told (a model that takes no inference_geo): billed as
# "global" is, at standard rates.
_NO_GEO = frozenset({GLOBAL_GEO, "not_available"})


def inference_geo(value: Any) -> str:
    """Where Anthropic ran a call's inference, from its usage's ``inference_geo``:
    ``"us"`` (US-only, billed at a premium), ``"global"``, or another geography's name,
    kept as told so that pricing can refuse to guess at it. None, ``"not_available"``
    and anything that is not a geography's name are ``"global"``."""
    if not isinstance(value, str):
        return GLOBAL_GEO
    geo = value.strip().casefold()
    return geo if geo not in _NO_GEO and _GEO.fullmatch(geo) else GLOBAL_GEO


def advisor_usage(iterations: Any, called: str = "") -> tuple[AdvisorUsage, ...]:
    """The sub-inferences in an Anthropic usage's ``iterations`` left out of its
    top-level counts: each entry of type ``advisor_message`` (the advisor tool's, of the
    tool's ``model``, billed at its rates) or ``compaction`` (threshold compaction's
    summary, run at the ``called`` model and billed at its rates), its tokens
    normalised as :func:`anthropic_usage` does the call's. The executor's own
    ``message`` iterations are not (already in the top-level counts)."""
    if not isinstance(iterations, list):
        return ()
    found = []
    for entry in iterations:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "advisor_message":
            model = entry.get("model")
        elif kind == "compaction":
            model = called
        else:
            continue
        # One that counts nothing counts zero: the call's own counts are told.
        tokens = _anthropic_tokens({k: v for k, v in entry.items() if k != "iterations"})
        found.append(
            AdvisorUsage(
                model=model if isinstance(model, str) else "",
                input_tokens=tokens.input_tokens,
                output_tokens=tokens.output_tokens,
                cached_input_tokens=tokens.cached_input_tokens,
                cache_creation_input_tokens=tokens.cache_creation_input_tokens,
                cache_creation_1h_input_tokens=tokens.cache_creation_1h_input_tokens,
            )
        )
    return tuple(found)


def with_searches(usage: Usage, response: dict[str, Any], streamed: int = 0) -> Usage:
    """``usage`` with the web searches a Responses API ``response`` ran: each
    ``web_search_call`` item of its ``output`` whose action is a search (not opening or
    reading a page; an item without an action is a search too). Its usage does not
    count them. A stream's final response may come with its ``output`` left empty (some
    upstreams send the items only as they stream): then the ``streamed`` count."""
    output = response.get("output")
    if isinstance(output, list) and output:
        searches = sum(1 for item in output if is_search(item))
    else:
        searches = streamed
    return usage.model_copy(update={"web_search_requests": searches}) if searches else usage


def by_preview(usage: Usage) -> Usage:
    """``usage`` with its web searches counted as run by the Responses API's older
    ``web_search_preview`` tool (the call's only web search tool), priced apart."""
    searches = usage.web_search_requests
    if not searches or usage.web_search_preview_requests == searches:
        return usage
    return usage.model_copy(update={"web_search_preview_requests": searches})


def is_search(item: Any) -> bool:
    """A Responses API output item that is a web search (not opening or reading a page)."""
    if not isinstance(item, dict) or item.get("type") != "web_search_call":
        return False
    action = item.get("action")
    return not isinstance(action, dict) or action.get("type", "search") == "search"


def is_count(value: Any) -> TypeGuard[int]:
    """Whether a usage's value is a count (an integer: not absent, null, a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _count(source: dict[str, Any], field: str) -> int:
    """The count ``source`` holds at ``field``: 0 if none (absent, null, not an integer),
    :class:`ImpossibleCount` if it is one no call can have."""
    value = source.get(field)
    if not is_count(value):
        return 0
    return _within(field, value)


def _within(field: str, count: int) -> int:
    if not 0 <= count <= UINT32_MAX:
        raise ImpossibleCount(field, count)
    return count
