"""The analytics API: GET /api/v1/analytics/..., answered from ClickHouse.

Each handler parses its query string (sql/params.py), runs one or two queries from
sql/queries/analytics_*.sql through :func:`select`, and returns JSON. The queries over
calls read the rollups (sql/queries/rollup_parts.sql: whole buckets from the hourly
and daily rollups, the partial buckets at either end of the range from ``calls``), so
their counts and sums equal the raw table's. Every query shares one WHERE clause
(sql/queries/_filters.sql), tenant filter included: a virtual key's tenant always
(sql/auth.py), an admin key's only the one it asks for. A virtual key sees the alerts
(``analytics_alerts.sql``) and budgets that are its own, an admin key naming a tenant
those a key of that tenant sees (:func:`seen_as`). Budgets are answered from the budgets
topic's latest states (sql/budgets.py). :func:`add_routes` mounts these endpoints, POST
/api/v1/sql (sql/sqlapi.py, admin keys only) and the OpenAPI document that describes
them all (sql/openapi.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web
from clickhouse_connect.driver.exceptions import ClickHouseError

from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from sql import openapi, params, sqlapi, sqlguard, sqlrun
from sql.admission import ADMISSION, Admission, TooMany
from sql.auth import AUTH, CALLER, Unauthorized, api_auth
from sql.budgets import (
    BUDGET_BOOK,
    RESERVATION_BOOK,
    alert_keys,
    budget_follower,
    budget_rows,
    visible_budgets,
)
from sql.params import (
    ALERT_STATES,
    ALERT_TYPES,
    COMMON,
    COMMON_OF,
    EXTRA,
    RANGES,
    SEVERITIES,
    BadParameter,
    Filters,
    Kept,
    Query,
    Scope,
)
from sql.store import READ_MAX_MEMORY_BYTES, READ_TIMEOUT_S, Store, render

log = logging.getLogger(__name__)

STORE = web.AppKey("store", Store)
# Where the endpoints over calls read them: "rollup" (the rollups, plus the edges of the
# range from `calls`) or "raw" (`calls` only: the same answer, slower; for comparison).
SOURCE = web.AppKey("analytics_source", str)
SOURCES = ("rollup", "raw")
# The configured budgets: which budget alerts a virtual key may see.
BUDGETS = web.AppKey("analytics_budgets", list[BudgetConfig])
# How many days the store keeps: a range reaching back further is refused.
KEPT = web.AppKey("analytics_kept", Kept)

ROLLING = ("24h", "7d", "30d")  # the models endpoint's rolling windows


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f"{value:f}"  # money stays exact: a decimal string, never a float
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _unpadded(amount: Decimal | None) -> Decimal | None:
    return None if amount is None else amount.normalize()


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

    The scope (tenant, and team and user for a key bound to them) comes from the
    caller's key, and no parameter widens it; an admin key's scope is every tenant.
    A range or window reaching back further than the store keeps what the endpoint
    reads (calls and rollups; alerts: the rollups' retention) is a 400.
    """
    query = Query(request.query, *EXTRA[endpoint], common=COMMON_OF.get(endpoint, COMMON))
    kept, raw = request.app.get(KEPT, Kept()), endpoint != "alerts"
    filters = query.filters(request[CALLER].scope, kept.default_range(raw=raw))
    kept.check(filters, raw=raw)
    return query, filters


def shape(source: str = "rollup") -> dict[str, Any]:
    """The structure every query over calls is rendered with (rollup_parts.sql): where
    calls are read from, and the coarsest rollup (whole days from the daily rollups;
    timeseries by hour asks for "hour"). Which rollups (by model, team or user) follows
    from the query's filters and groups."""
    return {"source": source, "unit": "day"}


