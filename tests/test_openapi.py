"""The OpenAPI document matches the API: its parameters are params.py's, and
schemathesis, driving the real app on a real chDB store from the served document,
finds no 500 and no response that breaks the document (status, content type,
headers, body schema), for valid and for invalid inputs."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import Reservations
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sinks.webhooks.records import store_batch
from sql import analytics, openapi, params, sqlapi, sqlguard
from sql.budgets import BUDGET_BOOK, RESERVATION_BOOK
from sql.store import Store
from stream.budgets import fresh
from tests.fake_provider import free_port
from tests.test_analytics import NOW, Call, alert

ADMIN_KEY = "admin-key-for-openapi-tests"
H = timedelta(hours=1)
CALLS = [
    Call(1 * H, "gpt-4o", "openai", "alice", "search", tenant="acme", cost=("0.001", "0.002"),
         ttft_ms=20, properties={"customer": "c1"}),
    Call(30 * H, "claude-3-5-sonnet", "anthropic", "bob", "ads", tenant="acme",
         status="upstream_error", cost=("0", "0")),
    Call(10 * 24 * H, "llama-3-70b", "groq", "zed", "core", tenant="globex", cost=None),
]  # fmt: skip
BUDGETS = [
    BudgetConfig(name="acme-monthly", scope="tenant", value="acme", limit_usd=Decimal("5")),
    BudgetConfig(  # no state seen: unknown
        name="search-daily", scope="team", value="search", tenant="acme", period="day",
        limit_usd=Decimal("0.025"),
    ),
]  # fmt: skip
ALERTS = [
    alert("cost-spike", 1 * H),
    alert("acme-monthly", 2 * H, alert_type="budget", state="firing", severity="critical"),
]


# -- the document against the code ------------------------------------------------------


def test_every_endpoint_is_documented_with_its_parameters() -> None:
    doc = openapi.document()
    analytics_paths = {p for p in doc["paths"] if p.startswith("/api/v1/analytics/")}
    assert analytics_paths == {f"/api/v1/analytics/{name}" for name in analytics.ROUTES}
    assert set(params.EXTRA) == set(analytics.ROUTES)
    for name in analytics.ROUTES:
        operation = doc["paths"][f"/api/v1/analytics/{name}"]["get"]
        documented = [p["name"] for p in operation["parameters"]]
        assert documented == list(params.parameters(name)), name
        # Every endpoint may be narrowed to a tenant: those over calls, alerts and budgets.
        assert "tenant" in documented, name
        assert {"200", "400", "401"} <= set(operation["responses"])
        # A 403 is a tenant, team or user filter outside the key's.
        assert "403" in operation["responses"], name
        # Only the endpoints that take a range can reach back past the retention.
        too_far = "range" in operation["responses"]["400"]["description"]
        assert too_far == ("range" in documented), name
    budgets = doc["paths"]["/api/v1/analytics/budgets"]["get"]["parameters"]
    alerts = doc["paths"]["/api/v1/analytics/alerts"]["get"]["parameters"]
    [tenant] = [p for p in budgets if p["name"] == "tenant"]
    [like] = [p for p in alerts if p["name"] == "tenant"]
    assert {**tenant, "description": ""} == {**like, "description": ""}  # as alerts' is
    assert "budgets a key of this tenant" in tenant["description"]
    assert "else 403" in tenant["description"]
    assert set(doc["paths"]["/api/v1/sql"]["post"]["responses"]) >= {"200", "400", "401", "403"}


def test_enums_and_ranges_are_the_ones_checked() -> None:
    parameters = openapi.PARAMETERS
    assert parameters["range"]["schema"]["enum"] == list(params.RANGES)
    assert parameters["range"]["schema"]["default"] == params.DEFAULT_RANGE
    for name in params.WINDOW:  # an explicit window instead: times with an offset
        assert parameters[name]["schema"] == {"type": "string", "format": "date-time"}
    assert parameters["granularity"]["schema"]["enum"] == list(params.GRANULARITIES)
    limit = parameters["limit"]["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (
        params.LIMIT_MIN, params.LIMIT_MAX, params.DEFAULT_LIMIT,
    )  # fmt: skip
    import re

    pattern = re.compile(parameters["group_by"]["schema"]["pattern"])
    for good in (*params.GROUP_BY, "property:customer", "property:" + "a" * 64):
        assert pattern.match(good), good
    for bad in ("colour", "property:", "property:bad name", "property:" + "a" * 65):
        assert not pattern.match(bad), bad
    limits = sqlguard.SqlLimits()
    body = openapi.document(limits)["components"]["schemas"]["SqlRequest"]["properties"]
    assert body["max_rows"]["maximum"] == limits.max_rows
    assert body["format"]["enum"] == list(sqlapi.FORMATS)


# -- schemathesis against the served app ------------------------------------------------


@pytest.fixture
def served(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The real app on the real store, served from a thread with its own event loop (the
    schemathesis test is synchronous), its clock at the data's NOW; yields the base URL."""
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    assert write_batch(store, Batch(events=[c.event() for c in CALLS])) == len(CALLS)
    store_batch(store, ALERTS, [], [])
    settings_ = Settings(
        data_dir=tmp_path,
        admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()],
        # No broker: the budget follower retries in the background; one state is put in
        # the book directly below, the other budget stays unknown.
        kafka_bootstrap="127.0.0.1:9",
        budgets=BUDGETS,
    )
    create_key(settings_.key_file, tenant="acme")
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings_, sql_limits=LIMITS)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="api-under-test", daemon=True)
    thread.start()
    assert ready.wait(30), "the app did not start"
    state = fresh(BUDGETS[0], NOW, NOW).model_copy(update={"spent_usd": Decimal("0.003")})

    held = Reservations(
        ingress_id="ingress-1", at=NOW, interval_s=60, held={BUDGETS[0].name: Decimal("0.0004")}
    )

    async def seed() -> None:
        app[BUDGET_BOOK].update(state)
        app[RESERVATION_BOOK].update(held)

    asyncio.run_coroutine_threadsafe(seed(), loop).result(30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


# The document as the app builds it (pytest 9 breaks schemathesis's lazy fixture loader):
# test_the_served_document_is_this_one checks the app serves exactly this.
LIMITS = sqlguard.SqlLimits(timeout_s=5)
DOCUMENT = openapi.document(LIMITS)
schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=25,
    # The key is sent by the test (an admin's); the ignored_auth check tries without it.
    with_security_parameters=False,
)


def test_the_served_document_is_this_one(served: str) -> None:
    response = requests.get(f"{served}/api/v1/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_keeps_its_contract(case: schemathesis.Case[Any], served: str) -> None:
    # A generated string is rarely a query ClickHouse accepts: valid bodies may get a 400
    # there; nor is a generated window (`start`, `end`) often one the API answers: not
    # with `range`, after `start`, from a start the store keeps (a schema cannot say
    # that). Everywhere else, input the document calls valid must succeed.
    window = any(name in (case.query or {}) for name in params.WINDOW)
    excluded: list[schemathesis.CheckFunction] = (
        [positive_data_acceptance] if case.path == "/api/v1/sql" or window else []
    )
    try:
        case.call_and_validate(
            base_url=served,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            excluded_checks=excluded,
            timeout=30,
        )
    except FailureGroup as group:
        if not all(too_large(failure) for failure in group.exceptions):
            raise


def too_large(failure: BaseException) -> bool:
    """A generated body past the SQL endpoint's 1 MiB limit, refused with the 413 meant
    for it (`too_long`), which schemathesis's negative-data check does not list
    (ST201: it expects a 400 or 422)."""
    return getattr(failure, "code", None) == "ST201" and getattr(failure, "status_code", 0) == 413
