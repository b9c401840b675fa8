"""Anthropic's Messages API: /v1/messages, stream and non-stream, and its free token count."""

from __future__ import annotations

from aiohttp import web

from ingress.errors import anthropic_error
from ingress.forward import unmetered
from ingress.forward.capture import AnthropicJsonCapture, AnthropicStreamCapture
from ingress.forward.endpoint import Api, Endpoint
from ingress.forward.proxy import metered
from ingress.forward.tool_tokens import added_tokens

ANTHROPIC = Api(
    kind="anthropic",
    error=anthropic_error,
    json_capture=AnthropicJsonCapture,
    stream_capture=lambda _strip: AnthropicStreamCapture(),
    credential_header="x-api-key",
    credential_prefix="",
)

# Usage arrives unasked (message_start, message_delta): nothing to prepare. A call with
# tools is billed a tool-use system prompt and Anthropic's tools' definitions on top of
# its body: a hard cap's worst case counts them (tool_tokens.py).
# Its first token is its first content block's: message_start (and a ping) come as the
# call is taken, before the model generates anything.
MESSAGES = Endpoint(
    "messages",
    ANTHROPIC,
    "/v1/messages",
    added_tokens=added_tokens,
    preamble=frozenset((b"message_start", b"ping")),
)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", metered(MESSAGES))
    # Free, not metered (unmetered.py):
    app.router.add_post(
        "/v1/messages/count_tokens", unmetered.counted(ANTHROPIC, "/v1/messages/count_tokens")
    )
