"""Who sees what on the analytics API: admin keys every tenant, a virtual key its own
tenant (and its team and user when it is bound to them), no key nothing (401).

A real chDB store with calls of two tenants, the real aiohttp app, and keys made in the
key file as `llmtap keys create` makes them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ingress.guards.keys import create_key, revoke_key
from llmtap.config import Settings
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sql import analytics, auth, params
from sql.store import Store
from tests.raw_http import raw_request
from tests.test_analytics import NOW, Call

ADMIN_KEY = "admin-key-for-auth-tests"
H = timedelta(hours=1)

CALLS = [
    Call(1 * H, "gpt-4o", "openai", "alice", "search", tenant="acme", cost=("0.001", "0.002")),
    Call(2 * H, "gpt-4o", "openai", "bob", "search", tenant="acme", cost=("0.003", "0.004")),
    Call(3 * H, "claude-3-5-sonnet", "anthropic", "carol", "ads", tenant="acme"),
    # Another tenant, with a user and a team of the same names as acme's.
    Call(4 * H, "gpt-4o", "openai", "alice", "search", tenant="globex", cost=("0.1", "0.2")),
    Call(5 * H, "llama-3-70b", "groq", "zed", "core", tenant="globex", cost=None),
]


@dataclass
class Api:
    client: TestClient[Any, Any]
    key_file: Path
    keys: dict[str, str]  # name -> secret
    key_ids: dict[str, str]

    async def get(
        self, endpoint: str, key: str | None, expect: int = 200, **query: str
    ) -> dict[str, Any]:
        return await self.fetch(endpoint, key, query, expect)

    async def fetch(
        self, endpoint: str, key: str | None, query: dict[str, str], expect: int = 200
    ) -> dict[str, Any]:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        async with self.client.get(
            f"/api/v1/analytics/{endpoint}", params=query, headers=headers
        ) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == expect, body
            return body


@pytest.fixture
async def api(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    monkeypatch.setattr(auth, "KEY_RELOAD_S", 0.1)
    assert write_batch(store, Batch(events=[c.event() for c in CALLS])) == len(CALLS)
    settings = Settings(
        data_dir=tmp_path, admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]
    )
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
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Api(client, settings.key_file, keys, ids)


def requests_of(tenant: str | None = None, **where: str) -> int:
    return sum(
        (tenant is None or c.tenant == tenant) and all(getattr(c, k) == v for k, v in where.items())
        for c in CALLS
    )


# -- 401 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer not-a-key",
        "Basic " + ADMIN_KEY,  # the right secret, the wrong scheme
        "Bearer " + hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),  # the digest is not a key
        "Bearer ltk_" + "x" * 43,
    ],
)
async def test_without_a_known_key_every_endpoint_is_401(
    api: Api, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    requests = [("GET", f"/api/v1/analytics/{name}") for name in analytics.ROUTES]
    requests.append(("POST", "/api/v1/sql"))
    for method, path in requests:
        async with api.client.request(
            method, path, headers=headers, json={"query": "SELECT 1"}
        ) as response:
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            body = await response.json()
        assert body["error"]["param"] is None
        assert "key" in body["error"]["message"]


@pytest.mark.parametrize("token", [b"\xff", b"ltk_\xff\xfe", ADMIN_KEY.encode() + b"\xe9"])
async def test_a_key_that_is_not_utf8_is_401(api: Api, token: bytes) -> None:
    """Hashing it raised: aiohttp's bare text 500 on every endpoint. It is an unknown key."""
    base = str(api.client.make_url("")).rstrip("/")
    requests = [("GET", f"/api/v1/analytics/{name}") for name in analytics.ROUTES]
    requests.append(("POST", "/api/v1/sql"))
    for method, path in requests:
        answer = await raw_request(
            base,
            method,
            path,
            [("Authorization", b"Bearer " + token), ("Content-Type", b"application/json")],
            b'{"query": "SELECT 1"}',
        )
        assert answer.status == 401, (path, answer.body)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "key" in answer.json()["error"]["message"]


