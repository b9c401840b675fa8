"""GET /dashboard: one server-rendered page over the analytics queries, for people.

The numbers come from the same query files (sql/queries/analytics_*.sql, through
:func:`sql.analytics.select`) and the same parameter rules (:class:`sql.params.Query`)
as the analytics API, scoped by the caller's key exactly as the API scopes them; recent
alerts from sql/queries/analytics_alerts.sql; budgets from the budgets topic
(sql/budgets.py). Charts are inline SVG drawn here (charts.py); the page loads one shipped
stylesheet and no script, and names no other host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from clickhouse_connect.driver.exceptions import ClickHouseError
from yarl import URL

from llmtap.config import Settings
from llmtap.events import BudgetState, utcnow
from sql.admission import ADMISSION, TooMany
from sql.analytics import (
    KEPT,
    MODEL_ROWS,
    STORE,
    alert_scope,
    rolling_windows,
    seen_as,
    select,
    store_problem,
)
from sql.auth import AUTH, Caller, Unauthorized
from sql.budgets import BUDGET_BOOK, RESERVATION_BOOK, BudgetRow, alert_keys, budget_rows
from sql.dashboard import charts
from sql.dashboard.charts import Chart, Point, Series
from sql.dashboard.sessions import (
    COOKIE,
    Sessions,
    TooManySessions,
    authenticated,
    caller_of,
    clear_cookie,
    set_cookie,
)
from sql.params import (
    RANGED,
    RANGES,
    BadParameter,
    Filters,
    Kept,
    Query,
    Scope,
    default_granularity,
)
from sql.sqlapi import stop_reading
from sql.store import Store, render

PATH = "/dashboard"
TOP = 10  # rows in each ranking
ALERTS = 20  # recent alerts shown

SESSIONS = web.AppKey("dashboard_sessions", Sessions)

# No script, no inline style, nothing from another host; forms post only here.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make form posts say Origin: null
    "Cache-Control": "no-store",
}
STATIC = {"dashboard.css": "text/css", "favicon.svg": "image/svg+xml"}


# -- what the page shows ----------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    requests: int
    errors: int
    cost: Decimal | None  # None: every call in the range was unpriced
    unpriced: int
    p95_latency_ms: Decimal | None

    @property
    def error_percent(self) -> Decimal | None:
        if not self.requests:
            return None
        return (Decimal(self.errors) * 100 / self.requests).quantize(Decimal("0.1"))


@dataclass(frozen=True)
class AlertRow:
    first_seen: datetime
    alert_type: str
    state: str
    severity: str
    rule: str
    dimension: str
    value: str
    metric: str
    observed: Decimal
    message: str
    period: str  # a budget alert's budget period; "" on the others
    resolution: str  # why a spike alert resolved; "" on the others

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> AlertRow:
        return cls(
            first_seen=row["first_seen"],
            alert_type=row["alert_type"],
            state=row["state"],
            severity=row["severity"],
            rule=row["rule"],
            dimension=row["dimension"],
            value=row["value"],
            metric=row["metric"],
            observed=Decimal(row["observed"]),
            message=row["message"],
            period=row["period"],
            resolution=row["resolution"],
        )


@dataclass(frozen=True)
class Link:
    label: str
    href: str
    current: bool


@dataclass(frozen=True)
class Page:
    """Everything dashboard.html.j2 renders."""

    range: str | None  # always a range: the page takes no window (params.RANGED)
    granularity: str
    totals: Totals
    spend: Chart
    traffic: Chart
    latency: Chart
    top_users: Chart
    top_teams: Chart
    top_features: Chart
    budgets: list[BudgetRow]
    budgets_configured: bool
    alerts: list[AlertRow]
    tenant_only: bool  # an admin's page of one tenant: its budgets and alerts alone


def _decimal(value: Any) -> Decimal | None:
    """A ClickHouse number as a Decimal: exact for decimals; floats (latencies) to 0.1."""
    if value is None:
        return None
    if isinstance(value, float):
        return Decimal(f"{value:.1f}") if value == value else None  # NaN: no calls
    return Decimal(value)


def _named(value: str, none: str) -> str:
    return value if value else none


def _bucket_labels(buckets: Sequence[datetime], granularity: str) -> tuple[list[str], list[str]]:
    """Axis labels (short) and tooltip labels (full, UTC) for time buckets."""
    if granularity == "hour":
        return (
            [b.strftime("%H:%M") for b in buckets],
            [b.strftime("%Y-%m-%d %H:00 UTC") for b in buckets],
        )
    return [b.strftime("%b %d") for b in buckets], [b.strftime("%Y-%m-%d") for b in buckets]


def time_charts(rows: Sequence[Mapping[str, Any]], granularity: str) -> tuple[Chart, Chart]:
    """Spend over time, and requests with errors over time, from analytics_timeseries."""
    axis, full = _bucket_labels([r["bucket"] for r in rows], granularity)
    spend = Series(
        "spend", "spend", [Point(f, _decimal(r["cost"])) for f, r in zip(full, rows, strict=True)]
    )
    requests = Series(
        "requests",
        "requests",
        [Point(f, Decimal(r["requests"])) for f, r in zip(full, rows, strict=True)],
    )
    errors = Series(
        "errors",
        "errors",
        [Point(f, Decimal(r["errors"])) for f, r in zip(full, rows, strict=True)],
    )
    return (
        charts.columns("spend", "Spend over time (USD)", axis, [spend], charts.usd),
        charts.columns("traffic", "Requests and errors", axis, [requests, errors], charts.count),
    )


def latency_chart(rows: Sequence[Mapping[str, Any]]) -> Chart:
    """p95 latency per model (and provider), slowest first, from analytics_models."""
    points = [
        Point(f"{_named(r['model'], '(none)')} ({r['provider']})", _decimal(r["p95_latency_ms"]))
        for r in rows
        if r["requests"]
    ]
    points.sort(key=lambda p: (-(p.value or 0), p.label))
    return charts.bars("latency", "p95 latency by model", points[:TOP], charts.millis, "latency")


def cost_chart(
    name: str, title: str, rows: Sequence[Mapping[str, Any]], key: str, tenants: bool = False
) -> Chart:
    """A ranking by cost (rows come costliest first); a group with no key is "(none)".
    With ``tenants`` (the rows are several tenants': users, teams and features exist
    within theirs) each label says whose: "search (acme)"."""

    def label(row: Mapping[str, Any]) -> str:
        named = _named(str(row[key]), "(none)")
        return f"{named} ({_named(row['tenant'], '(none)')})" if tenants else named

    points = [Point(label(r), _decimal(r["cost"])) for r in rows[:TOP]]
    return charts.bars(name, title, points, charts.usd, "spend")


async def gather(
    store: Store, filters: Filters, seen: Scope, budgets: Sequence[BudgetRow], kept: Kept
) -> list[list[dict[str, Any]]]:
    """Every query the page needs, in the order :func:`build` unpacks them (the embedded
    store runs them one at a time; a ClickHouse server at once). The alerts are those
    ``seen`` sees (:func:`sql.analytics.seen_as`)."""
    scan, windows, _ = rolling_windows(filters, kept)  # as GET /analytics/models reads
    minutes = filters.span.total_seconds() / 60
    structure, confined = alert_scope(seen)
    # As GET /analytics/alerts asks it, with no optional filter.
    alerts = render("analytics_alerts", alert_filters=frozenset(), **structure)
    queries: list[Coroutine[Any, Any, list[dict[str, Any]]]] = [
        select(store, "analytics_usage", filters, structure={"by_model": False}),
        select(store, "analytics_performance", filters, values={"range_minutes": minutes}),
        select(
            store,
            "analytics_timeseries",
            filters,
            structure={"granularity": default_granularity(filters.span)},
        ),
        # the range's p95 only, of the costliest models (the slowest of those charted)
        select(store, "analytics_models", scan, values={**windows, "limit": MODEL_ROWS}),
        select(store, "analytics_users", filters, values={"limit": TOP, "offset": 0}),
        *(
            select(
                store,
                "analytics_costs",
                filters,
                structure={"group_by": by},
                values={"limit": TOP, "offset": 0},
            )
            for by in ("team", "feature")
        ),
        store.arows(
            alerts,
            {
                "since": filters.since,
                "budgets": alert_keys(budgets),
                "limit": ALERTS,
                "offset": 0,
                **confined,
            },
        ),
    ]
    # A task group: should one fail, the others are cancelled, so those still queued for
    # the store's reader threads never run for a page already answered with its error.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(query) for query in queries]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def build(
    store: Store,
    filters: Filters,
    caller: Caller,
    settings: Settings,
    states: Mapping[str, BudgetState],
    reserved: Mapping[str, Decimal] | None = None,
) -> Page:
    # An admin's page of one tenant: what a key of that tenant sees, as GET
    # /analytics/alerts with that tenant answers.
    seen = seen_as(caller.scope, filters)
    budgets = budget_rows(settings.budgets, states, seen, filters.until, reserved)
    kept = Kept(settings.raw_retention_days, settings.rollup_retention_days)
    usage, performance, series, models, users, teams, features, alerts = await gather(
        store, filters, seen, budgets, kept
    )
    granularity = default_granularity(filters.span)
    total = usage[0]
    tenants = filters.tenant is None  # an admin's page of every tenant: name each row's
    spend, traffic = time_charts(series, granularity)
    return Page(
        range=filters.range,
        granularity=granularity,
        totals=Totals(
            requests=int(total["requests"]),
            errors=int(total["errors"]),
            cost=_decimal(total["cost"]),
            unpriced=int(total["unpriced_requests"]),
            p95_latency_ms=_decimal(performance[0]["p95_latency_ms"]),
        ),
        spend=spend,
        traffic=traffic,
        latency=latency_chart(models),
        top_users=cost_chart("users", "Top users by cost", users, "user", tenants),
        top_teams=cost_chart("teams", "Top teams by cost", teams, "key", tenants),
        top_features=cost_chart("features", "Top features by cost", features, "key", tenants),
        budgets=budgets,
        budgets_configured=bool(settings.budgets),
        alerts=[AlertRow.of(r) for r in alerts],
        tenant_only=seen != caller.scope,
    )


# -- rendering ------------------------------------------------------------------------


def _utc(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def _percent(value: Decimal | None) -> str:
    return "—" if value is None else f"{value}%"


@cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sql.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        usd=charts.usd, count=charts.count, millis=charts.millis, utc=_utc, percent=_percent
    )
    return env


def html(template: str, status: int = 200, **context: Any) -> web.Response:
    body = _templates().get_template(template).render(path=PATH, **context)
    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS
    )


def range_links(query: Mapping[str, str], current: str | None) -> list[Link]:
    """A link per range, keeping the page's other parameters (filters)."""
    kept = {k: v for k, v in query.items() if k != "range" and k in RANGED}
    return [
        Link(name, str(URL(PATH).with_query({**kept, "range": name})), name == current)
        for name in RANGES
    ]


