"""The stream worker's HTTP endpoint, on worker_metrics_host:worker_metrics_port:
``/metrics`` (Prometheus, stream/metrics.py) and ``/healthz``.

Served by aiohttp on the worker's own event loop, as a service the worker starts after
its Faust app and stops after its stages: a scrape reads the stages' counters between
their steps, never from another thread in the middle of one (prometheus-client's own
server would run in a thread of its own).

``/healthz`` says the worker is alive: 200 while both stages run (or are still
starting), 503 once one has crashed or the worker is stopping; the JSON gives each
stage's state, when it last handled a batch and when its loop last went round, and
whether the cost stage has been given partitions (what the ready file says). A stage
that is stuck stays 200 here, as a long takeover would: alert on the
``llmtap_worker_last_poll_timestamp_seconds`` gauge instead of restarting on this.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from mode import Service
from prometheus_client import CollectorRegistry, generate_latest

from llmtap.config import Settings
from stream.agents.costs import CostStage
from stream.agents.spikes import SpikesStage
from stream.agents.stage import GroupStage
from stream.metrics import worker_registry

log = logging.getLogger(__name__)

COSTS = web.AppKey("costs", CostStage)
SPIKES = web.AppKey("spikes", SpikesStage)
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY]), content_type="text/plain")


def _stage(stage: GroupStage) -> dict[str, Any]:
    return {
        "state": stage.state,
        "last_batch_at": stage.last_batch_at or None,
        "last_poll_at": stage.last_poll_at or None,
        "records_skipped": stage.skipped,
    }


async def healthz(request: web.Request) -> web.Response:
    costs, spikes = request.app[COSTS], request.app[SPIKES]
    stopping = costs.should_stop or spikes.should_stop
    return web.json_response(
        {
            "status": "stopping" if stopping else "ok",
            "partitions_assigned": costs.assigned.is_set(),
            "stages": {"costs": _stage(costs), "spikes": _stage(spikes)},
        },
        status=503 if stopping else 200,
    )


def create_app(costs: CostStage, spikes: SpikesStage) -> web.Application:
    app = web.Application()
    app[COSTS] = costs
    app[SPIKES] = spikes
    app[REGISTRY] = worker_registry(costs, spikes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


class WorkerWeb(Service):
    """Serves :func:`create_app` for the worker's life (a mode service beside the
    stages), over HTTPS when the proxy and the API are (tls_certfile)."""

    def __init__(
        self, settings: Settings, costs: CostStage, spikes: SpikesStage, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self._app = create_app(costs, spikes)
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        s = self._settings
        runner = self._runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(
            runner, s.worker_metrics_host, s.worker_metrics_port, ssl_context=s.server_ssl_context
        )
        await site.start()
        log.info("worker metrics at %s", site.name)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
