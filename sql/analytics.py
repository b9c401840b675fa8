"""The analytics API: GET /api/v1/analytics/..., answered from ClickHouse.

Each handler parses its query string (sql/params.py), runs one or two queries from
sql/queries/analytics_*.sql through :func:`select`, and returns JSON. Every query
shares one WHERE clause (sql/queries/_filters.sql), tenant filter included.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from sql.params import RANGES, BadParameter, Filters, Query
from sql.store import Store, render

STORE = web.AppKey("store", Store)

ROLLING = ("24h", "7d", "30d")  # the models endpoint's rolling windows


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f"{value:f}"  # money stays exact: a decimal string, never a float
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        # ClickHouse hands back UTC timestamps without a zone: say so (ISO-8601, "Z").
        body=orjson.dumps(
            payload, default=_default, option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z
        ),
        status=status,
        content_type="application/json",
    )


def api_error(status: int, message: str, param: str | None = None) -> web.Response:
    return json_response({"error": {"message": message, "param": param}}, status=status)


def parse(request: web.Request, *extra: str) -> tuple[Query, Filters]:
    """The request's parameters (the common ones plus ``extra``) and its filters.

    The tenant filter is not a query parameter: it will come from the caller's key.
    Until then it is unset, and queries see every tenant.
    """
    query = Query(request.query, *extra)
    return query, query.filters(tenant=None)


async def select(
    store: Store,
    name: str,
    filters: Filters,
    *,
    structure: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run ``sql/queries/<name>.sql`` scoped by ``filters``.

    ``structure`` goes to Jinja (identifiers, which clauses); ``values`` and the filters'
    values are bound ClickHouse parameters.
    """
    sql = render(name, filters=filters.active(), **(structure or {}))
    return await store.arows(sql, {**filters.parameters(), **(values or {})})


async def models(request: web.Request) -> web.Response:
    _, filters = parse(request)
    windows = {f"since_{w}": filters.until - RANGES[w] for w in ROLLING}
    # One scan covers both the range and the rolling windows.
    scan = replace(filters, since=min(filters.since, *windows.values()))
    rows = await select(
        request.app[STORE],
        "analytics_models",
        scan,
        values={"range_since": filters.since, **windows},
    )
    return json_response({"range": filters.range, "data": rows})


async def timeseries(request: web.Request) -> web.Response:
    query, filters = parse(request, "granularity")
    granularity = query.granularity(filters.range)
    rows = await select(
        request.app[STORE],
        "analytics_timeseries",
        filters,
        structure={"granularity": granularity},
    )
    return json_response({"range": filters.range, "granularity": granularity, "data": rows})


async def providers(request: web.Request) -> web.Response:
    _, filters = parse(request)
    rows = await select(request.app[STORE], "analytics_providers", filters)
    return json_response({"range": filters.range, "data": rows})


async def costs(request: web.Request) -> web.Response:
    query, filters = parse(request, "group_by")
    group_by, prop = query.group_by()
    rows = await select(
        request.app[STORE],
        "analytics_costs",
        filters,
        structure={"group_by": group_by},
        values={"prop": prop} if prop is not None else None,
    )
    shown = group_by if prop is None else f"property:{prop}"
    return json_response({"range": filters.range, "group_by": shown, "data": rows})


async def usage(request: web.Request) -> web.Response:
    _, filters = parse(request, "model_id", "user_id")
    store = request.app[STORE]
    totals = await select(store, "analytics_usage", filters, structure={"by_model": False})
    per_model = await select(store, "analytics_usage", filters, structure={"by_model": True})
    return json_response({"range": filters.range, "totals": totals[0], "data": per_model})


async def performance(request: web.Request) -> web.Response:
    _, filters = parse(request, "model_id")
    minutes = RANGES[filters.range].total_seconds() / 60
    rows = await select(
        request.app[STORE],
        "analytics_performance",
        filters,
        values={"range_minutes": minutes},
    )
    return json_response({"range": filters.range, "data": rows[0]})


async def users(request: web.Request) -> web.Response:
    query, filters = parse(request, "limit")
    limit = query.limit()
    rows = await select(request.app[STORE], "analytics_users", filters, values={"limit": limit})
    return json_response({"range": filters.range, "limit": limit, "data": rows})


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadParameter as exc:
        return api_error(400, exc.message, exc.param)
    except web.HTTPNotFound:
        return api_error(404, f"unknown endpoint {request.path}")


ROUTES = {
    "models": models,
    "timeseries": timeseries,
    "providers": providers,
    "costs": costs,
    "usage": usage,
    "performance": performance,
    "users": users,
}


def add_routes(app: web.Application) -> None:
    """Mount the analytics endpoints on an app that holds a STORE and uses api_errors."""
    for name, handler in ROUTES.items():
        app.router.add_get(f"/api/v1/analytics/{name}", handler)
