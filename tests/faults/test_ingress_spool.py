"""The ingress killed (SIGKILL) with events spooled: they arrive after its restart.

The ingress starts while the broker is not there (the broker and everything behind it
start later), so every event of every call goes to the spool on disk; the process is
then killed outright, which runs no cleanup at all. What a second ingress process
finds in the spool must reach ClickHouse, each call exactly once.

What this cannot show: events still in the ingress's memory queue when it is killed
are lost by design (README, Never lose an event); the test kills it only once its
/healthz says the memory queue is empty, so it proves the spool, not the queue.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import MakeCluster
from tests.faults.harness import Cluster, until
from tests.faults.load import Load, compare

pytestmark = pytest.mark.faults

FEATURE = "ingress-spool"
CALLS = 60
EVENTS_PER_CALL = 2  # a request event and a response event


async def test_ingress_killed_with_events_spooled_delivers_them_after_restart(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster()
    await cluster.start("ingress", broker_up=False)
    load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
    try:
        await load.run(CALLS)
        assert load.failures == []  # no broker: still every call answered
        spooled = EVENTS_PER_CALL * CALLS

        async def all_spooled() -> bool:
            health = await cluster.ingress_health()
            return bool(health["events_spooled"] == spooled and health["events_backlog"] == 0)

        await until(all_spooled, f"{spooled} events in the spool", 30)
        health = await cluster.ingress_health()
        assert health["broker_connected"] is False
        assert health["events_published"] == 0 and health["events_dropped"] == 0
        assert health["spool_bytes"] > 0
        assert list(cluster.settings.spool_dir.glob("*.seg"))

        await cluster.kill("ingress")
        await cluster.start_all()  # broker (topics), store, worker, ingress: `up`'s order
        await until(
            lambda: _replayed(cluster, spooled), f"{spooled} events replayed from the spool", 60
        )
        await load.run(CALLS)  # and the restarted ingress serves new calls as usual
        assert load.failures == []
        await cluster.quiet()
        assert compare(load.sent, await cluster.calls_by_request(FEATURE)) == []
        health = await cluster.ingress_health()
        assert health["events_replayed"] == spooled and health["spool_bytes"] == 0
        assert health["events_dropped"] == 0
        assert list(cluster.settings.spool_dir.glob("*.seg")) == []
        assert cluster.dead() == []
    finally:
        await load.close()


async def _replayed(cluster: Cluster, count: int) -> bool:
    health = await cluster.ingress_health()
    return bool(health["events_replayed"] >= count)
