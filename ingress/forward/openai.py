"""OpenAI-compatible routes: the API spoken by OpenAI and every OpenAI-compatible provider."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from yarl import URL

from ingress.errors import openai_error
from ingress.forward.call import downstream_headers, upstream_headers
from ingress.forward.capture import OpenAIJsonCapture, OpenAIStreamCapture
from ingress.forward.endpoint import Api, Endpoint, upstream_credential
from ingress.forward.proxy import metered
from ingress.guards.auth import Refusal, authenticate
from ingress.keys import KEYS, SETTINGS, UPSTREAM

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
COMPLETIONS = Endpoint(
    "completions", OPENAI, "/completions", prepare=ask_for_usage, batched="prompt"
)
EMBEDDINGS = Endpoint("embeddings", OPENAI, "/embeddings", batched="input")
# The Responses API reports usage in its response.completed event, unasked.
RESPONSES = Endpoint("responses", OPENAI, "/responses")


async def models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: passed through to the OpenAI provider, not metered, for a caller
    with a key as any other route (its key never reaches the provider)."""
    settings = request.app[SETTINGS]
    request_id = str(uuid.uuid4())

    def refused(status: int, message: str, code: str) -> web.Response:
        response = openai_error(status, message, code=code)
        response.headers["x-request-id"] = request_id
        return response

    provider = settings.all_providers()["openai"]
    try:
        identity = authenticate(request.headers, settings, request.app[KEYS])
        credential = upstream_credential(OPENAI, "openai", provider, identity)
    except Refusal as refusal:
        return refused(refusal.status, refusal.message, refusal.code or refusal.error_class)
    # One model, by a name of one path segment, sent encoded: a decoded "/" or ".." would
    # take the provider's key to any other endpoint of it (files, stored responses).
    path = "/models"
    if "model" in request.match_info:
        model = request.match_info["model"]
        if "/" in model or model in (".", ".."):
            return refused(404, f"The model '{model}' does not exist", "model_not_found")
        path += "/" + quote(model, safe=":")
    headers = upstream_headers(request.headers, credential=credential)
    try:
        async with request.app[UPSTREAM].get(
            URL(provider.base_url.rstrip("/") + path, encoded=True), headers=headers
        ) as upstream:
            body = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=body,
                headers=downstream_headers(upstream.headers, request_id),
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        timed_out = isinstance(exc, TimeoutError)
        return refused(
            504 if timed_out else 502,
            f"llmtap could not reach the provider 'openai' ({type(exc).__name__})",
            "upstream_timeout" if timed_out else "upstream_unreachable",
        )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", metered(CHAT))
    app.router.add_post("/v1/completions", metered(COMPLETIONS))
    app.router.add_post("/v1/embeddings", metered(EMBEDDINGS))
    app.router.add_post("/v1/responses", metered(RESPONSES))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", models)