def describe(caller: Caller) -> str:
    if caller.key is None:
        return "admin key · all tenants"
    scope = caller.scope
    parts = [f"tenant {scope.tenant or '(none)'}"]
    if scope.team:
        parts.append(f"team {scope.team}")
    if scope.user:
        parts.append(f"user {scope.user}")
    return " · ".join([*parts, f"key {caller.key.id}"])


def login_page(range_: str, message: str = "", status: int = 200) -> web.Response:
    return html("login.html.j2", status=status, range=range_, message=message)


def _same_origin(request: web.Request) -> bool:
    """A form post from this site: no Origin (not a browser), or this host's: the Host
    asked for, or the one a proxy in front says the browser asked for (X-Forwarded-Host,
    Forwarded's host: nginx sends its upstream's address as Host unless told otherwise).
    A form another site posts cannot set either header."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    hosts = [request.host]
    if forwarded := request.headers.get("X-Forwarded-Host", "").split(",")[0].strip():
        hosts.append(forwarded)
    hosts += [str(hop["host"]) for hop in request.forwarded[:1] if hop.get("host")]
    site = _address(origin)
    if site is None or site.scheme not in ("http", "https") or not site.host:
        return False  # no browser's origin
    # A host named without a port is on the origin's scheme's default one.
    return any(
        named is not None and (named.host, named.port) == (site.host, site.port)
        for named in (_address(f"{site.scheme}://{host}") for host in hosts)
    )


def _address(text: str) -> URL | None:
    """``text`` as a URL, or None when yarl cannot read it (a port past 65535, a broken
    IPv6 literal, a name IDNA cannot encode): such an Origin or host is no browser's."""
    try:
        return URL(text)
    except ValueError:  # UnicodeError (IDNA) too
        return None


