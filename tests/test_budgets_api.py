"""GET /api/v1/analytics/budgets: every budget's current state, scoped by the caller's
key as the dashboard and the budget alerts are (sql/budgets.py's visible_budgets).

A real broker (Tansu) carries the budget states on ``llmtap.budgets`` as the stream
publishes them; the real app (the API and the dashboard, composed as sinks/app.py
composes them) follows the topic; keys are made in the key file as `llmtap keys create`
makes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import BudgetState, Reservations
from llmtap.kafka import Kafka
from llmtap.names import Names
from sinks.budget_seed import publish_states
from sql import analytics, auth, dashboard, params
from sql.budgets import BUDGET_BOOK, budget_rows, visible_budgets
from sql.params import Scope
from sql.store import Store
from stream.budgets import fresh, status_of
from tests.conftest import Broker
from tests.test_analytics import NOW
from tests.test_dashboard import budgets

ADMIN_KEY = "admin-key-for-budget-api-tests"
PATH = "/api/v1/analytics/budgets"


def configured(prefix: str) -> list[BudgetConfig]:
    """The dashboard tests' budgets (one unknown: no state is published for summarize;
    globex overspent), and one without a tenant: every tenant's calls, so admins only."""
    return [
        *budgets(prefix),
        BudgetConfig(
            name=f"{prefix}-everyone", scope="feature", value="search", limit_usd=Decimal(100)
        ),
    ]


SPENT = {  # budget (suffix) -> spent this period, as the stream would publish it
    "acme": Decimal("1.234567891234"),
    "search": Decimal("0.0215"),
    "globex": Decimal("0.100000000"),  # as the store's rebuild reads it from ClickHouse
    "everyone": Decimal("0"),
}


def state_of(budget: BudgetConfig, spent: Decimal) -> BudgetState:
    crossed = tuple(t for t in budget.thresholds if spent * 100 >= budget.limit_usd * t)
    return fresh(budget, NOW, NOW).model_copy(
        update={
            "spent_usd": spent,
            "crossed": crossed,
            "status": status_of(spent, budget.limit_usd, crossed),
        }
    )


@dataclass
class Api:
    client: TestClient[Any, Any]
    budgets: dict[str, BudgetConfig]  # suffix -> budget
    states: dict[str, BudgetState]  # suffix -> the state published
    keys: dict[str, str]

    async def get(self, key: str | None, expect: int = 200, **query: str) -> dict[str, Any]:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        async with self.client.get(PATH, params=query, headers=headers) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == expect, body
            return body

    async def rows(self, key: str, **query: str) -> dict[str, dict[str, Any]]:
        """The rows ``key`` sees, by budget suffix."""
        body = await self.get(self.keys[key], expect=200, **query)
        assert set(body) == {"data"}
        return {row["budget"].rsplit("-", 1)[1]: row for row in body["data"]}


@pytest.fixture
async def api(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: Broker
) -> AsyncIterator[Api]:
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    monkeypatch.setattr(auth, "KEY_RELOAD_S", 0.1)
    # The broker is the session's: names no other test publishes.
    budgets = configured(f"api-{uuid.uuid4().hex[:8]}")
    by_suffix = {b.name.rsplit("-", 1)[1]: b for b in budgets}
    states = {suffix: state_of(by_suffix[suffix], spent) for suffix, spent in SPENT.items()}
    await publish_states(Kafka(broker.bootstrap), list(states.values()))
    settings = Settings(
        data_dir=tmp_path,
        admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()],
        kafka_bootstrap=broker.bootstrap,
        budgets=budgets,
    )
    keys = {"admin": ADMIN_KEY}
    owners = {  # name: (tenant, team, user)
        "acme": ("acme", "", ""),
        "globex": ("globex", "", ""),
        "acme_search": ("acme", "search", ""),
        "acme_alice": ("acme", "search", "alice"),
    }
    for name, (tenant, team, user) in owners.items():
        keys[name], _ = create_key(settings.key_file, tenant=tenant, team=team, user=user)
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    dashboard.add_routes(app, settings)  # as sinks/app.py: it shares the API's book
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        published = {s.budget for s in states.values()}
        async with asyncio.timeout(30):  # the app has followed the topic to every state
            while set(app[BUDGET_BOOK].states) < published:
                await asyncio.sleep(0.05)
        yield Api(client, by_suffix, states, keys)


def at(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value)


