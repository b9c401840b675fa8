"""ClickHouse writes failing for a while, then the store process killed mid-load:
nothing dropped, nothing written twice, the backlog drains after.

How writes are made to fail, with no hook in llmtap: chDB runs inside the store
process, so it cannot be taken down on its own; instead the directory of the
``calls`` table is made immutable (``chattr +i``, root on ext4/xfs). Reads keep
working (the writer's duplicate check, the SQL endpoint), every insert fails inside
ClickHouse with a filesystem error, exactly like a full or broken disk. The store's
``/healthz`` counts the failed writes, so the test knows they happened.

Then the store process is SIGKILLed while calls go on, and started again: the writer
restarts from its last committed offsets, so what it had written but not committed is
read again, and the duplicate check must keep it from being written twice; an insert
the kill cut short (in `calls`, not in every rollup view) must be repeated exactly
(sinks/clickhouse/replay.py), so the rollups count every call once.

What this cannot show: a ClickHouse *server* that refuses connections (the embedded
store has none); the writer's reaction to that is the same retry loop, tested in
tests/test_clickhouse_writer.py.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faults.conftest import MakeCluster
from tests.faults.harness import Cluster, until
from tests.faults.load import Load, compare

pytestmark = pytest.mark.faults

FEATURE = "store-faults"


def calls_table_dir(cluster: Cluster) -> Path:
    """Where chDB keeps the ``calls`` table (an Atomic database links it by name)."""
    return (cluster.data_dir / "clickhouse" / "data" / "default" / "calls").resolve()


def chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False)
    return done.returncode == 0


async def rollup_requests(cluster: Cluster) -> int:
    rows = await cluster.sql(
        f"SELECT sum(requests) AS n FROM analytics_by_team_daily WHERE feature = '{FEATURE}'"
    )
    return int(rows[0]["n"] or 0)


async def test_failing_clickhouse_writes_then_a_killed_store_lose_and_repeat_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster()
    await cluster.start_all()
    load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
    try:
        await load.run(30)
        await cluster.quiet()
        assert compare(load.sent, await cluster.calls_by_request(FEATURE)) == []

        # 1. Every insert into `calls` fails for a while; calls go on meanwhile.
        table = calls_table_dir(cluster)
        failures_before = (await cluster.store_health())["write_failures"]
        if not chattr("+i", table):
            pytest.skip("cannot make a directory immutable here (chattr needs root, ext4/xfs)")
        stop = asyncio.Event()
        try:
            driving = asyncio.create_task(load.run_until(stop, lanes=3, pause_s=0.02))

            async def failed_twice() -> bool:
                health = await cluster.store_health()
                return bool(health["write_failures"] >= failures_before + 2)

            await until(failed_twice, "two failed ClickHouse writes", 30)
            stored_while_failing = len(await cluster.calls_by_request(FEATURE))
        finally:
            chattr("-i", table)
        stop.set()
        await driving
        assert load.failures == []
        assert stored_while_failing == 30  # nothing written while the writes failed...
        await cluster.quiet()  # ...and all of it once they work again
        assert compare(load.sent, await cluster.calls_by_request(FEATURE)) == []
        assert await rollup_requests(cluster) == len(load.sent)

        # 2. The store process killed mid-load, then started again.
        stop = asyncio.Event()
        driving = asyncio.create_task(load.run_until(stop, lanes=3, pause_s=0.02))
        written = (await cluster.store_health())["rows_written"]

        async def writing() -> bool:
            return bool((await cluster.store_health())["rows_written"] >= written + 20)

        await until(writing, "the writer writing under load", 30)
        await cluster.kill("store")
        calls_before = len(load.sent)
        await until(
            lambda: _made_calls(load, calls_before + 20), "calls while the store is down", 30
        )
        await cluster.start("store")
        stop.set()
        await driving
        assert load.failures == []
        await cluster.quiet()
        assert compare(load.sent, await cluster.calls_by_request(FEATURE)) == []
        assert await rollup_requests(cluster) == len(load.sent)
        assert (await cluster.store_health())["inserts_lost"] == 0
        assert cluster.dead() == []
    finally:
        await load.close()


async def _made_calls(load: Load, count: int) -> bool:
    return len(load.sent) >= count
