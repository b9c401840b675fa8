"""The body fields llmtap reads as well as forwards, checked before a call goes.

llmtap forwards a body as it came, but some of its fields it also reads (``stream``:
how to read the answer) or rewrites (``stream_options``: asking a stream for its
usage). A value of the wrong type there would be read wrong (a ``"stream": "true"``
that a lenient provider streams, recorded as no stream and its usage lost) or silently
mended (a call that would fail sent direct succeeding through llmtap), so it is refused
as OpenAI and Anthropic refuse it: a 400 naming the field, before the provider is asked.

Some it copies into the call's events: ``model`` and a body's ``user`` (the call's user,
when its key and headers name none). Each is bounded, so that no body makes an event
larger than the broker takes (1 MiB: such an event was dropped, the call never
recorded, while the body may hold 32): ``model`` to :data:`MAX_MODEL_CHARS`, ``user`` to
:data:`MAX_USER_CHARS`. A call refused so is recorded with its model cut to the bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Model ids are short: OpenAI's, fine-tuned ones included (ft:<base>:<org>:<suffix>:<id>),
# under 100 characters, OpenRouter's (vendor/name:variant) under 80, a Hugging Face
# repo id (org/name) under 200. The longest a provider documents are Amazon Bedrock's
# ARNs: a custom model's reaches about 330 characters by AWS's pattern. 512 leaves
# room for those and a <provider>/ prefix.
MAX_MODEL_CHARS = 512
# An end user's id: Anthropic bounds its metadata.user_id to 256 characters, OpenAI
# takes less; an email address is at most 254.
MAX_USER_CHARS = 256


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


def not_an_object(value: Any) -> str:
    """Why a body that parsed as JSON is refused: it is not an object (an array, a
    string, a number, null); said apart from one that does not parse."""
    return f"Invalid request body: expected a JSON object, but got {json_type(value)} instead."


def model_wrong_type(model: Any) -> Malformed | None:
    """A ``model`` named (not absent, null nor empty: none named) of a type other than
    a string, refused naming its type, not as if none were named."""
    if model is None or isinstance(model, str):
        return None
    return wrong_type("model", "a string", model, "invalid_model")


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


def background_refused(payload: dict[str, Any]) -> Malformed | None:
    """A Responses call run in the background (``background: true``) answers at once,
    queued, with no usage: what it generates is read later from the stored response,
    which llmtap does not pass (one provider account holds every tenant's), and its
    tokens would never be metered nor held against a cap or a rate limit. Refused, as
    OpenAI refuses a parameter it does not support; a long run can stream instead."""
    if payload.get("background") is not True:
        return None
    return Malformed(
        "background",
        "background responses are not supported through llmtap: their usage is never "
        "reported to it, and the stored response they are read from is not passed; send "
        "the call without background (stream it for a long run)",
        "background_unsupported",
        "unsupported_parameter",
    )


def too_long(param: str, value: str, most: int, error_class: str) -> Malformed | None:
    """A string longer than ``most`` characters, refused as OpenAI refuses one."""
    if len(value) <= most:
        return None
    return Malformed(
        param,
        f"Invalid '{param}': string too long. Expected a string with maximum length "
        f"{most}, but got a string with length {len(value)} instead.",
        error_class,
        "string_above_max_length",
    )


def model_too_long(model: str) -> Malformed | None:
    return too_long("model", model, MAX_MODEL_CHARS, "model_too_long")


def recorded_model(model: str) -> str:
    """A model as a call's events hold it: cut to the bound (a call refused for a
    longer one is recorded with its start)."""
    return model[:MAX_MODEL_CHARS]


def user_too_long(payload: dict[str, Any]) -> Malformed | None:
    """A body's ``user`` longer than the bound, whether or not the call's user is it."""
    user = payload.get("user")
    return (
        too_long("user", user, MAX_USER_CHARS, "user_too_long") if isinstance(user, str) else None
    )
