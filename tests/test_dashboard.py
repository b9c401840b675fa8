"""The dashboard (GET /dashboard) on a real store (chDB), a real broker (Tansu) for the
budget states, the real aiohttp app on a real port, and Debian's headless Chromium.

The browser test logs in through the page's own form, loads the page, fails on any
console error, uncaught exception or failed load, checks that every chart has data
points and that budgets and alerts are listed, and saves a screenshot (its path is
printed). The other tests read the same pages over HTTP: sessions, scope, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from markupsafe import escape

from ingress.guards.keys import create_key, revoke_key
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import Alert, BudgetState, Reservations, Status
from llmtap.kafka import Kafka
from sinks.budget_seed import publish_states
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sinks.webhooks.records import store_batch
from sql import analytics, auth, dashboard, params
from sql.budgets import BUDGET_BOOK, RESERVATION_BOOK, budget_rows
from sql.dashboard import charts, views
from sql.dashboard.charts import Point, Series
from sql.dashboard.sessions import COOKIE, PER_KEY, Sessions, TooManySessions
from sql.params import Scope
from sql.store import Store
from stream.budgets import fresh, period_bounds, status_of, threshold_alert
from tests import browser
from tests.conftest import Broker
from tests.raw_http import raw_request
from tests.test_analytics import NOW, Call

ADMIN_KEY = "admin-key-for-dashboard-tests"
H, D, M = timedelta(hours=1), timedelta(days=1), timedelta(minutes=1)
CHARTS = ("spend", "traffic", "latency", "users", "teams", "features")

# (model, provider, USD per input token, per output token; None: unpriced), base latency
MODELS = [
    ("gpt-4o", "openai", ("0.0000025", "0.00001"), 420.0),
    ("gpt-4o-mini", "openai", ("0.00000015", "0.0000006"), 180.0),
    ("claude-3-5-sonnet", "anthropic", ("0.000003", "0.000015"), 650.0),
    ("llama-3-70b", "groq", None, 90.0),
]
USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
TEAMS = ("search", "ads", "support")
FEATURES = ("chat", "summarize", "classify", "autocomplete")


def dataset() -> list[Call]:
    """A month of varied traffic, denser over the last day: every chart has something."""
    calls = []
    ages = [i * 3 * H + (i % 5) * 17 * M for i in range(240)]  # 30 days, every ~3h
    ages += [j * 29 * M + 3 * M for j in range(48)]  # the last day, every ~half hour
    for i, age in enumerate(ages):
        model, provider, rates, latency = MODELS[(i * 7 + i // 3) % len(MODELS)]
        status: Status = "upstream_error" if i % 9 == 4 else "rate_limited" if i % 13 == 6 else "ok"
        tokens_in, tokens_out = (
            (0, 0) if status != "ok" else (80 + (i * 37) % 900, 15 + (i * 13) % 320)
        )
        if rates is None:
            cost = None
        else:
            cost = (f"{tokens_in * Decimal(rates[0]):f}", f"{tokens_out * Decimal(rates[1]):f}")
        calls.append(
            Call(
                age,
                model,
                provider,
                USERS[(i * 5) % len(USERS)],
                TEAMS[i % len(TEAMS)],
                feature=FEATURES[(i * 3 + i // 4) % len(FEATURES)],
                status=status,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                cost=cost,
                latency_ms=latency + (i * 53) % 400,
                tenant="globex" if i % 4 == 3 else "acme",
            )
        )
    return calls


CALLS = dataset()


def budgets(prefix: str) -> list[BudgetConfig]:
    return [
        BudgetConfig(name=f"{prefix}-acme", scope="tenant", value="acme", limit_usd=Decimal(5)),
        BudgetConfig(
            name=f"{prefix}-search",
            scope="team",
            value="search",
            tenant="acme",
            period="day",
            limit_usd=Decimal("0.025"),  # past 80% (a warning)
        ),
        BudgetConfig(
            name=f"{prefix}-summarize",
            scope="feature",
            value="summarize",
            tenant="acme",
            period="week",
            limit_usd=Decimal("0.5"),
            hard_cap=False,
        ),
        BudgetConfig(  # overspent (exhausted): remaining is negative
            name=f"{prefix}-globex", scope="tenant", value="globex", limit_usd=Decimal("0.08")
        ),
    ]


def spent(budget: BudgetConfig, calls: Iterable[Call]) -> Decimal:
    """What a budget's period (containing NOW) spent: the calls that count against it."""
    start, _ = period_bounds(budget.period, NOW)
    column = {"tenant": "tenant", "team": "team", "feature": "feature", "user": "user"}
    return sum(
        (
            c.total
            for c in calls
            if c.total is not None
            and c.ts_end >= start
            and getattr(c, column[budget.scope]) == budget.value
            and (not budget.tenant or c.tenant == budget.tenant)
        ),
        Decimal(0),
    )


def published_state(budget: BudgetConfig) -> BudgetState:
    """The state the stream would publish for ``budget`` after counting CALLS."""
    total = spent(budget, CALLS)
    crossed = tuple(t for t in budget.thresholds if total * 100 >= budget.limit_usd * t)
    return fresh(budget, NOW, NOW).model_copy(
        update={
            "spent_usd": total,
            "crossed": crossed,
            "status": status_of(total, budget.limit_usd, crossed),
            "last_event_at": NOW - 3 * M,
        }
    )


