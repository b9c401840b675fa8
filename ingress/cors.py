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
CDN's) must not give it to a page of another origin."""

from __future__ import annotations

from functools import partial

import aiohttp_cors
from aiohttp import web

PREFLIGHT_MAX_AGE_S = 600  # how long a browser may keep a preflight's answer
# The routes a page may call: the providers' APIs, not /healthz, /readyz or /metrics.
API_PREFIX = "/v1/"


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


async def _vary_by_origin(
    resources: frozenset[web.AbstractResource],
    request: web.Request,
    response: web.StreamResponse,
) -> None:
    """``Vary: Origin`` on each answer of ``resources`` (with or without an ``Origin``:
    one without CORS headers must not be reused for a page either), beside the
    provider's ``Vary``."""
    if request.match_info.route.resource not in resources:
        return
    said = {
        name.strip().lower()
        for value in response.headers.getall("Vary", ())
        for name in value.split(",")
    }
    if not said & {"origin", "*"}:
        response.headers.add("Vary", "Origin")