async def select(
    store: Store,
    name: str,
    filters: Filters,
    *,
    structure: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run ``sql/queries/<name>.sql`` scoped by ``filters``.

    ``structure`` goes to Jinja (identifiers, which clauses), over the defaults: the
    range's name ('' for a window), whether the window has an end (``bounded``) and
    :func:`shape` (the rollups); ``values`` and the filters' values are bound ClickHouse
    parameters.
    """
    defaults = {"range_name": filters.range or "", "bounded": filters.end is not None}
    sql = render(name, filters=filters.active(), **{**defaults, **shape(), **(structure or {})})
    return await store.arows(sql, {**filters.parameters(), **(values or {})})


def _source(request: web.Request) -> dict[str, Any]:
    return {"source": request.app.get(SOURCE, "rollup")}


def rolling_windows(filters: Filters, kept: Kept) -> tuple[Filters, dict[str, Any], list[str]]:
    """The models query's scan (the range and every rolling window: from the earliest),
    each window's start, and the windows the store does not keep whole: those are read
    no further back than the widest one kept (the rows stay every model seen in the
    range or a window kept), and answered null (unknown, not short)."""
    unkept = [w for w in ROLLING if not kept.covers(RANGES[w])]
    starts = {w: filters.until - RANGES[w] for w in ROLLING if w not in unkept}
    widest = min(filters.since, *starts.values())
    windows = {f"since_{w}": starts.get(w, widest) for w in ROLLING}
    # The range from {range_since}, each window from its {since_*} ({since}: the earliest).
    scan = replace(filters, since=min(filters.since, *windows.values()))
    return scan, {"range_since": filters.since, **windows}, unkept


def forget(rows: list[dict[str, Any]], unkept: list[str]) -> list[dict[str, Any]]:
    """Each row's figures of the windows in ``unkept`` set to null (unknown)."""
    for row in rows:
        for window in unkept:
            for measure in ("requests", "tokens", "cost"):
                row[f"{measure}_{window}"] = None
    return rows


MODEL_ROWS = params.MODEL_ROWS


def first_models(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The first MODEL_ROWS of ``rows`` (read with one more), and whether there were more."""
    return rows[:MODEL_ROWS], len(rows) > MODEL_ROWS


async def models(request: web.Request) -> web.Response:
    _, filters = parse(request, "models")
    scan, values, unkept = rolling_windows(filters, request.app.get(KEPT, Kept()))
    rows, truncated = first_models(
        await select(
            request.app[STORE],
            "analytics_models",
            scan,
            structure=_source(request),
            values={**values, "limit": MODEL_ROWS + 1},
        )
    )
    return json_response({**filters.shown(), "truncated": truncated, "data": forget(rows, unkept)})


async def timeseries(request: web.Request) -> web.Response:
    query, filters = parse(request, "timeseries")
    granularity = query.granularity(filters.span)
    rows = await select(
        request.app[STORE],
        "analytics_timeseries",
        filters,
        structure={"granularity": granularity, **_source(request)},
    )
    return json_response({**filters.shown(), "granularity": granularity, "data": rows})


async def providers(request: web.Request) -> web.Response:
    _, filters = parse(request, "providers")
    rows = await select(
        request.app[STORE], "analytics_providers", filters, structure=_source(request)
    )
    return json_response({**filters.shown(), "data": rows})


async def costs(request: web.Request) -> web.Response:
    query, filters = parse(request, "costs")
    group_by, prop = query.group_by()
    page = query.page()
    rows, paged = page.cut(
        await select(
            request.app[STORE],
            "analytics_costs",
            filters,
            structure={"group_by": group_by, **_source(request)},
            values={**page.values(), **({"prop": prop} if prop is not None else {})},
        )
    )
    if group_by == "day":  # the page's days, costliest first from the store: oldest first
        rows.sort(key=lambda row: row["key"])
    shown = group_by if prop is None else f"property:{prop}"
    return json_response({**filters.shown(), "group_by": shown, **paged, "data": rows})


NANO = Decimal("0.000000001")


def usage_totals(per_model: list[dict[str, Any]]) -> dict[str, Any]:
    """The usage totals, added up from the per-model rows (what analytics_usage.sql
    answers without by_model, one query fewer): counts and tokens summed; the cost of
    the priced rows, unknown (None) when no row was priced, 0 when there are none."""
    counts = (
        "requests",
        "errors",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
    )
    totals: dict[str, Any] = {name: sum(row[name] for row in per_model) for name in counts}
    costs = [row["cost"] for row in per_model if row["cost"] is not None]
    totals["cost"] = sum(costs, Decimal(0)).quantize(NANO) if costs or not per_model else None
    for name in ("unpriced_requests", "usage_missing_requests"):
        totals[name] = sum(row[name] for row in per_model)
    return totals


async def usage(request: web.Request) -> web.Response:
    _, filters = parse(request, "usage")
    store = request.app[STORE]
    per_model, truncated = first_models(
        await select(
            store,
            "analytics_usage",
            filters,
            structure={"by_model": True, **_source(request)},
            values={"limit": MODEL_ROWS + 1},
        )
    )
    if truncated:  # the rows are not all: the totals are counted by the store
        structure = {"by_model": False, **_source(request)}
        (totals,) = await select(store, "analytics_usage", filters, structure=structure)
    else:
        totals = usage_totals(per_model)
    return json_response(
        {**filters.shown(), "totals": totals, "truncated": truncated, "data": per_model}
    )


async def performance(request: web.Request) -> web.Response:
    _, filters = parse(request, "performance")
    minutes = filters.elapsed.total_seconds() / 60  # calls a minute, so far
    rows = await select(
        request.app[STORE],
        "analytics_performance",
        filters,
        structure=_source(request),
        values={"range_minutes": minutes},
    )
    return json_response({**filters.shown(), "data": rows[0]})


async def users(request: web.Request) -> web.Response:
    query, filters = parse(request, "users")
    page = query.page()
    rows, paged = page.cut(
        await select(
            request.app[STORE],
            "analytics_users",
            filters,
            structure=_source(request),
            values=page.values(),
        )
    )
    return json_response({**filters.shown(), **paged, "data": rows})


def seen_as(scope: Scope, filters: Filters) -> Scope:
    """Whose alerts and budgets a caller of ``scope`` asking ``filters`` sees: its own; an
    admin naming a tenant, what a key of that tenant (bound to no team or user) sees: its
    tenant's spikes, its budgets and their alerts."""
    if scope.tenant is None and filters.tenant is not None:
        return Scope(tenant=filters.tenant)
    return scope


def alert_scope(scope: Scope) -> tuple[dict[str, Any], dict[str, Any]]:
    """How ``analytics_alerts.sql`` confines a caller of ``scope`` to its own alerts: the
    query's structure and the values it binds for it (none for an admin)."""
    if scope.tenant is None:
        return {"scoped": False, "spikes_of": None}, {}
    spikes_of, spikes_value = "tenant", scope.tenant
    if scope.user is not None:
        spikes_of, spikes_value = "user", scope.user
    elif scope.team is not None:
        spikes_of, spikes_value = "team", scope.team
    values = {"tenant": scope.tenant, "spikes_dimension": spikes_of, "spikes_value": spikes_value}
    return {"scoped": True, "spikes_of": spikes_of}, values


async def alerts(request: web.Request) -> web.Response:
    query, filters = parse(request, "alerts")
    chosen = {
        "alert_type": query.optional_choice("alert_type", ALERT_TYPES),
        "state": query.optional_choice("state", ALERT_STATES),
        "severity": query.optional_choice("severity", SEVERITIES),
        "rule": query.text("rule"),
    }
    page = query.page()
    scope = seen_as(request[CALLER].scope, filters)
    active = {name: value for name, value in chosen.items() if value is not None}
    structure, confined = alert_scope(scope)
    bounded = filters.end is not None
    sql = render("analytics_alerts", alert_filters=frozenset(active), bounded=bounded, **structure)
    values: dict[str, Any] = {"since": filters.since, **page.values(), **active, **confined}
    if bounded:
        values["end"] = filters.end
    if scope.tenant is not None:
        configured = request.app.get(BUDGETS, [])
        values["budgets"] = alert_keys(visible_budgets(configured, scope))
    rows, paged = page.cut(await request.app[STORE].arows(sql, values))
    return json_response({**filters.shown(), **paged, "data": rows})


async def budgets(request: web.Request) -> web.Response:
    """Every budget the caller may see (an admin naming a tenant: those a key of that
    tenant sees, :func:`seen_as`, as the alerts endpoint), with its state as of now: from
    the budgets topic (sql/budgets.py), not ClickHouse; ``reserved_usd`` from what the
    ingress processes announce on the reservations topic (null when none has been heard
    from lately)."""
    # Parsed as the alerts endpoint parses it (a virtual key naming another tenant: a
    # 403), but not by parse(): a budget's state has no range for the store to keep.
    query = Query(request.query, *EXTRA["budgets"], common=COMMON_OF["budgets"])
    scope = seen_as(request[CALLER].scope, query.filters(request[CALLER].scope))
    configured = request.app.get(BUDGETS, [])
    by_name = {b.name: b for b in configured}
    now = params.utcnow()
    reserved = request.app[RESERVATION_BOOK].reserved(now)
    rows = budget_rows(configured, request.app[BUDGET_BOOK].states, scope, now, reserved)
    data = [
        {
            "budget": row.name,
            "scope": row.scope,
            "value": row.value,
            "tenant": by_name[row.name].owner or None,
            "period": row.period,
            "limit_usd": row.limit_usd,
            # Unpadded, as counted: a spend read back from ClickHouse has nine places.
            "spent_usd": _unpadded(row.spent_usd),
            "remaining_usd": _unpadded(row.remaining_usd),
            "used_percent": row.used_percent,
            "reserved_usd": row.reserved_usd,
            "period_start": row.period_start,
            "period_end": row.period_end,
            "status": row.status,
            "hard_cap": row.hard_cap,
            "thresholds_crossed": row.thresholds_crossed,
            "updated_at": row.updated_at,
        }
        for row in rows
    ]
    return json_response({"data": data})


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


MEMORY_LIMIT_EXCEEDED = 241  # ClickHouse's code (chDB gives it only in the message)


def out_of_memory(exc: ClickHouseError) -> bool:
    """Whether ``exc``'s query went past its memory limit (READ_MAX_MEMORY_BYTES), or
    the engine's own, of the whole process."""
    return getattr(exc, "code", None) == MEMORY_LIMIT_EXCEEDED or (
        "MEMORY_LIMIT_EXCEEDED" in str(exc)
    )


def store_problem(exc: ClickHouseError) -> tuple[str, str]:
    """What to tell of a read the store could not answer (a 503): its message and code.
    Past its time limit, past its memory limit (logged as a warning: the caller's
    query, not the store, is at fault), or failed (logged as an error)."""
    if sqlrun.timed_out(exc):
        took = f"the query took longer than {READ_TIMEOUT_S:g} s"
        return f"{took}: narrow the range or the filters", "timeout"
    if out_of_memory(exc):
        log.warning("an analytics read went past its memory limit: %s", exc)
        took = f"more memory than a read may take ({READ_MAX_MEMORY_BYTES / 1024**3:g} GiB)"
        return f"the query needed {took}: narrow the range or the filters", "too_large"
    log.error("an analytics read failed: %s", exc)
    return "the store could not answer; try again", "store_unavailable"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SQL_ADMIN_ONLY = (
    "SQL is for admin keys only: the embedded store (chDB) has no users or row policies, "
    "so a query cannot be confined to your tenant. The analytics endpoints are, "
    "by your key."
)


def guarded(
    handler: Handler, *, admin_only: bool = False, forbidden: str = SQL_ADMIN_ONLY
) -> Handler:
    """``handler`` for authenticated callers: 401 without a known key, 403 (saying
    ``forbidden``) for a virtual key on an admin-only route; the caller is
    ``request[CALLER]``."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            caller = await request.app[AUTH].authenticated(request.headers)
        except Unauthorized as exc:
            return api_error(
                401, exc.message, headers={"WWW-Authenticate": 'Bearer realm="llmtap"'}
            )
        if admin_only and not caller.admin:
            return api_error(403, forbidden)
        request[CALLER] = caller
        try:
            with request.app[ADMISSION].admit(caller):
                return await handler(request)
        except TooMany as exc:
            return api_error(429, str(exc), code="too_many_requests", headers={"Retry-After": "1"})
        except BadParameter as exc:
            return api_error(exc.status, exc.message, exc.param, code=exc.code)
        except ClickHouseError as exc:
            message, code = store_problem(exc)
            return api_error(503, message, code=code)

    return wrapper


ROUTES = {
    "models": models,
    "timeseries": timeseries,
    "providers": providers,
    "costs": costs,
    "usage": usage,
    "performance": performance,
    "users": users,
    "alerts": alerts,
    "budgets": budgets,
}
OPENAPI = web.AppKey("openapi_document", bytes)


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def add_routes(
    app: web.Application,
    settings: Settings,
    *,
    sql_limits: sqlguard.SqlLimits | None = None,
    source: str = "rollup",
    webhooks: bool = False,
) -> None:
    """Mount the API on an app that holds a STORE (set by a cleanup context appended
    before this call) and uses api_errors: the analytics endpoints, POST /api/v1/sql,
    GET /api/v1/openapi.json (open; everything else needs a key), and the cleanup
    contexts they need (the keys, re-read as the key file changes; the SQL session; the
    budget states, followed from the budgets topic, which the dashboard shows too).
    ``source="raw"`` answers from `calls` alone (tests and benchmarks compare the two).
    ``webhooks``: the app serves the webhooks' redeliver route too (the store process,
    which adds it): the document says so."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    limits = sql_limits or sqlguard.SqlLimits()
    app[sqlapi.SQL_LIMITS] = limits
    app[SOURCE] = source
    app[BUDGETS] = list(settings.budgets)
    app[KEPT] = Kept(settings.raw_retention_days, settings.rollup_retention_days)
    app[OPENAPI] = orjson.dumps(openapi.document(limits, webhooks=webhooks))
    app[ADMISSION] = Admission(settings.api_requests_per_key)
    app.cleanup_ctx.append(api_auth(settings.admin_key_hashes, settings.key_file))
    app.cleanup_ctx.append(sqlapi.sql_runner(STORE, limits, settings.sql_dsn))
    app.on_response_prepare.append(sqlapi.close_if_unreadable)
    app.cleanup_ctx.append(budget_follower(settings))  # app[BUDGET_BOOK]: the dashboard's too
    for name, handler in ROUTES.items():
        app.router.add_get(f"/api/v1/analytics/{name}", guarded(handler))
    app.router.add_post("/api/v1/sql", guarded(sqlapi.run_sql, admin_only=True))
    app.router.add_get("/api/v1/openapi.json", openapi_document)
