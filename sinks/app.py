"""The store process: the one process that owns the ClickHouse store.

It runs the migrations, the ClickHouse writer, and serves the analytics API from the
same client. With embedded chDB this is required (one process owns a chDB path); with
a ClickHouse server the API and writer could be split, but need not be.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from llmtap.config import Settings
from sinks.clickhouse.writer import ClickHouseWriter
from sinks.webhooks.dispatcher import WebhookDispatcher
from sql import analytics
from sql.migrate import migrate
from sql.retention import apply_retention
from sql.store import Store

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
WRITER = web.AppKey("writer", ClickHouseWriter)
DISPATCHER = web.AppKey("webhook_dispatcher", WebhookDispatcher)


async def clickhouse_store(app: web.Application) -> AsyncIterator[None]:
    store = app[analytics.STORE] = Store(app[SETTINGS].store_dsn)
    settings = app[SETTINGS]
    applied = await asyncio.to_thread(migrate, store)
    if applied:
        log.info("migrations applied: %s", applied)
    await asyncio.to_thread(
        apply_retention,
        store,
        raw_days=settings.raw_retention_days,
        rollup_days=settings.rollup_retention_days,
    )
    yield
    store.close()


async def clickhouse_writer(app: web.Application) -> AsyncIterator[None]:
    writer = app[WRITER] = ClickHouseWriter(app[SETTINGS], app[analytics.STORE])
    task = asyncio.create_task(writer.run(), name="clickhouse-writer")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# Alerts: stored in ClickHouse and delivered as signed webhooks (sinks/webhooks/).
async def webhook_dispatcher(app: web.Application) -> AsyncIterator[None]:
    dispatcher = app[DISPATCHER] = WebhookDispatcher(app[SETTINGS], app[analytics.STORE])
    task = asyncio.create_task(dispatcher.run(), name="webhook-dispatcher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def healthz(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    return web.json_response(
        {
            "status": "ok",
            "rows_written": writer.rows_written,
            "batches_written": writer.batches_written,
            "write_failures": writer.write_failures,
        }
    )


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[analytics.api_errors])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(clickhouse_store)
    app.cleanup_ctx.append(clickhouse_writer)
    app.cleanup_ctx.append(webhook_dispatcher)
    app.router.add_get("/healthz", healthz)
    analytics.add_routes(app)
    return app


def tune_gc() -> None:
    """Fewer, later garbage collections for a process that decodes events in bulk.

    The writer holds up to two batches of decoded events (tens of thousands of small
    objects); with CPython's default thresholds, collections over them cost more than
    the decoding itself (bench/ingest.py measured 18k -> 27k events/s decoded).
    """
    gc.freeze()  # what start-up allocated is never garbage: stop scanning it
    gc.set_threshold(100_000, 50, 100)


def run(settings: Settings) -> None:
    tune_gc()
    web.run_app(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        access_log=None,
        print=None,
    )
