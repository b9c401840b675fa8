"""The analytics API: GET /api/v1/analytics/..., answered from ClickHouse."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from llmtap.events import utcnow
from sql.store import Store, render

STORE = web.AppKey("store", Store)

RANGES = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
DEFAULT_RANGE = "30d"


class BadParameter(Exception):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # money stays exact: a decimal string, never a float
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload, default=_default),
        status=status,
        content_type="application/json",
    )


def api_error(status: int, message: str, param: str | None = None) -> web.Response:
    return json_response({"error": {"message": message, "param": param}}, status=status)


def range_param(request: web.Request) -> str:
    value = request.query.get("range", DEFAULT_RANGE)
    if value not in RANGES:
        raise BadParameter(
            "range", f"invalid 'range' {value!r}: expected one of {', '.join(RANGES)}"
        )
    return value


async def models(request: web.Request) -> web.Response:
    range_ = range_param(request)
    provider = request.query.get("provider", "")
    rows = await request.app[STORE].arows(
        render("analytics_models", provider=bool(provider)),
        {"since": utcnow() - RANGES[range_], "provider": provider},
    )
    return json_response({"range": range_, "data": rows})


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadParameter as exc:
        return api_error(400, exc.message, exc.param)
    except web.HTTPNotFound:
        return api_error(404, f"unknown endpoint {request.path}")


def add_routes(app: web.Application) -> None:
    """Mount the analytics endpoints on an app that holds a STORE and uses api_errors."""
    app.router.add_get("/api/v1/analytics/models", models)
