"""The ingress app factory: routes, and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from ingress.errors import openai_error
from ingress.forward import anthropic, openai
from ingress.guards.keys import KeyStore
from ingress.keys import KEYS, PUBLISHER, SETTINGS, UPSTREAM
from ingress.publisher import EventPublisher
from llmtap.config import Settings

MAX_BODY_BYTES = 32 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.upstream_connect_timeout_s,
        sock_read=settings.upstream_read_timeout_s,
    )
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, auto_decompress=True, raise_for_status=False
    ) as session:
        app[UPSTREAM] = session
        yield


async def event_publisher(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    publisher = EventPublisher(settings.kafka_bootstrap, queue_size=settings.publish_queue_size)
    app[PUBLISHER] = publisher
    await publisher.start()
    yield
    await publisher.stop()


KEY_RELOAD_S = 1.0


async def key_store(app: web.Application) -> AsyncIterator[None]:
    """Virtual keys, re-read whenever the key file changes."""
    keys = app[KEYS] = KeyStore(app[SETTINGS].key_file)

    async def follow() -> None:
        while True:
            await asyncio.sleep(KEY_RELOAD_S)
            await asyncio.to_thread(keys.reload)

    task = asyncio.create_task(follow(), name="key-reload")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def provider_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routing errors in the OpenAI error shape, so SDKs show a clear message."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return openai_error(
            404, f"Unknown route: {request.method} {request.path}", code="unknown_url"
        )
    except web.HTTPMethodNotAllowed:
        return openai_error(
            405, f"Method {request.method} not allowed on {request.path}", code="method_not_allowed"
        )


async def healthz(request: web.Request) -> web.Response:
    publisher = request.app[PUBLISHER]
    return web.json_response(
        {
            "status": "ok",
            "broker_connected": publisher.connected,
            "events_backlog": publisher.backlog,
            "events_published": publisher.published,
            "events_dropped": publisher.dropped,
        }
    )


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[provider_shaped_errors])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(key_store)
    app.cleanup_ctx.append(upstream_session)
    app.cleanup_ctx.append(event_publisher)
    openai.add_routes(app)
    anthropic.add_routes(app)
    app.router.add_get("/healthz", healthz)
    return app


def run(settings: Settings) -> None:
    web.run_app(
        create_app(settings),
        host=settings.proxy_host,
        port=settings.proxy_port,
        access_log=None,
        print=None,
    )
