"""OpenAI-compatible routes: the API spoken by OpenAI and every OpenAI-compatible provider."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from ingress.errors import openai_error
from ingress.forward.call import downstream_headers, upstream_headers
from ingress.forward.proxy import Api, Endpoint, credential_for, metered
from ingress.forward.usage import OpenAIJsonCapture, OpenAIStreamCapture
from ingress.keys import SETTINGS, UPSTREAM

OPENAI = Api(
    kind="openai",
    error=openai_error,
    json_capture=OpenAIJsonCapture,
    stream_capture=lambda strip: OpenAIStreamCapture(strip_usage_chunk=strip),
    credential_header="Authorization",
    credential_prefix="Bearer ",
)


def ask_for_usage(payload: dict[str, Any]) -> bool:
    """Ask for the final usage chunk if the client did not; True if we added it."""
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    payload["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return True


CHAT = Endpoint("chat.completions", OPENAI, "/chat/completions", prepare=ask_for_usage)
COMPLETIONS = Endpoint("completions", OPENAI, "/completions", prepare=ask_for_usage)
EMBEDDINGS = Endpoint("embeddings", OPENAI, "/embeddings")
# The Responses API reports usage in its response.completed event, unasked.
RESPONSES = Endpoint("responses", OPENAI, "/responses")


async def models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: passed through to the OpenAI provider, not metered."""
    provider = request.app[SETTINGS].all_providers()["openai"]
    headers = upstream_headers(request.headers, credential=credential_for(OPENAI, provider))
    async with request.app[UPSTREAM].get(
        provider.base_url + request.path.removeprefix("/v1"), headers=headers
    ) as upstream:
        body = await upstream.read()
        return web.Response(
            status=upstream.status,
            body=body,
            headers=downstream_headers(upstream.headers, str(uuid.uuid4())),
        )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", metered(CHAT))
    app.router.add_post("/v1/completions", metered(COMPLETIONS))
    app.router.add_post("/v1/embeddings", metered(EMBEDDINGS))
    app.router.add_post("/v1/responses", metered(RESPONSES))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", models)