def spike(
    dimension: str,
    value: str,
    age: timedelta,
    severity: Literal["info", "warning", "critical"] = "warning",
) -> Alert:
    return Alert(
        event_id=uuid.uuid4(),
        alert_type="spike",
        state="firing",
        severity=severity,
        rule=f"{dimension}-cost",
        dimension=dimension,
        value=value,
        metric="cost",
        observed=Decimal("1.25"),
        baseline=Decimal("0.2"),
        window_start=NOW - age - M,
        window_end=NOW - age,
        first_seen=NOW - age,
        message=f"cost of {dimension} {value!r} spiked: $1.25 in a minute against $0.20",
    )


@dataclass
class Dash:
    client: TestClient[Any, Any]
    app: web.Application
    settings: Settings
    keys: dict[str, str]  # name -> secret
    key_ids: dict[str, str]
    budgets: list[BudgetConfig]

    @property
    def url(self) -> str:
        return str(self.client.make_url("/dashboard"))

    async def login(self, key: str) -> None:
        async with self.client.post(
            "/dashboard/login", data={"key": key, "range": "30d"}, allow_redirects=False
        ) as response:
            assert response.status == 303, await response.text()

    async def page(self, expect: int = 200, **query: str) -> str:
        async with self.client.get("/dashboard", params=query) as response:
            body = await response.text()
            assert response.status == expect, body
            assert response.content_type == "text/html"
            return body


def make_keys(settings: Settings) -> tuple[dict[str, str], dict[str, str]]:
    owners = {  # name: (tenant, team, user)
        "acme": ("acme", "", ""),
        "globex": ("globex", "", ""),
        "acme_search": ("acme", "search", ""),
        "acme_alice": ("acme", "search", "alice"),
    }
    keys, ids = {}, {}
    for name, (tenant, team, user) in owners.items():
        keys[name], record = create_key(settings.key_file, tenant=tenant, team=team, user=user)
        ids[name] = record.id
    keys["admin"] = ADMIN_KEY
    return keys, ids


@contextlib.asynccontextmanager
async def serve(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    broker: Broker | None,
    calls: list[Call],
    alerts: list[Alert] | None = None,
    raw_retention_days: int = 90,
) -> AsyncIterator[Dash]:
    """The API and the dashboard composed as sinks/app.py composes them, over ``calls``,
    with budget states published on ``broker`` (no budgets without one)."""
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    monkeypatch.setattr(auth, "KEY_RELOAD_S", 0.1)
    if calls:
        assert write_batch(store, Batch(events=[c.event() for c in calls])) == len(calls)
    configured = budgets(f"dash-{uuid.uuid4().hex[:8]}") if broker is not None else []
    settings = Settings(
        data_dir=tmp_path,
        admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()],
        kafka_bootstrap=broker.bootstrap if broker is not None else "127.0.0.1:9",
        budgets=configured,
        raw_retention_days=raw_retention_days,
    )
    keys, ids = make_keys(settings)
    if broker is not None:
        states = [published_state(b) for b in configured]
        await publish_states(Kafka(broker.bootstrap), states)
        search = next(s for s in states if s.budget.endswith("-search"))
        alerts = [*(alerts or []), threshold_alert(configured[1], search, 80, NOW - 2 * H)]
    if alerts:
        store_batch(store, alerts, [], [])
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    dashboard.add_routes(app, settings)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        if configured:  # the dashboard has followed the topic to every budget's state
            async with asyncio.timeout(30):
                while set(app[BUDGET_BOOK].states) < {b.name for b in configured}:
                    await asyncio.sleep(0.05)
        yield Dash(client, app, settings, keys, ids, configured)


ALERTS = [
    spike("tenant", "acme", 50 * M),
    spike("team", "search", 3 * H, severity="critical"),  # no tenant: admins only
    spike("tenant", "globex", 2 * D),
    spike("tenant", "acme", 40 * D),  # older than every range but 90d
]


@pytest.fixture
async def dash(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: Broker
) -> AsyncIterator[Dash]:
    async with serve(
        store, tmp_path, monkeypatch, broker=broker, calls=CALLS, alerts=ALERTS
    ) as served:
        yield served


EXTERNAL = re.compile(r"(?:https?:)?//(?!127\.0\.0\.1[:/]|localhost[:/])[A-Za-z0-9.-]+")


def external_urls(text: str) -> list[str]:
    """Every URL in ``text`` to a host other than this machine."""
    return EXTERNAL.findall(text)


# -- the browser ------------------------------------------------------------------------

COLLECT = """(() => ({
  title: document.title,
  charts: Object.fromEntries([...document.querySelectorAll('svg.chart')]
    .map(s => [s.dataset.chart, Number(s.dataset.points)])),
  bars: [...document.querySelectorAll('svg.chart rect.bar')].length,
  empty: [...document.querySelectorAll('.empty')].map(e => e.textContent.trim()),
  budgets: [...document.querySelectorAll('#budgets tr.budget')].map(r => r.innerText),
  alerts: [...document.querySelectorAll('#alerts tr.alert')].map(r => r.innerText),
  error: document.querySelector('.error') ? document.querySelector('.error').innerText : '',
  over: document.querySelectorAll('#budgets td.over').length,
  cookie: document.cookie,
  html: document.documentElement.outerHTML,
  stylesheets: [...document.styleSheets].map(s => s.cssRules.length),
}))()"""


