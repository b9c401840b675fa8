"""Calls from a web page (CORS) for the origins ``cors_origins`` names, by aiohttp-cors.

A browser asks before a call with a key in its headers (a preflight, ``OPTIONS``): llmtap
answers it itself; it is no call, nothing is forwarded or recorded. Each answer to an
allowed origin's call then carries ``Access-Control-Allow-Origin`` and exposes its
headers (``x-request-id``, ``retry-after``, the provider's rate-limit headers) to the
page. A provider's own ``Access-Control-*`` headers are never passed on
(:func:`ingress.forward.call.downstream_headers`): they are its policy for its origin,
and llmtap is the origin the browser calls. No cookies: a page sends its key as the SDK
does, in a header. Each answer of those routes says ``Vary: Origin``: whether it
allows a page, and which, is the request's ``Origin``'s, so a cache (the browser's, a
CDN's) must not give it to a page of another origin.

llmtap's own errors under the API's prefix that no route answers (an unknown path, a
method a route does not take: ``ingress.app.provider_shaped_errors``) carry the same
headers, so a page reads why; a preflight to any path no route takes is no call either
(:func:`preflight`: answered, not recorded)."""

from __future__ import annotations

from functools import partial

import aiohttp_cors
from aiohttp import hdrs, web

from ingress.keys import SETTINGS

PREFLIGHT_MAX_AGE_S = 600  # how long a browser may keep a preflight's answer
# The routes a page may call: the providers' APIs, not /healthz, /readyz or /metrics.
API_PREFIX = "/v1/"
# What a page reads of any answer unexposed (the Fetch standard's safelisted headers).
_SAFELISTED = frozenset(
    ("cache-control", "content-language", "content-length", "content-type", "expires",
     "last-modified", "pragma")
)  # fmt: skip


def allow_origins(app: web.Application, origins: tuple[str, ...]) -> None:
    """Let pages of ``origins`` ("*": any) call the API routes of ``app``; with none,
    nothing changes (a preflight gets 405, as any method a route does not take)."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        expose_headers="*",
        allow_headers="*",
        allow_methods=["GET", "POST"],
        max_age=PREFLIGHT_MAX_AGE_S,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    resources: set[web.AbstractResource] = set()
    for route in list(app.router.routes()):
        if route.method != "HEAD" and route.resource is not None:
            if route.resource.canonical.startswith(API_PREFIX):
                cors.add(route)
                resources.add(route.resource)
    app.on_response_prepare.append(partial(_vary_by_origin, frozenset(resources)))
    app.on_response_prepare.append(partial(_unrouted, frozenset(origins)))


def preflight(request: web.Request) -> bool:
    """Whether ``request`` is a browser's preflight while pages may call (``cors_origins``
    set): a question before a call, no call of its own, whatever path it asks of."""
    return (
        bool(request.app[SETTINGS].cors_origins)
        and request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )


def _unrouted_api(request: web.Request) -> bool:
    """An API path's request no route answers (llmtap's 404 or 405)."""
    return request.match_info.http_exception is not None and request.path.startswith(API_PREFIX)


async def _unrouted(
    origins: frozenset[str], request: web.Request, response: web.StreamResponse
) -> None:
    """The CORS headers aiohttp-cors gives a route's answers, on llmtap's own answer to
    an API path's request no route takes: a page of an allowed origin reads the error,
    its ``x-request-id`` and ``Allow`` among its headers."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None or not (origin in origins or "*" in origins):
        return
    if not _unrouted_api(request) or preflight(request):  # a preflight fails, as it should
        return
    exposed = {name.lower() for name in response.headers} - _SAFELISTED
    response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ",".join(sorted(exposed))
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin


async def _vary_by_origin(
    resources: frozenset[web.AbstractResource],
    request: web.Request,
    response: web.StreamResponse,
) -> None:
    """``Vary: Origin`` on each answer of ``resources`` and of the API paths no route
    takes (with or without an ``Origin``: one without CORS headers must not be reused
    for a page either), beside the provider's ``Vary``."""
    if request.match_info.route.resource not in resources and not _unrouted_api(request):
        return
    said = {
        name.strip().lower()
        for value in response.headers.getall("Vary", ())
        for name in value.split(",")
    }
    if not said & {"origin", "*"}:
        response.headers.add("Vary", "Origin")