async def test_the_openapi_document_needs_no_key(api: Api) -> None:
    async with api.client.get("/api/v1/openapi.json") as response:
        assert response.status == 200
        assert (await response.json())["openapi"].startswith("3.1")


async def test_the_scheme_is_case_insensitive(api: Api) -> None:
    headers = {"Authorization": f"bearer {ADMIN_KEY}"}
    async with api.client.get("/api/v1/analytics/usage", headers=headers) as response:
        assert response.status == 200


# -- admin and tenant scope -------------------------------------------------------------


async def test_an_admin_key_sees_every_tenant(api: Api) -> None:
    body = await api.get("usage", ADMIN_KEY, range="24h")
    assert body["totals"]["requests"] == len(CALLS)


def rows_of(body: dict[str, Any], key: str = "key") -> list[tuple[Any, ...]]:
    return [(r[key], r["tenant"], r["requests"], r["cost"]) for r in body["data"]]


async def test_an_admin_sees_each_tenants_teams_users_and_features_apart(api: Api) -> None:
    """Teams, users and features exist within their tenant: globex's team `search` and
    user `alice` are not acme's, and an admin's rows keep them apart, saying whose."""
    users = await api.get("users", ADMIN_KEY, range="24h")
    assert rows_of(users, "user") == [
        ("alice", "globex", 1, "0.300000000"),
        ("bob", "acme", 1, "0.007000000"),
        ("alice", "acme", 1, "0.003000000"),
        ("carol", "acme", 1, "0.000000000"),
        ("zed", "globex", 1, None),  # unpriced: unknown, last
    ]
    teams = await api.get("costs", ADMIN_KEY, range="24h", group_by="team")
    assert rows_of(teams) == [
        ("search", "globex", 1, "0.300000000"),
        ("search", "acme", 2, "0.010000000"),
        ("ads", "acme", 1, "0.000000000"),
        ("core", "globex", 1, None),
    ]
    by_user = await api.get("costs", ADMIN_KEY, range="24h", group_by="user")
    assert [(k, t, n) for k, t, n, _ in rows_of(by_user)] == [
        (k, t, n) for k, t, n, _ in rows_of(users, "user")
    ]
    features = await api.get("costs", ADMIN_KEY, range="24h", group_by="feature")
    assert rows_of(features) == [
        ("chat", "globex", 2, "0.300000000"),
        ("chat", "acme", 3, "0.010000000"),
    ]
    # A property's values too (here every call lacks it: one '' group per tenant).
    props = await api.get("costs", ADMIN_KEY, range="24h", group_by="property:customer")
    assert rows_of(props) == [("", "globex", 2, "0.300000000"), ("", "acme", 3, "0.010000000")]
    # Models are every tenant's: one row each, of no one tenant.
    models = await api.get("costs", ADMIN_KEY, range="24h", group_by="model")
    assert rows_of(models)[0] == ("gpt-4o", None, 3, "0.310000000")


async def test_spend_per_tenant(api: Api) -> None:
    body = await api.get("costs", ADMIN_KEY, range="24h", group_by="tenant")
    assert body["group_by"] == "tenant"
    assert rows_of(body) == [
        ("globex", "globex", 2, "0.300000000"),
        ("acme", "acme", 3, "0.010000000"),
    ]
    for tenant in ("acme", "globex"):
        mine = await api.get("costs", api.keys[tenant], range="24h", group_by="tenant")
        assert [(r["key"], r["requests"]) for r in mine["data"]] == [(tenant, requests_of(tenant))]


async def test_an_admin_may_filter_by_tenant(api: Api) -> None:
    for tenant in ("acme", "globex"):
        usage = await api.get("usage", ADMIN_KEY, range="24h", tenant=tenant)
        assert usage["totals"]["requests"] == requests_of(tenant)
        users = await api.get("users", ADMIN_KEY, range="24h", tenant=tenant)
        assert {(r["user"], r["tenant"]) for r in users["data"]} == {
            (c.user, tenant) for c in CALLS if c.tenant == tenant
        }
        models = await api.get("costs", ADMIN_KEY, range="24h", group_by="model", tenant=tenant)
        assert {r["tenant"] for r in models["data"]} == {tenant}
        assert sum(r["requests"] for r in models["data"]) == requests_of(tenant)
    # Empty: every tenant, as for the other filters.
    assert (await api.get("usage", ADMIN_KEY, tenant=""))["totals"]["requests"] == len(CALLS)
    nobody = await api.get("users", ADMIN_KEY, range="24h", tenant="initech")
    assert nobody["data"] == []


