"""One caller of the API cannot hold up the others, or the store's writer: a key has at
most ``api_requests_per_key`` requests in flight (429 past it), the store's reads run
on its own reader threads, a few at a time, on a handle of their own (the writer does
not wait for one), and a read past its time limit is a clear 503. A real chDB store
and the real aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from clickhouse_connect.driver.exceptions import ClickHouseError
from prometheus_client import generate_latest

from ingress.guards.keys import create_key
from llmtap.config import Settings
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sinks.metrics import store_registry
from sql import analytics, params
from sql import store as sql_store
from sql.admission import ADMISSION
from sql.store import READ_SETTINGS, READERS, Handle, Store, named_rows
from tests.test_analytics import NOW, Call

ADMIN_KEY = "admin-key-for-load-tests"
CALLS = [Call(NOW - NOW.replace(hour=0), "gpt-4o", "openai", "alice", "search", tenant="acme")]


@contextlib.contextmanager
def store_held(store: Store) -> Iterator[None]:
    """The store's reads busy (their handle's lock held, as a long read holds it)."""
    with store._reads.lock:
        yield


def reader_threads(store: Store) -> list[threading.Thread]:
    """The store's reader threads (named after it: not another test's store's)."""
    return [t for t in threading.enumerate() if t.name.startswith(f"store-read-{id(store):x}_")]


async def until(condition: Any) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def app_client(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[web.Application, TestClient[Any, Any], dict[str, str]]]:
    monkeypatch.setattr(params, "utcnow", lambda: NOW)
    assert write_batch(store, Batch(events=[c.event() for c in CALLS])) == len(CALLS)
    settings = Settings(
        data_dir=tmp_path,
        admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()],
        api_requests_per_key=2,
    )
    made = {name: create_key(settings.key_file, tenant="acme") for name in ("a", "b")}
    keys = {name: secret for name, (secret, _) in made.items()}
    keys.update({f"{name} id": record.id for name, (_, record) in made.items()})
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield app, client, keys


async def models(client: TestClient[Any, Any], key: str) -> tuple[int, dict[str, Any], str]:
    async with client.get(
        "/api/v1/analytics/models", headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json(), response.headers.get("Retry-After", "")


async def test_a_key_past_its_requests_in_flight_is_429_and_others_are_served(
    app_client: tuple[web.Application, TestClient[Any, Any], dict[str, str]], store: Store
) -> None:
    app, client, keys = app_client
    admission = app[ADMISSION]
    with store_held(store):
        held = [asyncio.create_task(models(client, keys["a"])) for _ in range(2)]
        await until(lambda: admission.in_flight(keys["a id"]) == 2)
        status, body, retry_after = await models(client, keys["a"])  # a third: at once
        assert (status, body["error"]["code"], retry_after) == (429, "too_many_requests", "1")
        assert "2 requests in flight" in body["error"]["message"]
        other = asyncio.create_task(models(client, keys["b"]))  # another key: taken
        await until(lambda: admission.in_flight(keys["b id"]) == 1)
        metrics = generate_latest(store_registry(lambda: None, lambda: None, lambda: admission))
        assert b"llmtap_api_requests_refused_total 1.0" in metrics
        assert b"llmtap_api_requests_in_flight 3.0" in metrics
    answers = await asyncio.gather(*held, other)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert answers[0][1]["data"][0]["model"] == "gpt-4o"
    assert admission.in_flight(keys["a id"]) == admission.in_flight(keys["b id"]) == 0
    assert (await models(client, keys["a"]))[0] == 200  # its places are given back


async def test_reads_queue_on_the_stores_own_threads_a_few_at_a_time(store: Store) -> None:
    """Reads do not take the event loop's default executor, where the writer's inserts
    run (a hundred queued reads would make an insert wait for all of them)."""
    loop = asyncio.get_running_loop()
    with store_held(store):
        reads = [asyncio.create_task(store.arows("SELECT 1 AS one")) for _ in range(READERS + 3)]
        await until(lambda: len(reader_threads(store)) == READERS)
        # the default executor is free: an insert would not wait for them
        assert await loop.run_in_executor(None, lambda: "free") == "free"
        assert len(reader_threads(store)) == READERS and not any(r.done() for r in reads)
    assert [rows for rows in await asyncio.gather(*reads)] == [[{"one": 1}]] * (READERS + 3)


async def test_a_read_past_its_time_limit_or_a_failing_store_is_a_503_that_says_so(
    app_client: tuple[web.Application, TestClient[Any, Any], dict[str, str]],
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, client, keys = app_client
    monkeypatch.setattr(sql_store, "READ_SETTINGS", {**READ_SETTINGS, "max_execution_time": 0.2})
    slow = "SELECT sleepEachRow(0.05) FROM numbers(100) SETTINGS max_block_size = 1"
    with pytest.raises(ClickHouseError) as raised:
        await store.arows(slow)  # the API's reads are stopped at READ_SETTINGS' limit
    message, code = analytics.store_problem(raised.value)
    assert code == "timeout" and "took longer than 30 s" in message
    store.command("RENAME TABLE calls TO calls_gone")  # a store that cannot answer
    status, body, _ = await models(client, keys["a"])
    assert (status, body["error"]["code"]) == (503, "store_unavailable")


MARKER = "a slow read for the writer test"
# 20 s, a row every half second (each block a row: sleepEachRow's limit is per block),
# inside READ_SETTINGS' 30 s.
SLOW_READ = (
    f"SELECT sleepEachRow(0.5) AS slept, '{MARKER}' AS marker"
    " FROM numbers(40) SETTINGS max_block_size = 1"
)
THE_READ = "query_id != queryID() AND position(query, {marker:String}) > 0"
RUNNING = f"SELECT query_id FROM system.processes WHERE {THE_READ}"


async def test_the_writer_does_not_wait_for_a_running_read(store: Store) -> None:
    """An API read running (up to 30 s) holds up no insert of the writer's: the reads
    run on a handle of their own, not behind the writer's lock. Seen from a third
    handle, as ClickHouse lists its running queries."""
    watch = Handle(store.dsn, {})

    def running() -> list[str]:
        with watch.lock:
            return [r["query_id"] for r in named_rows(watch.client(), RUNNING, {"marker": MARKER})]

    read = asyncio.create_task(store.arows(SLOW_READ))
    try:
        await until(running)
        [query_id] = running()
        batch = Batch(events=[c.event() for c in CALLS])
        assert await asyncio.to_thread(write_batch, store, batch) == len(CALLS)
        # the read still running: the insert did not wait for it (it did: none, 20 s later)
        assert running() == [query_id] and not read.done()
    finally:
        with watch.lock:  # the read stopped now, not 20 s later
            watch.client().command(f"KILL QUERY WHERE {THE_READ} SYNC", {"marker": MARKER})
        with contextlib.suppress(ClickHouseError):
            await read
        watch.close()
