"""The body fields llmtap reads as well as forwards, checked before a call goes.

llmtap forwards a body as it came, but some of its fields it also reads (``stream``:
how to read the answer) or rewrites (``stream_options``: asking a stream for its
usage). A value of the wrong type there would be read wrong (a ``"stream": "true"``
that a lenient provider streams, recorded as no stream and its usage lost) or silently
mended (a call that would fail sent direct succeeding through llmtap), so it is refused
as OpenAI and Anthropic refuse it: a 400 naming the field, before the provider is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Malformed:
    """Why a body is refused: the field (``param``), the message, what the call is
    recorded as (``error_class``) and the error's ``code``, in OpenAI's words."""

    param: str
    message: str
    error_class: str
    code: str


def json_type(value: Any) -> str:
    """How JSON names the type of a parsed value, as OpenAI's errors do."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def wrong_type(param: str, expected: str, value: Any, error_class: str) -> Malformed:
    return Malformed(
        param,
        f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead.",
        error_class,
        "invalid_type",
    )


def stream_malformed(payload: dict[str, Any]) -> Malformed | None:
    """``stream`` is a boolean, or absent (null: absent, no stream). Read on every
    metered route: whether the answer is an event stream, whose usage comes last."""
    stream = payload.get("stream")
    if stream is None or isinstance(stream, bool):
        return None
    return wrong_type("stream", "a boolean", stream, "invalid_stream")


def stream_options_malformed(payload: dict[str, Any]) -> Malformed | None:
    """``stream_options`` is an object whose ``include_usage`` is a boolean, or either
    is absent (null: absent). Read where llmtap asks a stream for its usage (Chat
    Completions, Completions: ``ask_for_usage``), which would replace a malformed one."""
    options = payload.get("stream_options")
    if options is None:
        return None
    if not isinstance(options, dict):
        return wrong_type("stream_options", "an object", options, "invalid_stream_options")
    include_usage = options.get("include_usage")
    if include_usage is None or isinstance(include_usage, bool):
        return None
    return wrong_type(
        "stream_options.include_usage", "a boolean", include_usage, "invalid_stream_options"
    )