@pytest.mark.parametrize("tenant", ["acme", "globex"])
async def test_a_virtual_key_sees_only_its_tenant(api: Api, tenant: str) -> None:
    key = api.keys[tenant]
    mine = [c for c in CALLS if c.tenant == tenant]

    usage = await api.get("usage", key, range="24h")
    assert usage["totals"]["requests"] == len(mine)
    assert {(r["model"], r["provider"]) for r in usage["data"]} == {
        (c.model, c.provider) for c in mine
    }
    models = await api.get("models", key, range="24h")
    assert sum(r["requests"] for r in models["data"]) == len(mine)
    providers = await api.get("providers", key, range="24h")
    assert {r["provider"] for r in providers["data"]} == {c.provider for c in mine}
    for group_by in ("team", "user", "feature", "model", "day"):
        rows = (await api.get("costs", key, range="24h", group_by=group_by))["data"]
        assert sum(r["requests"] for r in rows) == len(mine)
        assert {r["tenant"] for r in rows} == {tenant}  # its own, even by model or day
    teams = await api.get("costs", key, range="24h", group_by="team")
    assert {r["key"] for r in teams["data"]} == {c.team for c in mine}
    users = await api.get("users", key, range="24h")
    assert {(r["user"], r["tenant"]) for r in users["data"]} == {(c.user, tenant) for c in mine}
    series = await api.get("timeseries", key, range="24h")
    assert sum(r["requests"] for r in series["data"]) == len(mine)
    performance = await api.get("performance", key, range="24h")
    assert performance["data"]["requests"] == len(mine)


@pytest.mark.parametrize(
    ("endpoint", "query"),
    [
        ("usage", {"provider": "openai"}),
        ("usage", {"team": "search"}),
        ("usage", {"user_id": "alice"}),
        ("usage", {"model_id": "gpt-4o"}),
        ("usage", {"provider": "groq"}),
        ("usage", {"team": "core", "env": "prod"}),
    ],
)
async def test_filters_never_reach_past_the_tenant(
    api: Api, endpoint: str, query: dict[str, str]
) -> None:
    """Asking for another tenant's provider, team or user gives this tenant's share."""
    where = {{"user_id": "user", "model_id": "model"}.get(k, k): v for k, v in query.items()}
    for tenant in ("acme", "globex"):
        body = await api.fetch(endpoint, api.keys[tenant], {"range": "24h", **query})
        assert body["totals"]["requests"] == requests_of(tenant, **where), (tenant, query)
    admin = await api.fetch(endpoint, ADMIN_KEY, {"range": "24h", **query})
    assert admin["totals"]["requests"] == requests_of(None, **where)


@pytest.mark.parametrize("key", ["acme", "acme_search", "acme_alice"])
async def test_a_virtual_key_asking_for_another_tenant_is_403(api: Api, key: str) -> None:
    """As for a team or user it is bound to: another tenant is refused, naming it."""
    refused = await api.get("usage", api.keys[key], expect=403, tenant="globex")
    assert refused["error"]["param"] == "tenant"
    assert "bound to tenant 'acme'" in refused["error"]["message"]
    mine = await api.get("usage", api.keys[key], range="24h", tenant="acme")
    alone = await api.get("usage", api.keys[key], range="24h")
    assert mine["totals"] == alone["totals"]


# -- keys bound to a team or a user -----------------------------------------------------


async def test_a_team_key_sees_its_team(api: Api) -> None:
    key = api.keys["acme_search"]
    body = await api.get("usage", key, range="24h")
    assert body["totals"]["requests"] == requests_of("acme", team="search") == 2
    assert (await api.get("usage", key, range="24h", team="search"))["totals"]["requests"] == 2
    users = await api.get("users", key, range="24h")
    assert sorted(r["user"] for r in users["data"]) == ["alice", "bob"]
    refused = await api.get("usage", key, expect=403, team="ads")
    assert refused["error"]["param"] == "team"
    assert "bound to team 'search'" in refused["error"]["message"]