async def test_an_admin_sees_every_budget_with_exact_decimal_strings(api: Api) -> None:
    rows = await api.rows("admin")
    assert list(rows) == ["acme", "search", "summarize", "globex", "everyone"]  # config order
    acme = rows["acme"]
    state = api.states["acme"]
    assert acme == {
        "budget": api.budgets["acme"].name,
        "scope": "tenant",
        "value": "acme",
        "tenant": "acme",
        "period": "month",
        "limit_usd": "5",
        "spent_usd": "1.234567891234",
        "remaining_usd": "3.765432108766",
        "used_percent": "24.7",
        "reserved_usd": None,
        "period_start": acme["period_start"],
        "period_end": acme["period_end"],
        "status": "ok",
        "hard_cap": True,
        "thresholds_crossed": [],
        "updated_at": acme["updated_at"],
    }
    assert at(acme["period_start"]) == state.period_start
    assert at(acme["period_end"]) == state.period_end == datetime(2026, 4, 1, tzinfo=NOW.tzinfo)
    assert at(acme["updated_at"]) == state.updated_at

    search = rows["search"]
    assert (search["tenant"], search["period"]) == ("acme", "day")
    assert (search["limit_usd"], search["spent_usd"], search["remaining_usd"]) == (
        "0.025", "0.0215", "0.0035",
    )  # fmt: skip
    assert (search["used_percent"], search["status"]) == ("86.0", "warning")
    assert search["thresholds_crossed"] == [50, 80]
    assert at(search["period_end"]) == datetime(2026, 3, 16, tzinfo=NOW.tzinfo)

    globex = rows["globex"]
    assert (globex["spent_usd"], globex["remaining_usd"], globex["used_percent"]) == (
        "0.1", "-0.02", "125.0",
    )  # fmt: skip
    assert (globex["status"], globex["thresholds_crossed"]) == ("exhausted", [50, 80, 100])

    everyone = rows["everyone"]
    assert everyone["tenant"] is None  # every tenant's calls
    assert (everyone["spent_usd"], everyone["remaining_usd"]) == ("0", "100")
    for row in rows.values():
        assert row["reserved_usd"] is None  # no ingress has announced what it holds
        for money in ("limit_usd", "spent_usd", "remaining_usd"):
            assert row[money] is None or isinstance(row[money], str)


async def test_a_budget_with_no_state_yet_is_unknown_never_zero(api: Api) -> None:
    unseen = (await api.rows("admin"))["summarize"]
    assert unseen["status"] == "unknown"
    assert unseen["limit_usd"] == "0.5"  # the configuration is known
    assert (unseen["tenant"], unseen["period"], unseen["hard_cap"]) == ("acme", "week", False)
    for name in (
        "spent_usd",
        "remaining_usd",
        "used_percent",
        "reserved_usd",
        "period_start",
        "period_end",
        "thresholds_crossed",
        "updated_at",
    ):
        assert unseen[name] is None, name


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("acme", ["acme", "search", "summarize"]),  # its tenant's, no tenant-less budget
        ("globex", ["globex"]),
        ("acme_search", ["search"]),  # a team-bound key: its team's budget only
        ("acme_alice", []),  # a user-bound key: no budget of user alice
    ],
)
async def test_a_virtual_key_sees_its_own_budgets(api: Api, key: str, expected: list[str]) -> None:
    rows = await api.rows(key)
    assert list(rows) == expected
    admin = await api.rows("admin")
    for suffix, row in rows.items():
        assert row == admin[suffix]  # the same numbers as the admin's


@pytest.mark.parametrize(
    ("tenant", "expected"),
    [
        ("acme", ["acme", "search", "summarize"]),
        ("globex", ["globex"]),
        ("initech", []),  # a tenant no budget is on
    ],
)
async def test_an_admin_naming_a_tenant_sees_what_its_key_sees(
    api: Api, tenant: str, expected: list[str]
) -> None:
    """As the alerts endpoint's ``tenant``: the budgets a key of that tenant, bound to no
    team or user, sees (not the tenantless one, which counts every tenant's calls)."""
    rows = await api.rows("admin", tenant=tenant)
    assert list(rows) == expected
    if tenant in api.keys:
        assert rows == await api.rows(tenant)
    # Empty: not narrowed, as the other endpoints read it.
    assert await api.rows("admin", tenant="") == await api.rows("admin")


@pytest.mark.parametrize("key", ["acme", "acme_search", "acme_alice"])
async def test_a_virtual_key_may_name_its_own_tenant_only(api: Api, key: str) -> None:
    own = await api.rows(key)
    assert await api.rows(key, tenant="acme") == own
    assert await api.rows(key, tenant="") == own
    refused = await api.get(api.keys[key], expect=403, tenant="globex")
    assert refused == {
        "error": {"message": "this key is bound to tenant 'acme': 'tenant' cannot be 'globex'",
                  "param": "tenant"}
    }  # fmt: skip
    # The very answer the alerts endpoint gives the same request.
    headers = {"Authorization": f"Bearer {api.keys[key]}"}
    alerts = PATH.replace("budgets", "alerts")
    async with api.client.get(alerts, params={"tenant": "globex"}, headers=headers) as response:
        assert response.status == 403
        assert await response.json() == refused


@pytest.mark.parametrize(
    "query", [{"range": "30d"}, {"team": "search"}, {"user_id": "alice"}, {"limit": "5"}]
)
async def test_a_stray_parameter_is_a_400_naming_it(api: Api, query: dict[str, str]) -> None:
    for key in ("admin", "acme_search"):
        body = await api.get(api.keys[key], expect=400, **query)
        [name] = query
        assert body["error"]["param"] == name
        assert repr(name) in body["error"]["message"]
        assert "this endpoint takes tenant" in body["error"]["message"]


async def test_without_a_key_it_is_a_401(api: Api) -> None:
    async with api.client.get(PATH) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in await response.json()
    await api.get("ltk_" + "x" * 43, expect=401)


