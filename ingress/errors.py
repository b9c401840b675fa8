"""Errors in the caller's own protocol: the JSON shape its provider SDK understands."""

from __future__ import annotations

from typing import Protocol

import orjson
from aiohttp import web


class ErrorShape(Protocol):
    """An error response in one provider's protocol."""

    def __call__(
        self,
        status: int,
        message: str,
        *,
        openai_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response: ...


def openai_error(
    status: int,
    message: str,
    *,
    openai_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error shaped like OpenAI's: ``{"error": {"message", "type", "param", "code"}}``;
    ``openai_type`` where the status alone does not say it (a 429's ``requests``,
    ``tokens`` or ``insufficient_quota``, as OpenAI's own)."""
    kind = openai_type or ("invalid_request_error" if status < 500 else "api_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


# Anthropic's error types by status (docs.anthropic.com/en/api/errors). Its
# invalid_request_error also stands for the 4xx it lists no type of (405, 415 here);
# api_error is its type for another server error, never for the client's own.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",  # a provider that did not answer in time
    529: "overloaded_error",
}


def anthropic_error(
    status: int,
    message: str,
    *,
    openai_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error shaped like Anthropic's: ``{"type": "error", "error": {"type", "message"}}``.

    Anthropic's shape has no ``param``/``code``; a named parameter goes in the message.
    Its types go by status alone (a 429 is a ``rate_limit_error`` whatever the limit).
    """
    del code, openai_type
    if param and param not in message:
        message = f"{param}: {message}"
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )
