"""Routes passed through and not metered: what a client asks a provider about calls
without making one, all free: the models it serves (``GET /v1/models``, of either API),
how many tokens a prompt is (Anthropic's ``POST /v1/messages/count_tokens``, the
Responses API's ``POST /v1/responses/input_tokens``), and a moderation
(``POST /v1/moderations``).

An SDK switched to llmtap's URL asks these too, and would fail on a 404. Each wants a
key as every route does, and goes out with llmtap's provider key (a virtual key never
reaches a provider). A body naming a model goes to the provider that serves it, as a
metered call would (the model allowed to the key, its name rewritten for a
``<provider>/<model>`` route); one naming none to the provider named like the API.
Nothing is published: no tokens are generated, nothing is billed; refusals are answered
and not recorded. Not counted against a key's rate limits: the providers limit these
apart from calls. The endpoints that list, read or change what the provider account
stores (files, batches, stored responses, vector stores) are not passed: every tenant's
calls share that account. (A body may still name a stored object by its id, as a
metered call's may: llmtap does not track which tenant made which.)
"""

from __future__ import annotations

import uuid
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from ingress.forward import resend
from ingress.forward.admission import BodyRefused, read_body, why_not_an_object
from ingress.forward.call import downstream_headers, upstream_headers
from ingress.forward.capture import parse_json_body
from ingress.forward.endpoint import Api, provider_url, redirected, unreachable, upstream_credential
from ingress.forward.proxy import Handler, whole_body
from ingress.guards.auth import Identity, Refusal, authenticated, check_model
from ingress.keys import KEYS, SETTINGS
from ingress.routing import NoRoute, resolve
from llmtap.config_sections import ProviderConfig


class _Refused(Exception):
    """Answer the caller with this error, without asking the provider."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def by(cls, refusal: Refusal, param: str | None = None) -> _Refused:
        return cls(
            refusal.status,
            refusal.message,
            refusal.code or refusal.error_class,
            param or refusal.param,
        )


NOT_LOOKED_UP = (
    "llmtap looks one model up by a name without '/' or '..': '{model}' is not asked of "
    "the provider (GET /v1/models lists them all)"
)


def models(openai: Api, anthropic: Api) -> Handler:
    """``GET /v1/models`` and ``GET /v1/models/{model}``: both APIs have them, at the same
    path. Anthropic's SDK sends ``anthropic-version`` (as every Anthropic call must):
    asked so, they come from the Anthropic provider, else from the OpenAI one. One model
    is asked by a name of one path segment, sent encoded: a decoded "/" or ".." would
    take the provider's key to any other endpoint of it."""

    async def handle(request: web.Request) -> web.StreamResponse:
        api, path = (
            (anthropic, "/v1/models")
            if "anthropic-version" in request.headers
            else (openai, "/models")  # the OpenAI base URL ends in /v1
        )
        asked: str | _Refused = path
        if "model" in request.match_info:
            model = request.match_info["model"]
            if "/" in model or model in (".", ".."):
                asked = _Refused(404, NOT_LOOKED_UP.format(model=model), "model_not_found")
            else:
                asked = path + "/" + quote(model, safe=":")
        return await _passed(request, api, asked, read_body=False)

    return handle


def counted(api: Api, path: str) -> Handler:
    """A ``POST`` whose JSON body names the model it is about (or none): ``path`` on the
    provider serving that model."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _passed(request, api, path, read_body=True)

    return handle


async def _passed(
    request: web.Request, api: Api, path: str | _Refused, *, read_body: bool
) -> web.StreamResponse:
    """Forward the request to ``path`` of its provider, or answer why not (``path`` may
    be that answer, given once the caller is known to hold a key)."""
    request_id = str(uuid.uuid4())
    settings = request.app[SETTINGS]
    try:
        try:
            identity = await authenticated(request.headers, settings, request.app[KEYS])
        except Refusal as refusal:
            raise _Refused.by(refusal) from None
        if isinstance(path, _Refused):
            raise path
        body, name = b"", str(api.kind)
        provider = settings.providers_by_name[api.kind]
        if read_body:
            body, name, provider = await _routed_body(request, api, identity)
        try:
            credential = upstream_credential(api, name, provider, identity)
        except Refusal as refusal:
            raise _Refused.by(refusal) from None
    except _Refused as refused:
        return _answer_refused(api, refused, request_id)
    url = provider_url(provider.base_url, path, request.rel_url.raw_query_string)
    headers = upstream_headers(request.headers, credential=credential)
    head = request.method == "HEAD"  # aiohttp answers HEAD on a GET route (the models)
    if head:  # its length as a GET's answer is sent (decoded): of the list unencoded
        headers["Accept-Encoding"] = "identity"
    try:
        # Not followed if redirected, as a metered call's; sent again if it lost the
        # keep-alive race (resend.py).
        upstream = await resend.request(
            request.app, name, request.method, URL(url), body if read_body else None, headers
        )
        async with upstream:
            answer = await whole_body(upstream)
            headers = downstream_headers(upstream.headers, request_id)
            redirect = redirected(api, name, upstream.status, headers)
            if redirect is not None:
                return redirect
            length = upstream.headers.get("Content-Length")
            if head and length is not None and "Content-Encoding" not in upstream.headers:
                # Of the body a GET gets: dropped with the hop-by-hop headers, the
                # client was told none (aiohttp sends a HEAD's as it is set).
                headers["Content-Length"] = length
            return web.Response(status=upstream.status, body=answer, headers=headers)
    except ValueError as exc:  # a URL the client library will not send (a control character)
        return _answer_refused(
            api, _Refused(400, f"invalid request URL: {exc}", "invalid_request_url"), request_id
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return unreachable(api, name, exc, request_id)


async def _routed_body(
    request: web.Request, api: Api, identity: Identity
) -> tuple[bytes, str, ProviderConfig]:
    """The body to send, and the provider (its name and config) that serves its model."""
    settings = request.app[SETTINGS]
    try:
        body = await read_body(request)
    except BodyRefused as bad:
        raise _Refused(bad.status, bad.message, bad.error_class) from None
    payload = parse_json_body(body)
    if payload is None:
        raise _Refused(400, why_not_an_object(body), "invalid_json")
    model = payload.get("model")
    if model is None:
        if identity.key is not None and identity.key.allowed_models:
            # The provider would pick one: a key that may use only some must name it.
            raise _Refused(
                400, "this key may use only some models: name one in model", "missing_model",
                "model",
            )  # fmt: skip
        return body, api.kind, settings.providers_by_name[api.kind]
    if not isinstance(model, str) or not model:
        raise _Refused(400, "model must be a non-empty string", "invalid_model", "model")
    try:
        check_model(identity, model)
        route = resolve(model, api.kind, settings)
    except Refusal as refusal:
        raise _Refused.by(refusal, "model") from None
    except NoRoute as exc:  # NoModel: "openai/", an empty model
        raise _Refused(400, str(exc), exc.error_class, "model") from None
    if route.upstream_model != model:
        payload["model"] = route.upstream_model
        body = orjson.dumps(payload)
    return body, route.provider, route.config


def _answer_refused(api: Api, refused: _Refused, request_id: str) -> web.Response:
    response = api.error(refused.status, refused.message, param=refused.param, code=refused.code)
    response.headers["x-request-id"] = request_id
    if refused.code == "no_provider_key":  # llmtap's config: no retry mends it
        response.headers["x-should-retry"] = "false"
    return response
