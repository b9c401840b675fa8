"""The ingress app factory: routes, and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from ingress.cors import allow_origins, preflight
from ingress.errors import anthropic_error, openai_error
from ingress.forward import anthropic, openai, resend, unmetered
from ingress.forward.call import NOBODY, Call
from ingress.forward.outcome import record_outcome
from ingress.forward.tokens import Counting
from ingress.guards.auth import Refusal, authenticate
from ingress.guards.book_topics import announce, follow, hear_others
from ingress.guards.budgets import BudgetBook
from ingress.guards.key_store import KeyStore
from ingress.guards.ratelimit import RateLimiter
from ingress.guards.reaping import Reaper, reap
from ingress.keys import (
    BUDGETS,
    COUNTING,
    GRACE_OVER,
    KEYS,
    LIMITER,
    METRICS,
    PUBLISHER,
    SETTINGS,
    STOPPING,
    UPSTREAM,
    UPSTREAM_FRESH,
)
from ingress.metrics import IngressMetrics
from ingress.publisher import EventPublisher
from llmtap.config import Settings
from llmtap.events import Attribution, Usage
from stream.catalog import load_catalog

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def token_counting(app: web.Application) -> AsyncIterator[None]:
    """Counts of broken-off streams' output tokens; those under way finish (and record
    their calls) before the publisher and the budget book close."""
    counting = app[COUNTING] = Counting()
    yield
    await counting.drain()


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    for provider, variable in settings.keys_unset().items():
        log.warning(
            "no API key for provider %s: %s is unset, so its calls with llmtap keys are "
            "refused (500, no_provider_key) until it is set where llmtap starts",
            provider,
            variable,
        )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.upstream_connect_timeout_s,
        sock_read=settings.upstream_read_timeout_s,
    )
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    # No cookie jar: the session serves every tenant's calls. A provider's Set-Cookie
    # goes to the client that made the call (which sends it back, or not); kept here,
    # it went with every later call, of any tenant.
    settings_of_both: dict[str, Any] = {
        "timeout": timeout,
        "auto_decompress": True,
        "raise_for_status": False,
        "cookie_jar": aiohttp.DummyCookieJar(),
    }
    async with (
        aiohttp.ClientSession(
            connector=connector, trace_configs=[resend.tracing()], **settings_of_both
        ) as session,
        resend.fresh_session(**settings_of_both) as fresh,
    ):
        app[UPSTREAM], app[UPSTREAM_FRESH] = session, fresh
        yield


async def event_publisher(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    publisher = EventPublisher(
        settings.kafka,
        queue_size=settings.publish_queue_size,
        spool_dir=settings.spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        topic_partitions=settings.topic_partitions,
        topic_replicas=settings.topic_replication_factor,
    )
    app[PUBLISHER] = publisher
    await publisher.start()
    yield
    await publisher.stop()


async def ingress_metrics(app: web.Application) -> AsyncIterator[None]:
    app[METRICS] = IngressMetrics(app[PUBLISHER])
    yield


async def budget_book(app: web.Application) -> AsyncIterator[None]:
    """Budget states, followed from the budgets topic, and this process's reservations."""
    settings = app[SETTINGS]
    book = app[BUDGETS] = BudgetBook(
        settings.budgets,
        load_catalog(settings.pricing_file),
        settings.budget_default_max_tokens,
        settings.budget_default_context_tokens,
        settings.budget_default_web_searches,
        settings.budget_image_tokens,
        settings.budget_default_advisor_uses,
        admit_unpriced=settings.budget_unpriced == "admit",
    )
    tasks = []
    if settings.budgets:
        tasks.append(
            asyncio.create_task(follow(book, settings.kafka, "ingress-budgets"), name="budgets")
        )
    if any(b.hard_cap for b in settings.budgets):
        # What this process reserves, for the other ingress processes' caps and the
        # budgets endpoint (the publisher outlives this); what the others reserve.
        book.ingress_id = f"ingress-{uuid.uuid4()}"
        held = announce(
            book, app[PUBLISHER].publish, settings.kafka.names.reservations, book.ingress_id
        )
        tasks.append(asyncio.create_task(held, name="reservations"))
        # And deletes the entries that processes killed left there (ingress/guards/reaping.py).
        reaper = Reaper(book.ingress_id, book.holds_placed)
        others = hear_others(book, settings.kafka, "ingress-reservations", reaper)
        tasks.append(asyncio.create_task(others, name="others-reservations"))
        deleting = reap(
            reaper, book.others_read, app[PUBLISHER].publish, settings.kafka.names.reservations
        )
        tasks.append(asyncio.create_task(deleting, name="reap-reservations"))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def rate_limiter(app: web.Application) -> AsyncIterator[None]:
    app[LIMITER] = RateLimiter()  # per process: N ingress replicas allow N times the limit
    yield