def _range_of(value: object, request: web.Request) -> str:
    """``value`` if it is a range, else the one shown when none is asked."""
    return value if isinstance(value, str) and value in RANGES else _default_range(request)


def _default_range(request: web.Request) -> str:
    return request.app[KEPT].default_range()


# -- handlers -----------------------------------------------------------------------------


class Views:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def page(self, request: web.Request) -> web.Response:
        caller = caller_of(request, request.app[SESSIONS], utcnow())
        if caller is None:
            return login_page(_range_of(request.query.get("range"), request))
        who = describe(caller)

        def failed(status: int, message: str) -> web.Response:
            response = html(
                "dashboard.html.j2",
                status=status,
                who=who,
                error=message,
                ranges=range_links({}, ""),
                page=None,
                shown_filters=[],
                generated_at=utcnow(),
            )
            if status == 429:
                response.headers["Retry-After"] = "1"
            return response

        try:
            query = Query(request.query, common=RANGED)  # ranges only: its links are ranges
            filters = query.filters(caller.scope, _default_range(request))
            request.app[KEPT].check(filters)  # what the API refuses, the page too
            with request.app[ADMISSION].admit(caller):
                page = await build(
                    request.app[STORE],
                    filters,
                    caller,
                    self.settings,
                    request.app[BUDGET_BOOK].states,
                    request.app[RESERVATION_BOOK].reserved(filters.until),
                )
        except BadParameter as exc:
            return failed(exc.status, exc.message)
        except TooMany as exc:
            return failed(429, str(exc))
        except ClickHouseError as exc:
            return failed(503, store_problem(exc)[0])
        shown = [(k, v) for k, v in request.query.items() if k != "range" and v]
        return html(
            "dashboard.html.j2",
            who=who,
            error="",
            ranges=range_links(request.query, filters.range),
            page=page,
            shown_filters=shown,
            generated_at=filters.until,
        )

    async def login(self, request: web.Request) -> web.Response:
        if not _same_origin(request):
            return login_page(_default_range(request), "Log in from this site's own form.", 403)
        try:
            form = await request.post()
        except web.RequestPayloadError:
            # Not what its Content-Encoding says (or a broken chunked body): as the SQL
            # endpoint's, answered here, not a bare 500, and its connection closed.
            stop_reading(request)
            return login_page(
                _default_range(request), "The form could not be read: send it again.", 400
            )
        except UnicodeDecodeError:  # a form whose bytes are not UTF-8
            return login_page(
                _default_range(request), "The form is not UTF-8 text: send it again.", 400
            )
        except (ValueError, LookupError, HttpProcessingError):
            # Not a form aiohttp can parse: multipart without its boundary or end, a part
            # with no name or broken headers, a charset Python does not know. Answered
            # here, not a bare 500 with a traceback at ERROR.
            return login_page(
                _default_range(request), "The form could not be read: send it again.", 400
            )
        range_ = _range_of(form.get("range"), request)
        secret = form.get("key")
        secret = secret.strip() if isinstance(secret, str) else ""
        try:
            await authenticated(request.app[AUTH], secret)
        except Unauthorized:
            return login_page(
                range_, "Unknown or revoked key: use an admin key or a virtual key.", 401
            )
        try:
            token = request.app[SESSIONS].open(secret, utcnow())
        except TooManySessions:
            response = login_page(
                range_, "Too many dashboard sessions are open: try again later.", 503
            )
            response.headers["Retry-After"] = "60"
            return response
        response = web.Response(
            status=303, headers={**HEADERS, "Location": str(URL(PATH).with_query(range=range_))}
        )
        set_cookie(response, request, token, request.app[SESSIONS].ttl)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        if not _same_origin(request):
            return login_page(_default_range(request), "Log out from this site's own page.", 403)
        request.app[SESSIONS].close(request.cookies.get(COOKIE, ""))
        response = web.Response(status=303, headers={**HEADERS, "Location": PATH})
        clear_cookie(response, request)
        return response


@cache
def _static(name: str) -> bytes:
    return resources.files("sql.dashboard").joinpath("static", name).read_bytes()


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(
        body=_static(name),
        content_type=STATIC[name],
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


def add_routes(app: web.Application, settings: Settings) -> None:
    """Mount the dashboard on an app that already has the analytics API
    (:func:`sql.analytics.add_routes`: its STORE and key auth): GET /dashboard, POST
    /dashboard/login and /dashboard/logout, GET /dashboard/static/<file>. The budget
    states are the API's (``app[BUDGET_BOOK]``, following the budgets topic)."""
    views = Views(settings)
    app[SESSIONS] = Sessions()
    app.router.add_get(PATH, views.page)
    app.router.add_post(f"{PATH}/login", views.login)
    app.router.add_post(f"{PATH}/logout", views.logout)
    app.router.add_get(f"{PATH}/static/{{name}}", static)