async def test_the_dashboard_in_a_real_browser(
    dash: Dash, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        browser.chromium_path()
    except browser.BrowserError as exc:
        pytest.fail(str(exc))
    held = Decimal("0.0123")  # what one proxy holds against the first budget
    dash.app[RESERVATION_BOOK].update(
        Reservations(
            ingress_id="ingress-1", at=NOW, interval_s=10, held={dash.budgets[0].name: held}
        )
    )
    async with browser.chromium(tmp_path / "chromium") as page:
        await page.navigate(dash.url)
        assert await page.evaluate("!!document.querySelector('form input[name=key]')")

        key = ADMIN_KEY.replace("\\", "\\\\").replace("'", "\\'")
        await page.submit(
            f"document.querySelector('input[name=key]').value = '{key}';"
            "document.querySelector('form').submit()"
        )
        seen = await page.evaluate(COLLECT)
        shot = await page.screenshot(tmp_path / "dashboard-30d.png")
        with capsys.disabled():
            print(f"\ndashboard screenshot: {shot}")

        assert seen["title"] == "llmtap · dashboard · 30d"
        assert seen["error"] == ""
        assert seen["cookie"] == ""  # the session cookie is HttpOnly: no script can read it
        assert seen["stylesheets"] and seen["stylesheets"][0] > 10  # the shipped CSS loaded
        assert set(seen["charts"]) == set(CHARTS), seen["charts"]
        assert all(points > 0 for points in seen["charts"].values()), seen["charts"]
        assert seen["bars"] >= sum(seen["charts"].values())
        assert seen["empty"] == []
        assert len(seen["budgets"]) == len(dash.budgets)
        for budget, row in zip(dash.budgets, seen["budgets"], strict=True):
            assert budget.name in row
            assert charts.usd(budget.limit_usd - spent(budget, CALLS)) in row, row
            assert published_state(budget).status in row, row
        assert charts.usd(held) in seen["budgets"][0]
        assert all(charts.usd(Decimal(0)) in row for row in seen["budgets"][1:])
        statuses = {published_state(b).status for b in dash.budgets}
        assert statuses == {"ok", "warning", "exhausted"}  # the dataset shows all three
        assert seen["over"] == 1  # the exhausted budget's negative remaining stands out
        assert len(seen["alerts"]) == 4  # three spikes and a budget alert in 30 days
        assert any("passed 80%" in row for row in seen["alerts"])
        assert external_urls(seen["html"]) == []
        assert ADMIN_KEY not in seen["html"]

        # The range selector: the 24h link, followed as a person would.
        await page.submit("document.querySelector('nav.ranges a[href$=\"range=24h\"]').click()")
        day = await page.evaluate(COLLECT)
        assert day["title"] == "llmtap · dashboard · 24h"
        assert set(day["charts"]) == set(CHARTS)
        assert all(points > 0 for points in day["charts"].values()), day["charts"]
        assert day["charts"]["spend"] <= 25  # hourly buckets
        await page.screenshot(tmp_path / "dashboard-24h.png")

        # Logging out ends the session: the page asks for a key again.
        await page.submit("document.querySelector('form[action$=\"/logout\"] button').click()")
        assert await page.evaluate("!!document.querySelector('form input[name=key]')")
        await page.navigate(dash.url)
        assert await page.evaluate("!!document.querySelector('form input[name=key]')")
        assert await page.evaluate("document.querySelectorAll('svg.chart').length") == 0

    assert page.problems == [], page.problems


# -- sessions -----------------------------------------------------------------------------


async def test_without_a_session_the_page_is_a_login_form(dash: Dash) -> None:
    body = await dash.page()
    assert 'name="key"' in body and 'type="password"' in body
    assert "<svg" not in body and "Budgets" not in body
    async with dash.client.get("/dashboard", cookies={COOKIE: "forged-token"}) as response:
        assert 'name="key"' in await response.text()


async def test_a_session_cookie_that_is_not_utf8_is_no_session(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing it raised: aiohttp's bare text 500. It is an unknown session: the login form."""
    async with serve(store, tmp_path, monkeypatch, broker=None, calls=[]) as served:
        base = str(served.client.make_url("")).rstrip("/")
        for cookie in (b"\xff", b"ab\xffcd"):
            answer = await raw_request(
                base, "GET", "/dashboard", [("Cookie", COOKIE.encode() + b"=" + cookie)]
            )
            assert answer.status == 200, answer.body
            assert b'name="key"' in answer.body


@pytest.mark.parametrize("key", ["", "not-a-key", "ltk_" + "x" * 43])
async def test_a_bad_key_is_refused_with_401(dash: Dash, key: str) -> None:
    async with dash.client.post(
        "/dashboard/login", data={"key": key}, allow_redirects=False
    ) as response:
        assert response.status == 401
        assert "Unknown or revoked key" in await response.text()
        assert COOKIE not in response.cookies
    assert 'name="key"' in await dash.page()


async def test_the_session_cookie_holds_a_token_not_the_key(dash: Dash) -> None:
    async with dash.client.post(
        "/dashboard/login", data={"key": dash.keys["acme"], "range": "7d"}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/dashboard?range=7d"
        cookie = response.cookies[COOKIE]
        header = response.headers["Set-Cookie"]
    assert cookie.value and dash.keys["acme"] not in header
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    assert not cookie["secure"]  # plain HTTP (localhost): a Secure cookie is not kept
    body = await dash.page(range="7d")
    assert "tenant acme" in body and dash.keys["acme"] not in body
    # Behind a proxy that ended TLS and says so, the cookie is Secure.
    for said in ({"X-Forwarded-Proto": "https"}, {"Forwarded": "for=1.2.3.4;proto=https"}):
        async with dash.client.post(
            "/dashboard/login",
            data={"key": dash.keys["acme"]},
            headers=said,
            allow_redirects=False,
        ) as response:
            assert response.cookies[COOKIE]["secure"] is True, said


async def test_a_login_posted_from_another_site_is_refused(dash: Dash) -> None:
    async with dash.client.post(
        "/dashboard/login",
        data={"key": ADMIN_KEY},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
    ) as response:
        assert response.status == 403
        assert COOKIE not in response.cookies


async def test_a_login_through_a_proxy_that_names_the_host_it_was_asked_for_is_taken(
    dash: Dash,
) -> None:
    """nginx's proxy_pass sends its upstream's address as Host: the browser's Origin is
    the site's name, which the proxy passes on as X-Forwarded-Host or Forwarded."""
    site = "https://llmtap.example.com"

    async def login(headers: dict[str, str]) -> tuple[int, bool]:
        """The status of an admin's login posted with ``headers``, and whether a cookie
        came with it."""
        async with dash.client.post(
            "/dashboard/login", data={"key": ADMIN_KEY}, headers=headers, allow_redirects=False
        ) as response:
            return response.status, COOKIE in response.cookies

    for said in (
        {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "llmtap.example.com"},
        {"Forwarded": "for=1.2.3.4;proto=https;host=llmtap.example.com"},
    ):
        assert await login({"Origin": site, **said}) == (303, True), said
        # A proxy that keeps the Host asked for: the Origin names no port, as the Host.
        kept = {"Origin": site, "Host": "llmtap.example.com", "X-Forwarded-Proto": "https"}
        assert (await login(kept))[0] == 303
        # An Origin with no scheme or host is no site's (before: it matched any Host).
        for odd in ("site.example", "llmtap.example.com"):
            assert (await login({"Origin": odd, **said}))[0] == 403, (odd, said)
        # Another site's form, through the same proxy, is still refused.
        assert (await login({"Origin": "https://evil.example", **said}))[0] == 403, said


async def test_logout_ends_the_session(dash: Dash) -> None:
    await dash.login(ADMIN_KEY)
    assert "<svg" in await dash.page()
    async with dash.client.post("/dashboard/logout", allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/dashboard"
    assert 'name="key"' in await dash.page()


async def test_revoking_the_key_ends_its_sessions(dash: Dash) -> None:
    await dash.login(dash.keys["acme"])
    assert "tenant acme" in await dash.page()
    assert revoke_key(dash.settings.key_file, dash.key_ids["acme"]).changed
    async with asyncio.timeout(5):  # the key file is re-read every KEY_RELOAD_S
        while 'name="key"' not in await dash.page():
            await asyncio.sleep(0.1)


async def test_one_keys_logins_end_no_other_keys_session(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions are bounded per key (its own oldest go) and in all (then a login is
    refused): a flood of logins with globex's key never logs acme out."""
    limit = 1 + PER_KEY + 9
    monkeypatch.setattr(views, "Sessions", functools.partial(Sessions, limit=limit))
    async with serve(store, tmp_path, monkeypatch, broker=None, calls=[]) as dash:

        async def login(name: str) -> tuple[int, str]:
            async with dash.client.post(
                "/dashboard/login", data={"key": dash.keys[name]}, allow_redirects=False
            ) as response:
                cookie = response.cookies.get(COOKIE)
                return response.status, cookie.value if cookie is not None else ""

        async def logged_in(token: str) -> bool:
            dash.client.session.cookie_jar.clear()
            async with dash.client.get("/dashboard", cookies={COOKIE: token}) as response:
                return 'name="key"' not in await response.text()

        status, acme = await login("acme")
        assert status == 303 and await logged_in(acme)
        globex = [await login("globex") for _ in range(limit * 2)]
        assert {status for status, _ in globex} == {303}
        assert await logged_in(acme)
        assert not await logged_in(globex[-PER_KEY - 1][1])  # its own oldest went
        assert await logged_in(globex[-PER_KEY][1])
        search = [(await login("acme_search"))[0] for _ in range(10)]
        assert search == [303] * 9 + [503]  # full: refused, no one else's session ends
        assert await logged_in(acme)


# -- what each key sees -------------------------------------------------------------------


def users_on(body: str) -> set[str]:
    return {u for u in USERS if re.search(rf">{u}<", body)}


async def test_an_admin_sees_every_tenant_budget_and_alert(dash: Dash) -> None:
    await dash.login(ADMIN_KEY)
    body = await dash.page()
    assert "admin key · all tenants" in body
    assert body.count('<tr class="budget') == len(dash.budgets)
    assert body.count('<tr class="alert') == 4
    priced = [c for c in CALLS if c.ts_end >= NOW - 30 * D]
    total = sum((c.total for c in priced if c.total is not None), Decimal(0))
    assert f'id="total-spend">{charts.usd(total)}<' in body
    assert f'id="total-requests">{len(priced):,}<' in body


async def test_an_alert_says_its_budget_s_period_and_why_a_spike_resolved(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alert.period and Alert.resolution, as stored (0018), by the alert's state and rule:
    nothing more on an alert without them."""
    budget = spike("tenant", "acme", 3 * H).model_copy(
        update={"alert_type": "budget", "rule": "acme-weekly", "period": "week"}
    )
    resolved = spike("tenant", "acme", 2 * H).model_copy(
        update={"state": "resolved", "rule": "acme-cost", "resolution": "quiet"}
    )
    firing = spike("tenant", "globex", 1 * H)
    alerts = [budget, resolved, firing]
    async with serve(store, tmp_path, monkeypatch, broker=None, calls=[], alerts=alerts) as served:
        await served.login(ADMIN_KEY)
        body = await served.page()
    rows = re.findall(r'<tr class="alert[^"]*">(.*?)</tr>', body, re.S)
    cells = [
        [
            " ".join(re.sub(r"<[^>]+>", " ", c).split())
            for c in re.findall(r"<td>(.*?)</td>", r, re.S)
        ]
        for r in rows
    ]
    # First seen, type, severity, state, rule: newest first.
    assert [c[3:5] for c in cells] == [
        ["firing", "tenant-cost"],
        ["resolved quiet", "acme-cost"],
        ["firing", "acme-weekly week"],
    ]


def spend_by(calls: Iterable[Call], key: str) -> dict[tuple[str, str], Decimal]:
    spend: dict[tuple[str, str], Decimal] = {}
    for c in calls:
        if c.total is not None:
            group = (getattr(c, key), c.tenant)
            spend[group] = spend.get(group, Decimal(0)) + c.total
    return spend


async def test_an_admin_sees_each_tenants_users_teams_and_features_apart(dash: Dash) -> None:
    """Teams, users and features exist within their tenant: acme's team search and
    globex's are two bars, each named with its tenant, each with its own spend."""
    await dash.login(ADMIN_KEY)
    body = await dash.page()
    recent = [c for c in CALLS if c.ts_end >= NOW - 30 * D]
    for key in ("team", "feature"):
        spend = spend_by(recent, key)
        assert {k for k, _ in spend} == {getattr(c, key) for c in recent}
        for (value, tenant), cost in spend.items():  # 3 teams and 4 features, 2 tenants
            assert f"<title>{value} ({tenant}): {charts.usd(cost)}</title>" in body
    top = sorted(spend_by(recent, "user").items(), key=lambda kv: -kv[1])[: views.TOP]
    for (user, tenant), cost in top:
        assert f"<title>{user} ({tenant}): {charts.usd(cost)}</title>" in body
    # One tenant asked for: its rows alone, named as they are.
    body = await dash.page(tenant="globex")
    mine = [c for c in recent if c.tenant == "globex"]
    assert f'id="total-requests">{len(mine):,}<' in body
    for (team, _), cost in spend_by(mine, "team").items():
        assert f"<title>{team}: {charts.usd(cost)}</title>" in body
    assert "(acme)" not in body and "(globex)" not in body


@pytest.mark.parametrize(
    ("name", "budgets", "alerts"),
    [
        ("acme", {"acme", "search", "summarize"}, 2),  # its spike and its budget alert
        ("globex", {"globex"}, 1),
        ("acme_search", {"search"}, 1),  # its team's budget and its alert; no tenant spike
        ("acme_alice", set(), 0),  # no budget of user alice
    ],
)
async def test_a_virtual_key_sees_its_own_share(
    dash: Dash, name: str, budgets: set[str], alerts: int
) -> None:
    await dash.login(dash.keys[name])
    body = await dash.page()
    shown = {b.name.rsplit("-", 1)[1] for b in dash.budgets if b.name in body}
    assert shown == budgets
    assert body.count('<tr class="alert') == alerts
    tenant = "globex" if name == "globex" else "acme"
    mine = [c for c in CALLS if c.tenant == tenant and c.ts_end >= NOW - 30 * D]
    if name == "acme_search":
        mine = [c for c in mine if c.team == "search"]
    if name == "acme_alice":
        mine = [c for c in mine if c.team == "search" and c.user == "alice"]
    assert f'id="total-requests">{len(mine):,}<' in body
    priced = [c.total for c in mine if c.total is not None]
    assert f'id="total-spend">{charts.usd(sum(priced, Decimal(0)))}<' in body
    assert users_on(body) <= {c.user for c in mine}
    if not budgets:
        assert "No budget applies to this key." in body


@pytest.mark.parametrize(
    ("tenant", "budgets", "alerts"),
    [
        ("acme", {"acme", "search", "summarize"}, 2),  # its spike and its budget alert
        ("globex", {"globex"}, 1),  # its spike; not acme's, nor the tenantless team spike
    ],
)
async def test_an_admin_asking_for_a_tenant_sees_its_budgets_and_alerts_alone(
    dash: Dash, tenant: str, budgets: set[str], alerts: int
) -> None:
    """What a key of the tenant sees: the budgets it may see, and the alerts GET
    /analytics/alerts answers an admin naming that tenant."""
    await dash.login(ADMIN_KEY)
    body = await dash.page(tenant=tenant)
    shown = {b.name.rsplit("-", 1)[1] for b in dash.budgets if b.name in body}
    assert shown == budgets
    assert body.count('<tr class="alert') == alerts
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with dash.client.get(
        "/api/v1/analytics/alerts", params={"tenant": tenant}, headers=headers
    ) as response:
        assert response.status == 200
        answered = (await response.json())["data"]
    assert len(answered) == alerts
    assert all(str(escape(a["message"])) in body for a in answered)
    assert "budgets and alerts by tenant only" in body
    # The budgets GET /analytics/budgets answers an admin naming that tenant.
    async with dash.client.get(
        "/api/v1/analytics/budgets", params={"tenant": tenant}, headers=headers
    ) as response:
        assert response.status == 200
        listed = {row["budget"] for row in (await response.json())["data"]}
    assert listed == {b.name for b in dash.budgets if b.name in body}
    # The same page of the tenant's own key: the same budgets and alerts.
    await dash.login(dash.keys[tenant])
    own = await dash.page()
    assert {b.name for b in dash.budgets if b.name in own} == {
        b.name for b in dash.budgets if b.name in body
    }
    assert own.count('<tr class="alert') == alerts


async def test_an_admin_s_page_of_a_tenant_without_budgets_says_so_of_the_tenant(
    dash: Dash,
) -> None:
    """Budgets are configured, none on initech: its page says none applies to the tenant
    (not to the key: an admin's sees every budget); a key's own page says the key."""
    await dash.login(ADMIN_KEY)
    body = await dash.page(tenant="initech")
    assert not any(b.name in body for b in dash.budgets)
    assert "No budget applies to this tenant." in body
    assert "No budget applies to this key." not in body
    await dash.login(dash.keys["acme_alice"])
    assert "No budget applies to this key." in await dash.page()


async def test_a_budget_name_once_anothers_shows_none_of_its_alerts(
    dash: Dash, store: Store
) -> None:
    """An alert raised while acme's budget's name was globex's names globex's spend: it
    is not acme's (the alerts endpoint's rule, tests/test_analytics.py)."""
    reused = dash.budgets[0]
    old = BudgetConfig(name=reused.name, scope="tenant", value="globex", limit_usd=Decimal(9))
    state = fresh(old, NOW, NOW).model_copy(update={"spent_usd": Decimal("7.5")})
    leaked = threshold_alert(old, state, 80, NOW - H)
    store_batch(store, [leaked], [], [])
    await dash.login(dash.keys["acme"])
    body = await dash.page()
    assert body.count('<tr class="alert') == 2  # its spike and its budget alert, as before
    assert "globex" not in body


async def test_a_bad_range_is_a_400_on_the_page(dash: Dash) -> None:
    await dash.login(ADMIN_KEY)
    body = await dash.page(expect=400, range="1y")
    assert "invalid &#39;range&#39; &#39;1y&#39;: expected one of 24h, 7d, 30d, 90d" in body
    assert "<svg" not in body
    assert 'href="/dashboard?range=24h"' in body  # the ranges are still offered
    body = await dash.page(expect=400, bogus="1")
    assert "unknown parameter &#39;bogus&#39;" in body


async def test_a_key_bound_to_a_team_cannot_ask_for_another(dash: Dash) -> None:
    await dash.login(dash.keys["acme_search"])
    body = await dash.page(expect=403, team="ads")
    assert "this key is bound to team" in body


async def test_filters_are_kept_by_the_range_links(dash: Dash) -> None:
    await dash.login(ADMIN_KEY)
    body = await dash.page(range="7d", provider="openai")
    assert 'href="/dashboard?provider=openai&amp;range=24h"' in body
    assert "provider = openai" in body
    assert "groq" not in body


async def test_the_page_names_no_other_host_and_sends_a_strict_policy(dash: Dash) -> None:
    await dash.login(ADMIN_KEY)
    async with dash.client.get("/dashboard") as response:
        body = await response.text()
        policy = response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert "<script" not in body and "style=" not in body
    assert external_urls(body) == []
    async with dash.client.get("/dashboard/static/dashboard.css") as response:
        assert response.status == 200
        assert response.content_type == "text/css"
        css = await response.text()
    assert external_urls(css) == [] and "@import" not in css and "url(" not in css
    async with dash.client.get("/dashboard/static/favicon.svg") as response:
        assert response.status == 200
    async with dash.client.get("/dashboard/static/..%2Fviews.py") as response:
        assert response.status == 404


async def test_a_range_longer_than_the_store_keeps_is_a_400_on_the_page(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the API: kept 7 days, a 30d page would leave out what is deleted. The first
    page, asked for no range, shows the longest kept (it was the 30d one: a 400)."""
    async with serve(
        store, tmp_path, monkeypatch, broker=None, calls=CALLS, raw_retention_days=7
    ) as served:
        await served.login(ADMIN_KEY)
        body = await served.page(expect=400, range="30d")
        assert "keeps calls 7 days (raw_retention_days: 7)" in body
        assert "<svg" not in body
        seven_days = f'id="total-requests">{sum(c.ts_end >= NOW - 7 * D for c in CALLS):,}<'
        assert seven_days in await served.page(range="7d")
        assert seven_days in await served.page()


async def test_an_empty_store_says_so_instead_of_drawing_empty_charts(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(store, tmp_path, monkeypatch, broker=None, calls=[]) as served:
        await served.login(ADMIN_KEY)
        body = await served.page()
    assert "<svg" not in body
    for name in CHARTS:
        assert f'<p class="empty" data-chart="{name}">No data in this range.</p>' in body
    assert "No budgets are configured" in body
    assert "No alerts in this range." in body
    # No requests: no share of them, and nothing unpriced to explain.
    assert "of requests" not in body and "cost unknown" not in body


# -- budgets, alone -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        (Scope(), {"t-acme", "t-globex", "team-acme-search", "user-acme-alice", "feat-any"}),
        (Scope(tenant="acme"), {"t-acme", "team-acme-search", "user-acme-alice"}),
        (Scope(tenant="acme", team="search"), {"team-acme-search"}),
        (Scope(tenant="acme", team="search", user="alice"), {"user-acme-alice"}),
        (Scope(tenant="globex"), {"t-globex"}),
    ],
)
def test_which_budgets_a_scope_sees(scope: Scope, expected: set[str]) -> None:
    configured = [
        BudgetConfig(name="t-acme", scope="tenant", value="acme", limit_usd=Decimal(1)),
        BudgetConfig(name="t-globex", scope="tenant", value="globex", limit_usd=Decimal(1)),
        BudgetConfig(
            name="team-acme-search",
            scope="team",
            value="search",
            tenant="acme",
            limit_usd=Decimal(1),
        ),
        BudgetConfig(
            name="user-acme-alice",
            scope="user",
            value="alice",
            tenant="acme",
            limit_usd=Decimal(1),
        ),
        # No tenant: counts every tenant's calls of the feature, so no tenant's key sees it.
        BudgetConfig(name="feat-any", scope="feature", value="chat", limit_usd=Decimal(1)),
    ]
    rows = budget_rows(configured, {}, scope, NOW)
    assert {r.name for r in rows} == expected
    assert all(r.state is None and r.status == "unknown" for r in rows)  # none published


def test_sessions_expire_and_are_bounded() -> None:
    sessions = Sessions(ttl=timedelta(minutes=5), limit=3, per_key=2)
    first = sessions.open("key-1", NOW)
    assert sessions.get(first, NOW + 4 * M) is not None
    assert sessions.get(first, NOW + 5 * M) is None  # expired, and dropped
    a1, a2, b = (sessions.open(k, NOW) for k in ("key-a", "key-a", "key-b"))
    a3 = sessions.open("key-a", NOW)  # past per_key: key-a's own oldest goes
    assert sessions.get(a1, NOW) is None
    kept = [sessions.get(t, NOW) for t in (a2, a3, b)]
    assert [s.secret if s is not None else None for s in kept] == ["key-a", "key-a", "key-b"]
    with pytest.raises(TooManySessions):  # full: refused, no other key's session ends
        sessions.open("key-c", NOW)
    assert all(sessions.get(t, NOW) is not None for t in (a2, a3, b))
    assert len(sessions) == 3
    assert sessions.get(sessions.open("key-c", NOW + 5 * M), NOW + 5 * M) is not None
    assert len(sessions) == 1  # the expired dropped first
    assert sessions.get("", NOW) is None


# -- charts, alone ------------------------------------------------------------------------


def test_columns_count_points_and_escape_labels() -> None:
    labels = ["00:00", "01:00", "<b>", "03:00"]
    values = [Decimal("0.5"), Decimal(0), Decimal("1.25"), None]
    chart = charts.columns(
        "spend",
        "Spend & more",
        labels,
        [Series("spend", "spend", [Point(f"t{i}", v) for i, v in enumerate(values)])],
        charts.usd,
    )
    assert chart.points == 2
    assert chart.html.startswith('<svg class="chart columns" data-chart="spend" data-points="2"')
    assert chart.html.count('<rect class="bar bar-spend"') == 2
    assert "&lt;b&gt;" in chart.html and "<b>" not in chart.html
    assert "Spend &amp; more" in chart.html
    ticks = re.findall(r'text-anchor="end">([^<]+)</text>', chart.html)
    assert ticks == ["$0.00", "$1.00", "$2.00"]  # the axis top: the first of 1, 2 >= 1.25
    assert "t2 · spend: $1.25" in chart.html
    assert "legend" not in chart.html  # one series: no legend


def test_columns_overlay_series_with_a_legend() -> None:
    requests = Series("requests", "requests", [Point("a", Decimal(10)), Point("b", Decimal(4))])
    errors = Series("errors", "errors", [Point("a", Decimal(2)), Point("b", Decimal(0))])
    chart = charts.columns("traffic", "Traffic", ["a", "b"], [requests, errors], charts.count)
    assert chart.points == 3
    assert chart.html.index("bar-requests") < chart.html.index('class="bar bar-errors"')
    assert '<p class="legend">' in chart.html
    with pytest.raises(ValueError, match="has 1 points for 2"):
        charts.columns("x", "x", ["a", "b"], [Series("s", "s", [Point("a", None)])], charts.count)


@pytest.mark.parametrize(
    "points",
    [[], [Point("a", Decimal(0))], [Point("a", None), Point("b", Decimal(0))]],
)
def test_a_chart_with_nothing_to_draw_says_so(points: list[Point]) -> None:
    for chart in (
        charts.bars("users", "Users", points, charts.usd, "spend"),
        charts.columns(
            "spend", "Spend", [p.label for p in points], [Series("s", "s", points)], charts.usd
        ),
    ):
        assert chart.points == 0
        assert (
            chart.html == f'<p class="empty" data-chart="{chart.name}">No data in this range.</p>'
        )


def test_bars_rank_and_show_unknown_values() -> None:
    points = [
        Point("alice", Decimal("0.02")),
        Point("bob", Decimal("0.005")),
        Point("groq-only", None),
        Point("x" * 40, Decimal("0.001")),
    ]
    chart = charts.bars("users", "Top users", points, charts.usd, "spend")
    assert chart.points == 3
    assert chart.html.count("<rect") == 3
    assert ">unknown</text>" in chart.html
    widths = re.findall(r'<rect class="bar bar-spend" x="210" y="\d+" width="([\d.]+)"', chart.html)
    assert widths == ["330", "82.5", "16.5"]
    assert "x" * 29 + "…" in chart.html and f"<title>{'x' * 40}</title>" in chart.html


@pytest.mark.parametrize(
    ("value", "top"),
    [
        ("0.0021", "0.0025"),
        ("1", "1"),
        ("7", "10"),
        ("11", "20"),
        ("0.5", "0.5"),
        ("123456", "200000"),
        ("0", "1"),
    ],
)
def test_nice_ceiling(value: str, top: str) -> None:
    assert charts.nice_ceiling(Decimal(value)) == Decimal(top)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1234.5"), "$1,234.50"),
        (Decimal("0.00105"), "$0.00105"),
        (Decimal("0.5"), "$0.50"),
        (Decimal("0.000000001"), "$0.00"),
        (Decimal("-0.25"), "-$0.25"),
        (Decimal("-12"), "-$12.00"),
        (None, "unknown"),
    ],
)
def test_usd(value: Decimal | None, text: str) -> None:
    assert charts.usd(value) == text


def test_counts_and_latencies() -> None:
    assert charts.count(Decimal(1234)) == "1,234"
    assert charts.count(Decimal("2.5")) == "2.5"
    assert charts.millis(Decimal("95.4")) == "95 ms"
    assert charts.millis(Decimal(1500)) == "1.50 s"


def test_a_model_with_no_name_is_none_in_every_chart() -> None:
    """Refused calls recorded before their model was read have no model: "(none)", as
    the cost rankings say, not an empty label."""
    rows = [
        {"model": "", "provider": "openai", "requests": 2, "p95_latency_ms": 1.5},
        {"model": "gpt-4o", "provider": "openai", "requests": 1, "p95_latency_ms": 9.0},
    ]
    html = views.latency_chart(rows).html
    assert "(none) (openai)" in html and "gpt-4o (openai)" in html


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Encoding": "gzip"}, b"key=not-gzip"),
        ({}, b"key=\xff\xfe&range=7d"),
    ],
)
async def test_a_login_form_that_cannot_be_read_is_a_400(
    dash: Dash, caplog: pytest.LogCaptureFixture, headers: dict[str, str], body: bytes
) -> None:
    """A form that is not what its Content-Encoding says, or not UTF-8: a bare text 500
    and a traceback at ERROR. Now the login page again, 400, and the next request is
    answered."""
    form = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    with caplog.at_level(logging.ERROR):
        async with dash.client.post(
            "/dashboard/login", data=body, headers=form, allow_redirects=False
        ) as response:
            assert response.status == 400, await response.text()
            assert "could not be read" in (text := await response.text()) or "UTF-8" in text
            assert COOKIE not in response.cookies
        assert 'name="key"' in await dash.page()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


PART = b'--zz\r\nContent-Disposition: form-data; name="key"\r\n\r\n'  # its value follows
UNNAMED = b"--zz\r\nContent-Disposition: form-data\r\n\r\n"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"key=x"),  # no boundary
        ("multipart/form-data; boundary=zz", b"key=x"),  # no part
        ("multipart/form-data; boundary=zz", PART + b"x\r\n"),  # never closed
        ("multipart/form-data; boundary=zz", UNNAMED + b"x\r\n--zz--\r\n"),  # no name
        ("multipart/form-data; boundary=zz", b"--zz\r\nno end to the part's headers"),
        (
            "multipart/form-data; boundary=zz",
            PART[:-2] + b"Content-Type: text/plain; charset=bogus\r\n\r\nx\r\n--zz--\r\n",
        ),
        ("application/x-www-form-urlencoded; charset=bogus", b"key=x"),
    ],
)  # fmt: skip
async def test_a_login_form_aiohttp_cannot_parse_is_a_400(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    content_type: str,
    body: bytes,
) -> None:
    """Anyone may post the login form: one that is not a form aiohttp can parse (a
    multipart body without its boundary, a part with no name or broken headers, a
    charset Python does not know) was a bare text 500 and a traceback at ERROR. It is
    the login page again, 400, and the next request is answered."""
    async with serve(store, tmp_path, monkeypatch, broker=None, calls=[]) as served:
        with caplog.at_level(logging.ERROR):
            async with served.client.post(
                "/dashboard/login",
                data=body,
                headers={"Content-Type": content_type},
                allow_redirects=False,
            ) as response:
                text = await response.text()
                assert response.status == 400, text
                assert response.content_type == "text/html"
                assert "The form could not be read" in text
                assert COOKIE not in response.cookies
            assert 'name="key"' in await served.page()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize(
    "headers",
    [
        [("Origin", b"http://[::1")],  # a broken IPv6 literal
        [("Origin", b"http://site.example:99999")],  # a port past 65535
        [("Origin", b"http://\xff.example")],  # a name IDNA cannot encode
        [("Origin", b"http://site.example"), ("X-Forwarded-Host", b"site.example:99999")],
        [("Origin", b"http://site.example"), ("X-Forwarded-Host", b"[site")],
        [("Origin", b"http://site.example"), ("Forwarded", b'host="[site"')],
    ],
)
async def test_an_origin_or_forwarded_host_that_is_no_url_is_refused_not_a_500(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    headers: list[tuple[str, bytes]],
) -> None:
    """yarl raised on these (ValueError, UnicodeError): any client got a bare text 500 on
    the login and logout forms, and a traceback at ERROR. They are no browser's: a 403,
    the page saying so."""
    async with serve(store, tmp_path, monkeypatch, broker=None, calls=[]) as served:
        base = str(served.client.make_url("")).rstrip("/")
        form = [*headers, ("Content-Type", b"application/x-www-form-urlencoded")]
        with caplog.at_level(logging.ERROR):
            for path in ("/dashboard/login", "/dashboard/logout"):
                answer = await raw_request(base, "POST", path, form, f"key={ADMIN_KEY}".encode())
                assert answer.status == 403, (path, answer.body)
                assert b"this site&#39;s own" in answer.body
                assert COOKIE.encode() not in answer.headers.get("Set-Cookie", "").encode()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