KEY_RELOAD_S = 1.0


async def key_store(app: web.Application) -> AsyncIterator[None]:
    """Virtual keys, re-read (in a thread) whenever the key file changes."""
    keys = app[KEYS] = KeyStore(app[SETTINGS].key_file)
    await asyncio.to_thread(keys.reload)

    task = asyncio.create_task(keys.follow(KEY_RELOAD_S), name="key-reload")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


_ROUTES = (
    "llmtap forwards OpenAI's chat completions, completions, embeddings and Responses "
    "API calls and Anthropic's Messages API calls, and passes models lists, token counts "
    "and moderations; not the endpoints of what the provider account stores (files, "
    "batches, stored responses), which every tenant's calls share."
)


@web.middleware
async def provider_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routing errors in the caller's provider's error shape (Anthropic's for its paths
    and its SDK, else OpenAI's), so SDKs show a clear message; each is recorded as a
    call that never reached a provider, but a browser's preflight (no call: cors.py)."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        status, code, headers = 404, "unknown_url", {}
        message = f"Unknown route: {request.method} {request.path}. {_ROUTES}"
    except web.HTTPMethodNotAllowed as exc:
        status, code, headers = 405, "method_not_allowed", {"Allow": exc.headers["Allow"]}
        message = f"Method {request.method} not allowed on {request.path}"
    if not preflight(request):
        call = Call(provider="", endpoint="unknown")
        call.attribution = _caller(request)
        record_outcome(request.app, call, "bad_request", status, Usage(), error_class=code)
        headers["x-request-id"] = str(call.request_id)
    anthropic = request.path.startswith("/v1/messages") or "anthropic-version" in request.headers
    shape = anthropic_error if anthropic else openai_error
    return shape(status, message, code=code, headers=headers)


def _caller(request: web.Request) -> Attribution:
    """Whom a refused route is recorded under: as a call there would be, by its key.
    Claims of a missing or unknown key are not taken: anyone could file errors under
    any tenant's name (a false claim of a valid key goes under the key's own)."""
    try:
        return authenticate(request.headers, request.app[SETTINGS], request.app[KEYS]).attribution
    except Refusal as refusal:
        return refusal.attribution or NOBODY


async def healthz(request: web.Request) -> web.Response:
    publisher = request.app[PUBLISHER]
    return web.json_response(
        {
            "status": "ok",
            "broker_connected": publisher.connected,
            "events_backlog": publisher.backlog,
            "events_published": publisher.published,
            "events_dropped": publisher.dropped,
            "events_spooled": publisher.spooled,
            "events_replayed": publisher.replayed,
            "spool_bytes": publisher.spool_bytes,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain")


async def readyz(request: web.Request) -> web.Response:
    """Ready: config loaded, a provider reachable, events have somewhere to go.

    What every replica suffers alike does not take this one out of rotation: a provider
    that cannot be reached (its calls get a 502 from any replica; pulling them all would
    stop the calls to the providers that work), and a broker that is down while the
    spool has room (calls go on, their events wait on disk: the point of the spool).
    A replica that reaches no provider at all, or has nowhere to put events, is not
    ready, nor is one stopping (within shutdown_delay_s of a SIGTERM). The JSON says
    which check is which."""
    app = request.app
    if app[STOPPING].is_set():
        return web.json_response({"ready": False, "stopping": True}, status=503)
    publisher = app[PUBLISHER]
    providers = app[SETTINGS].all_providers()
    reachable = await asyncio.gather(*(tcp_reachable(p.base_url) for p in providers.values()))
    events = publisher.connected or publisher.spool_room
    checks = {
        "config": True,
        "keys_loaded": len(app[KEYS]),
        "broker": "connected" if publisher.connected else "unreachable",
        "spool_room": publisher.spool_room,
        "providers": dict(zip(providers, reachable, strict=True)),
        # Each one's calls with llmtap keys are refused until its key is set: a matter
        # of this replica's environment, said here and logged at start.
        "provider_keys_unset": app[SETTINGS].keys_unset(),
    }
    ready = events and any(reachable)
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


READY_CONNECT_TIMEOUT_S = 2.0


async def tcp_reachable(url: str) -> bool:
    parsed = URL(url)
    if parsed.host is None:
        return False
    try:
        async with asyncio.timeout(READY_CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(parsed.host, parsed.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[provider_shaped_errors],
        # Request bodies are not inflated by aiohttp's parser: a compressed one is refused
        # (415) by the route, whatever its encoding. Inflating it, the parser answered
        # one it has no decoder for (br without Brotli) with its own plain 400 before
        # any route, and broke the connection over an invalid gzip or deflate body
        # (logged as an unhandled exception), after the route had answered its 415.
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[GRACE_OVER] = asyncio.Event()
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(time_the_grace)
    app.cleanup_ctx.append(key_store)
    app.cleanup_ctx.append(upstream_session)
    app.cleanup_ctx.append(event_publisher)
    app.cleanup_ctx.append(ingress_metrics)
    app.cleanup_ctx.append(rate_limiter)
    app.cleanup_ctx.append(budget_book)
    app.cleanup_ctx.append(token_counting)  # last: cleaned up first
    openai.add_routes(app)
    anthropic.add_routes(app)
    models = unmetered.models(openai.OPENAI, anthropic.ANTHROPIC)  # both APIs list them
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    allow_origins(app, settings.cors_origins)
    return app


async def time_the_grace(app: web.Application) -> None:
    """Runs as a stop begins: new connections are refused, and calls in flight have
    shutdown_grace_s to finish before aiohttp closes their connections. Those it closes
    are recorded as cut by the proxy, not as the client's leaving."""
    grace_s = app[SETTINGS].shutdown_grace_s
    log.info("stopping: no new connections; calls in flight have up to %.0fs to finish", grace_s)
    asyncio.get_running_loop().call_later(grace_s, app[GRACE_OVER].set)


async def delay_the_stop(app: web.Application) -> None:
    """With shutdown_delay_s, a SIGTERM does not stop the proxy at once: /readyz answers
    503 and calls are still taken for that long, each answer saying ``Connection:
    close`` (the client's next call opens a new connection, through the balancer), so
    a load balancer (or Kubernetes, which sends SIGTERM while endpoints are still being
    removed) stops sending calls before the listening socket closes. Closing it at once
    resets the connections already queued on it. Then the stop runs as without a
    delay. Another SIGTERM, or SIGINT, cuts the delay short; once the stop runs, signals
    are ignored (one would cut the calls in flight and their events' flush: SIGKILL
    does that), with no delay too (aiohttp's own handlers, left in place, stopped the
    stop halfway at a second signal: a second Ctrl-C, a supervisor's repeated SIGTERM).
    Runs at start, after aiohttp has set its own handlers, and replaces them."""
    delay_s = app[SETTINGS].shutdown_delay_s
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None
    exiting = False

    def stop_now() -> None:
        nonlocal exiting
        if timer is not None:
            timer.cancel()
        if exiting:
            log.info("signal ignored: the stop is under way")
            return
        exiting = True
        raise web.GracefulExit  # as aiohttp's own handler: run_app then stops the app

    def on_sigterm() -> None:
        nonlocal timer
        if delay_s <= 0 or app[STOPPING].is_set():
            stop_now()
            return
        app[STOPPING].set()
        log.info("SIGTERM: /readyz answers 503; calls are taken for %.0fs more", delay_s)
        timer = loop.call_later(delay_s, stop_now)

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        loop.add_signal_handler(signal.SIGINT, stop_now)
    except NotImplementedError:  # an event loop without signal handlers
        if delay_s > 0:
            log.warning("shutdown_delay_s is not supported here: a SIGTERM stops at once")


async def close_while_stopping(request: web.Request, response: web.StreamResponse) -> None:
    """While shutdown_delay_s runs, every answer closes its connection after it."""
    if request.app[STOPPING].is_set():
        response.force_close()  # this runs once aiohttp has made the head: say it too
        response.headers["Connection"] = "close"


# Collections of the youngest generation once started: after this many more objects
# made than freed (CPython's default: 700). Calls' objects are freed as they end, by
# their counts; at 700 the transient peaks of a flight or of calls in flight started a
# young collection every ~30 calls, one of the next generation every ~300 (up to ~2.5 ms
# each), 0.5 s of the loop's time over a bench/ingress_latency.py run (~30,000 calls).
# At 10,000 about five ran once started in such a run, 0.03 s in all (two runs each,
# side by side; the latency ratios moved within the run-to-run noise).
# Garbage in reference cycles (never freed by counts) still counts towards it.
YOUNG_COLLECTION_THRESHOLD = 10_000


async def freeze_heap(app: web.Application) -> None:
    """Once started, move everything alive (modules, config, the price catalog, the
    clients) out of the garbage collector's sight: it is kept for the process's life,
    and scanning it made each collection of the oldest generation stop the event loop
    for 15-25 ms (bench/ingress_latency.py). Calls' own objects are collected as before,
    less often (:data:`YOUNG_COLLECTION_THRESHOLD`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


def run(settings: Settings) -> None:
    app = create_app(settings)
    app.on_startup.append(freeze_heap)  # after the cleanup contexts: they start first
    app.on_startup.append(delay_the_stop)
    if settings.shutdown_delay_s > 0:
        app.on_response_prepare.append(close_while_stopping)
    web.run_app(
        app,
        host=settings.proxy_host,
        port=settings.proxy_port,
        access_log=None,
        print=None,
        shutdown_timeout=settings.shutdown_grace_s,
        ssl_context=settings.server_ssl_context,
    )
