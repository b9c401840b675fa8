"""The store process: the one process that owns the ClickHouse store.

It runs the ClickHouse writer (on the schema `llmtap store` migrated first), and serves
the analytics API from the same store (its reads on a handle of their own, so that a
long one holds up no insert: sql/store.py). With embedded chDB this is required (one
process owns a chDB path); with a ClickHouse server the API and writer could be split,
but need not be.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import Alert, BudgetState, utcnow
from llmtap.runtime import tune_gc
from sinks.budget_seed import publish_states, publish_until_sent, rebuilt_state, unraised
from sinks.clickhouse.writer import ClickHouseWriter
from sinks.metrics import store_registry
from sinks.spike_seed import open_spikes, publish_open, publish_open_until_sent
from sinks.webhooks import redeliver
from sinks.webhooks.dispatcher import WebhookDispatcher
from sql import analytics, dashboard
from sql.admission import ADMISSION
from sql.store import Store

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
WRITER = web.AppKey("writer", ClickHouseWriter)
DISPATCHER = web.AppKey("webhook_dispatcher", WebhookDispatcher)
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


async def clickhouse_store(app: web.Application) -> AsyncIterator[None]:
    """The store's client, on a schema migrated before the app is made (`llmtap store`
    applies the migrations and retention first, in its main thread, where a stop ends
    them at once: llmtap/cli.py ``_migrate``)."""
    store = app[analytics.STORE] = Store(app[SETTINGS].store_dsn)
    settings = app[SETTINGS]
    retrying: asyncio.Task[None] | None = None
    if settings.budgets:
        now = utcnow()

        def rebuild(budget: BudgetConfig) -> tuple[BudgetState, list[Alert]]:
            state = rebuilt_state(store, budget, now)
            return state, unraised(store, budget, state)

        rebuilt = await asyncio.to_thread(lambda: [rebuild(b) for b in settings.budgets])
        states = [state for state, _ in rebuilt]
        alerts = [alert for _, raised in rebuilt for alert in raised]
        log.info(
            "budget states rebuilt from ClickHouse: %d (thresholds crossed with no alert yet: %d)",
            len(states),
            len(alerts),
        )
        if not await publish_states(settings.kafka, states, alerts):
            # Kept trying while the store runs (the broker is down, not gone).
            retrying = asyncio.create_task(
                publish_until_sent(settings.kafka, states, alerts), name="budget-seed"
            )
    # The spike alerts open, for the worker's warm-up (sinks/spike_seed.py): of rules
    # removed too, so with none configured as well.
    opened = await asyncio.to_thread(open_spikes, store)
    log.info("spike alerts open in ClickHouse, published again: %d", len(opened))
    reopening: asyncio.Task[None] | None = None
    if opened and not await publish_open(settings.kafka, opened):
        reopening = asyncio.create_task(
            publish_open_until_sent(settings.kafka, opened), name="spike-seed"
        )
    try:
        yield
    finally:
        for task, what in ((retrying, "rebuilt budget states"), (reopening, "open spikes")):
            if task is None:
                continue
            task.cancel()
            # Not raised here (the store is closed whatever it ended with), but logged.
            (failed,) = await asyncio.gather(task, return_exceptions=True)
            if isinstance(failed, Exception):
                log.error("publishing %s failed: %r", what, failed)
        store.close()


class Service(Protocol):
    async def run(self) -> None: ...


S = TypeVar("S", bound=Service)


def in_background(
    key: web.AppKey[S], make: Callable[[web.Application], S], name: str
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs a service's ``run()`` as a task for the app's life;
    a service that ends before (it failed) stops the process (:func:`exit_on_failure`)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        service = app[key] = make(app)
        task = asyncio.create_task(service.run(), name=name)
        task.add_done_callback(exit_on_failure)
        yield
        task.remove_done_callback(exit_on_failure)  # stopping: its end is ours
        if not task.done():  # else it failed, and said so
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return context


def exit_on_failure(task: asyncio.Task[None]) -> None:
    """A service's task ended on its own: the store process exits with status 1, as
    the worker does when a stage crashes, so that whoever runs it (`llmtap up`,
    compose's restart policy) starts it again rather than it serving on without the
    service (a writer that failed writes nothing more). Raised out of the event loop,
    as aiohttp's own stop on SIGTERM is: web.run_app cleans up, then it exits."""
    if task.cancelled():
        return
    failure = task.exception()
    log.critical(
        "%s stopped (%r): the store process exits", task.get_name(), failure, exc_info=failure
    )
    raise SystemExit(1)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY]), content_type="text/plain")


async def healthz(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    return web.json_response(
        {
            "status": "ok",
            "rows_written": writer.rows_written,
            "batches_written": writer.batches_written,
            "write_failures": writer.write_failures,
            "inserts_repeated": writer.inserts_repeated,
            "inserts_lost": writer.inserts_lost,
        }
    )


async def redeliver_route(request: web.Request) -> web.Response:
    """POST /api/v1/webhooks/{endpoint}/redeliver (admin keys): `llmtap alerts redeliver`."""
    selection = redeliver.parse(request.match_info["endpoint"], await request.read())
    app = request.app
    count = await redeliver.redeliver(app[analytics.STORE], app[DISPATCHER], selection)
    return web.json_response({"endpoint": selection.endpoint, "redelivered": count})


REDELIVER_ADMIN_ONLY = "redelivering webhooks is for admin keys only"


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[analytics.api_errors])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(clickhouse_store)
    app.cleanup_ctx.append(
        in_background(
            WRITER,
            lambda app: ClickHouseWriter(app[SETTINGS], app[analytics.STORE]),
            "clickhouse-writer",
        )
    )
    # Alerts: stored in ClickHouse and delivered as signed webhooks (sinks/webhooks/).
    app.cleanup_ctx.append(
        in_background(
            DISPATCHER,
            lambda app: WebhookDispatcher(app[SETTINGS], app[analytics.STORE]),
            "webhook-dispatcher",
        )
    )
    app[REGISTRY] = store_registry(
        lambda: app.get(WRITER), lambda: app.get(DISPATCHER), lambda: app.get(ADMISSION)
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    analytics.add_routes(app, settings, webhooks=True)
    app.router.add_post(
        "/api/v1/webhooks/{endpoint}/redeliver",
        analytics.guarded(redeliver_route, admin_only=True, forbidden=REDELIVER_ADMIN_ONLY),
    )
    dashboard.add_routes(app, settings)  # after the API: it uses the API's key auth
    return app


def run(settings: Settings) -> None:
    tune_gc()
    web.run_app(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        access_log=None,
        print=None,
        ssl_context=settings.server_ssl_context,
    )