async def test_a_user_key_sees_only_that_users_calls(api: Api) -> None:
    """A developer's key shows that developer's usage: not a teammate's, and not the
    same user name in another tenant."""
    key = api.keys["acme_alice"]
    body = await api.get("usage", key, range="24h")
    assert body["totals"]["requests"] == 1
    assert body["totals"]["cost"] == "0.003000000"
    users = await api.get("users", key, range="24h")
    assert [r["user"] for r in users["data"]] == ["alice"]
    costs = await api.get("costs", key, range="24h", group_by="user")
    assert [(r["key"], r["requests"]) for r in costs["data"]] == [("alice", 1)]
    assert (await api.get("usage", key, user_id="alice"))["totals"]["requests"] == 1
    refused = await api.get("usage", key, expect=403, user_id="bob")
    assert refused["error"]["param"] == "user_id"


# -- the key file changes ---------------------------------------------------------------


async def wait_for_status(api: Api, key: str, status: int) -> None:
    async with asyncio.timeout(10):
        while True:
            headers = {"Authorization": f"Bearer {key}"}
            async with api.client.get("/api/v1/analytics/usage", headers=headers) as response:
                if response.status == status:
                    return
            await asyncio.sleep(0.05)


async def test_a_revoked_key_is_401_once_the_file_is_reread(api: Api) -> None:
    key = api.keys["globex"]
    await api.get("usage", key)
    assert revoke_key(api.key_file, api.key_ids["globex"]).changed
    await wait_for_status(api, key, 401)
    await api.get("usage", api.keys["acme"])  # the others still work


async def test_a_new_key_works_without_a_restart(api: Api) -> None:
    secret, _ = create_key(api.key_file, tenant="globex", user="zed")
    await wait_for_status(api, secret, 200)
    body = await api.get("users", secret, range="24h")
    assert [r["user"] for r in body["data"]] == ["zed"]


async def test_a_key_made_a_moment_ago_is_known_at_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script that makes a key and asks with it straight away gets its answer, not a
    401 until the next periodic reload (an hour away here): a key not known sends the
    API to the file first, when it changed."""
    monkeypatch.setattr(auth, "KEY_RELOAD_S", 3600.0)
    settings = Settings(data_dir=tmp_path)
    create_key(settings.key_file, tenant="acme")  # read as the app starts
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:

        async def status(secret: str) -> int:
            headers = {"Authorization": f"Bearer {secret}"}
            async with client.get("/api/v1/analytics/usage", headers=headers) as response:
                return response.status

        secret, _ = create_key(settings.key_file, tenant="globex")
        assert await status(secret) == 200
        assert await status("ltk_not-a-real-key") == 401  # the file unchanged: one stat
        assert not await app[auth.AUTH].keys.refreshed()


# -- SQL is for admins ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["acme", "acme_alice"])
async def test_sql_with_a_virtual_key_is_403(api: Api, key: str) -> None:
    headers = {"Authorization": f"Bearer {api.keys[key]}"}
    async with api.client.post(
        "/api/v1/sql", json={"query": "SELECT count() FROM calls"}, headers=headers
    ) as response:
        assert response.status == 403
        message = (await response.json())["error"]["message"]
    assert "admin" in message and "tenant" in message


def test_keys_admin_prints_a_key_and_the_digest_to_configure(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli: Callable[[list[str]], int],
) -> None:
    monkeypatch.setenv("LLMTAP_DATA_DIR", str(tmp_path))
    assert cli(["keys", "admin"]) == 0
    printed = capsys.readouterr().out
    secret = printed.splitlines()[0]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert secret.startswith("lta_") and len(secret) > 40
    assert f"admin_key_hashes: [{digest}]" in printed
    # What it prints is what the setting accepts, and nothing is written to disk.
    assert Settings(admin_key_hashes=[digest]).admin_key_hashes == [digest]
    assert not any(tmp_path.iterdir())
