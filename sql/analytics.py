"""The analytics API: GET /api/v1/analytics/..., answered from ClickHouse.

Each handler parses its query string (sql/params.py), runs one or two queries from
sql/queries/analytics_*.sql through :func:`select`, and returns JSON. Every query
shares one WHERE clause (sql/queries/_filters.sql), tenant filter included: the
caller's key sets it (sql/auth.py), never the query string. :func:`add_routes` mounts
these endpoints, POST /api/v1/sql (sql/sqlapi.py, admin keys only) and the OpenAPI
document that describes them all (sql/openapi.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from llmtap.config import Settings
from sql import openapi, sqlapi
from sql.auth import AUTH, CALLER, Unauthorized, api_auth
from sql.params import EXTRA, RANGES, BadParameter, Filters, Query
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


def api_error(
    status: int,
    message: str,
    param: str | None = None,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"message": message, "param": param}
    if code is not None:
        error["code"] = code
    response = json_response({"error": error}, status=status)
    response.headers.update(headers or {})
    return response


def parse(request: web.Request, endpoint: str) -> tuple[Query, Filters]:
    """The request's parameters (the common ones plus the endpoint's) and its filters.

    The scope (tenant, and team and user for a key bound to them) is not a query
    parameter: it comes from the caller's key; an admin key's scope is every tenant.
    """
    query = Query(request.query, *EXTRA[endpoint])
    return query, query.filters(request[CALLER].scope)


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
    _, filters = parse(request, "models")
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
    query, filters = parse(request, "timeseries")
    granularity = query.granularity(filters.range)
    rows = await select(
        request.app[STORE],
        "analytics_timeseries",
        filters,
        structure={"granularity": granularity},
    )
    return json_response({"range": filters.range, "granularity": granularity, "data": rows})


async def providers(request: web.Request) -> web.Response:
    _, filters = parse(request, "providers")
    rows = await select(request.app[STORE], "analytics_providers", filters)
    return json_response({"range": filters.range, "data": rows})


async def costs(request: web.Request) -> web.Response:
    query, filters = parse(request, "costs")
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
    _, filters = parse(request, "usage")
    store = request.app[STORE]
    totals = await select(store, "analytics_usage", filters, structure={"by_model": False})
    per_model = await select(store, "analytics_usage", filters, structure={"by_model": True})
    return json_response({"range": filters.range, "totals": totals[0], "data": per_model})


async def performance(request: web.Request) -> web.Response:
    _, filters = parse(request, "performance")
    minutes = RANGES[filters.range].total_seconds() / 60
    rows = await select(
        request.app[STORE],
        "analytics_performance",
        filters,
        values={"range_minutes": minutes},
    )
    return json_response({"range": filters.range, "data": rows[0]})


async def users(request: web.Request) -> web.Response:
    query, filters = parse(request, "users")
    limit = query.limit()
    rows = await select(request.app[STORE], "analytics_users", filters, values={"limit": limit})
    return json_response({"range": filters.range, "limit": limit, "data": rows})


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """JSON errors for what the routes themselves do not answer: unknown paths and
    methods (and a parameter error, should a handler raise one outside :func:`guarded`)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadParameter as exc:
        return api_error(exc.status, exc.message, exc.param, code=exc.code)
    except web.HTTPNotFound:
        return api_error(404, f"unknown endpoint {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return api_error(
            405,
            f"method {request.method} is not allowed on {request.path}; use {allowed}",
            headers={"Allow": allowed},
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SQL_ADMIN_ONLY = (
    "SQL is for admin keys only: the embedded store (chDB) has no users or row policies, "
    "so a query cannot be confined to your tenant. The analytics endpoints are, "
    "by your key."
)


def guarded(handler: Handler, *, admin_only: bool = False) -> Handler:
    """``handler`` for authenticated callers: 401 without a known key, 403 for a virtual
    key on an admin-only route; the caller is ``request[CALLER]``."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            caller = request.app[AUTH].authenticate(request.headers)
        except Unauthorized as exc:
            return api_error(
                401, exc.message, headers={"WWW-Authenticate": 'Bearer realm="llmtap"'}
            )
        if admin_only and not caller.admin:
            return api_error(403, SQL_ADMIN_ONLY)
        request[CALLER] = caller
        try:
            return await handler(request)
        except BadParameter as exc:
            return api_error(exc.status, exc.message, exc.param, code=exc.code)

    return wrapper


ROUTES = {
    "models": models,
    "timeseries": timeseries,
    "providers": providers,
    "costs": costs,
    "usage": usage,
    "performance": performance,
    "users": users,
}
OPENAPI = web.AppKey("openapi_document", bytes)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def add_routes(
    app: web.Application, settings: Settings, *, sql_limits: sqlapi.SqlLimits | None = None
) -> None:
    """Mount the API on an app that holds a STORE (set by a cleanup context appended
    before this call) and uses api_errors: the analytics endpoints, POST /api/v1/sql,
    GET /api/v1/openapi.json (open; everything else needs a key), and the cleanup
    contexts they need (the keys, re-read as the key file changes; the SQL session)."""
    limits = sql_limits or sqlapi.SqlLimits()
    app[sqlapi.SQL_LIMITS] = limits
    app[OPENAPI] = orjson.dumps(openapi.document(limits))
    app.cleanup_ctx.append(api_auth(settings.admin_key_hashes, settings.key_file))
    app.cleanup_ctx.append(sqlapi.sql_runner(STORE, limits))
    for name, handler in ROUTES.items():
        app.router.add_get(f"/api/v1/analytics/{name}", guarded(handler))
    app.router.add_post("/api/v1/sql", guarded(sqlapi.run_sql, admin_only=True))
    app.router.add_get("/api/v1/openapi.json", openapi_document)