async def test_reserved_is_what_the_live_ingresses_announce(
    api: Api, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three ingress processes announce on the real reservations topic: two live ones
    add up, one silent for more than three of its intervals is gone. Announced an hour
    after the other tests' clock (NOW), so they never see these as live."""
    later = NOW + timedelta(hours=1)
    monkeypatch.setattr(params, "utcnow", lambda: later)
    acme, search = api.budgets["acme"].name, api.budgets["search"].name
    tag = uuid.uuid4().hex[:8]
    announced = [
        Reservations(
            ingress_id=f"a-{tag}",
            at=later - timedelta(seconds=5),
            interval_s=10,
            held={acme: Decimal("0.3"), search: Decimal("0.001")},
        ),
        Reservations(
            ingress_id=f"b-{tag}",
            at=later - timedelta(seconds=1),
            interval_s=10,
            held={acme: Decimal("0.25")},
        ),
        Reservations(  # died 60 s ago without a word: 6 intervals missed
            ingress_id=f"c-{tag}",
            at=later - timedelta(seconds=60),
            interval_s=10,
            held={acme: Decimal("7")},
        ),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for event in announced:
            await producer.send_and_wait(
                Names().reservations,
                event.model_dump_json().encode(),
                key=event.ingress_id.encode(),
            )
    finally:
        await producer.stop()
    async with asyncio.timeout(30):
        while (rows := await api.rows("admin"))["acme"]["reserved_usd"] != "0.55":
            await asyncio.sleep(0.05)
    assert rows["search"]["reserved_usd"] == "0.001"
    assert rows["globex"]["reserved_usd"] == "0"  # hard-capped, nothing held
    assert rows["summarize"]["reserved_usd"] == "0"  # no hard cap: never anything held
    # A virtual key sees the same numbers for the budgets it may see.
    mine = await api.rows("acme_search")
    assert mine["search"]["reserved_usd"] == "0.001"
    # Two hours on, nobody has announced anything since: unknown, not 0.
    monkeypatch.setattr(params, "utcnow", lambda: later + timedelta(hours=1))
    assert {row["reserved_usd"] for row in (await api.rows("admin")).values()} == {None}


def test_a_budget_of_every_tenant_is_an_admin_s_even_for_a_key_of_no_tenant() -> None:
    """A team budget with no tenant counts every tenant's calls: no tenant's key sees
    it, not even one whose tenant is empty (a key file written by hand)."""
    budgets = [
        BudgetConfig(name="org-search", scope="team", value="search", limit_usd=Decimal(1)),
        BudgetConfig(
            name="acme-search", scope="team", value="search", tenant="acme", limit_usd=Decimal(1)
        ),
    ]

    def names(scope: Scope) -> list[str]:
        return [b.name for b in visible_budgets(budgets, scope)]

    assert names(Scope()) == ["org-search", "acme-search"]  # admin
    assert names(Scope(tenant="acme")) == ["acme-search"]
    assert names(Scope(tenant="")) == []


def test_a_state_published_while_the_name_was_anothers_is_unknown() -> None:
    """The topic is keyed by budget name: a state counting globex's calls, published
    before the name was given to acme's budget, is not acme's spend."""
    old = BudgetConfig(name="monthly", scope="tenant", value="globex", limit_usd=Decimal(100))
    new = BudgetConfig(name="monthly", scope="tenant", value="acme", limit_usd=Decimal(10))
    states = {"monthly": state_of(old, Decimal("81.5"))}
    for scope in (Scope(), Scope(tenant="acme")):
        [row] = budget_rows([new], states, scope, NOW)
        assert (row.value, row.state, row.status, row.spent_usd) == ("acme", None, "unknown", None)
    [row] = budget_rows([old], states, Scope(), NOW)  # its own owner's: shown
    assert row.spent_usd == Decimal("81.5")


def test_a_limit_changed_mid_period_is_shown_judged_by_the_new_one() -> None:
    """The state on the topic was counted under a limit of 100 (90 spent: 50% and 80%
    crossed, warning); the limit is now 1000. The endpoint and the dashboard show 9%
    used, ok, nothing crossed: not a warning with the old limit's thresholds. Lowered
    below the spend, exhausted with every threshold crossed."""
    old = BudgetConfig(name="monthly", scope="tenant", value="acme", limit_usd=Decimal(100))
    states = {"monthly": state_of(old, Decimal("90"))}
    assert (states["monthly"].status, states["monthly"].crossed) == ("warning", (50, 80))
    raised = old.model_copy(update={"limit_usd": Decimal(1000)})
    [row] = budget_rows([raised], states, Scope(), NOW)
    shown = (row.limit_usd, row.spent_usd, row.used_percent, row.status, row.thresholds_crossed)
    assert shown == (Decimal(1000), Decimal(90), Decimal("9.0"), "ok", [])
    lowered = old.model_copy(update={"limit_usd": Decimal(80)})
    [row] = budget_rows([lowered], states, Scope(), NOW)
    assert (row.status, row.thresholds_crossed) == ("exhausted", [50, 80, 100])
