"""OpenAI-compatible routes: the API spoken by OpenAI and every OpenAI-compatible provider."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ingress.errors import openai_error
from ingress.forward import unmetered
from ingress.forward.capture import (
    OpenAIJsonCapture,
    OpenAIStreamCapture,
    chat_output,
    responses_output,
)
from ingress.forward.endpoint import Api, Endpoint
from ingress.forward.proxy import metered
from ingress.guards.fields import background_refused, stream_options_malformed

OPENAI = Api(
    kind="openai",
    error=openai_error,
    json_capture=OpenAIJsonCapture,
    stream_capture=lambda strip: OpenAIStreamCapture(strip_usage_chunk=strip),
    credential_header="Authorization",
    credential_prefix="Bearer ",
)


def ask_for_usage(payload: dict[str, Any]) -> bool:
    """Ask for the final usage chunk if the client did not; True if we added it. A
    malformed ``stream_options`` was refused before (stream_options_malformed)."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    payload["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return True


CHAT = Endpoint(
    "chat.completions",
    OPENAI,
    "/chat/completions",
    prepare=ask_for_usage,
    checked_fields=stream_options_malformed,
    output=chat_output,
)
COMPLETIONS = Endpoint(
    "completions",
    OPENAI,
    "/completions",
    prepare=ask_for_usage,
    checked_fields=stream_options_malformed,
    batched="prompt",
    output=chat_output,
)
EMBEDDINGS = Endpoint("embeddings", OPENAI, "/embeddings", batched="input")
# The Responses API reports usage in its response.completed event, unasked.
RESPONSES = Endpoint(
    "responses",
    OPENAI,
    "/responses",
    checked_fields=background_refused,
    preamble=frozenset((b"response.created", b"response.queued", b"response.in_progress")),
    output=responses_output,
)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", metered(CHAT))
    app.router.add_post("/v1/completions", metered(COMPLETIONS))
    app.router.add_post("/v1/embeddings", metered(EMBEDDINGS))
    app.router.add_post("/v1/responses", metered(RESPONSES))
    # Free, not metered (unmetered.py; /v1/models, of both APIs, in app.py):
    app.router.add_post(
        "/v1/responses/input_tokens", unmetered.counted(OPENAI, "/responses/input_tokens")
    )
    app.router.add_post("/v1/moderations", unmetered.counted(OPENAI, "/moderations"))
