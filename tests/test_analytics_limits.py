"""The API's reads are bounded in memory, not only in time: chDB runs in the store
process, with the writer and the API, so a read grouping by a property of a million
values must neither crowd them out nor have the process killed. The limit is the SQL
endpoint's; a GROUP BY past half of it goes on on disk; a read past it is a 503 that
says what to do (``too_large``), logged as a warning, not an error. A real chDB store
and the real aiohttp app."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import ClickHouseError

from sql import analytics
from sql import store as sql_store
from sql.sqlguard import SqlLimits
from sql.store import READ_SETTINGS, Store
from tests.test_analytics import Call, H, admin_client

ADMIN_KEY = "admin-key-for-limit-tests"
CALLS = [
    Call(H * i, "gpt-4o", "openai", "alice", "search", properties={"request_id": f"r{i}"})
    for i in range(3)
]
MIB = 1024**2
# Four million groups: far more than 64 MiB of hash table.
GROUPS = (
    "SELECT count() AS groups FROM (SELECT number, count() FROM numbers(4000000) GROUP BY number)"
)


async def test_the_apis_reads_are_held_to_the_sql_endpoints_memory_limit(store: Store) -> None:
    (row,) = await store.arows(
        "SELECT getSetting('max_memory_usage') AS limit,"
        " getSetting('max_bytes_before_external_group_by') AS spill"
    )
    limit = SqlLimits().max_memory_bytes
    assert (row["limit"], row["spill"]) == (limit, limit // 2)  # was: (0, 0), none


async def test_a_group_by_past_half_the_limit_goes_on_on_disk(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = {**READ_SETTINGS, "max_memory_usage": 64 * MIB}
    monkeypatch.setattr(
        sql_store, "READ_SETTINGS", {**small, "max_bytes_before_external_group_by": 32 * MIB}
    )
    assert await store.arows(GROUPS) == [{"groups": 4_000_000}]
    monkeypatch.setattr(sql_store, "READ_SETTINGS", small)  # held in memory: too much
    with pytest.raises(ClickHouseError) as raised:
        await store.arows(GROUPS)
    message, code = analytics.store_problem(raised.value)
    assert code == "too_large" and message.endswith("narrow the range or the filters")


async def test_a_read_past_its_memory_limit_is_a_503_saying_to_narrow_it(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # every byte counted, none allowed: ClickHouse's own tests' way to fail any query
    tiny = {"max_memory_usage": 1, "max_untracked_memory": 0}
    caplog.set_level(logging.INFO, logger=analytics.__name__)
    query = {"range": "90d", "group_by": "property:request_id"}
    async with admin_client(store, tmp_path, CALLS, monkeypatch) as api:
        monkeypatch.setattr(sql_store, "READ_SETTINGS", {**READ_SETTINGS, **tiny})
        async with api.get("/api/v1/analytics/costs", params=query) as response:
            body = await response.json()
    assert (response.status, body["error"]["code"]) == (503, "too_large")  # was: store_unavailable
    assert body["error"]["message"] == (
        "the query needed more memory than a read may take (2 GiB): narrow the range or the filters"
    )
    logged = [r.levelno for r in caplog.records if r.name == analytics.__name__]
    assert logged == [logging.WARNING]  # was: ERROR
