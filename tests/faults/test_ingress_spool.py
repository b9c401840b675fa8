"""The ingress killed (SIGKILL) with events spooled: they arrive after its restart.

The ingress starts while the broker is not there (the broker and everything behind it
start later), so every event of every call goes to the spool on disk; the process is
then killed outright, which runs no cleanup at all. What a second ingress process
finds in the spool must reach ClickHouse, each call exactly once.

What this cannot show: events still in the ingress's memory queue when it is killed
are lost by design (README, Never lose an event); the test kills it only once its
/healthz says the memory queue is empty, so it proves the spool, not the queue.

Killed in the middle of replaying a large segment, the ingress has noted as it went
how much of it was delivered: the next one replays only the rest.
"""

from __future__ import annotations

import pytest

from ingress.publisher import MAX_BATCH
from ingress.spool import Record, Spool
from tests.faults.conftest import MakeCluster
from tests.faults.harness import Cluster, until
from tests.faults.load import Load, compare
from tests.test_publisher import KEY, TOPIC, pings, read_all

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


async def test_ingress_killed_mid_replay_replays_only_what_followed_its_last_note(
    make_cluster: MakeCluster,
) -> None:
    """A segment of 100,000 events (as a stop spools them at most); the ingress killed
    once it has replayed two flights of it: the next ingress replays fewer than all of
    it again, and every event reaches the broker at least once. It replayed all of it
    again (a note was written only at a clean stop)."""
    cluster = await make_cluster()
    events = pings(0, 20 * MAX_BATCH)
    spool_dir = cluster.settings.spool_dir
    spool = Spool(spool_dir, max_bytes=1 << 30)
    assert spool.append([Record(TOPIC, KEY, e.model_dump_json().encode()) for e in events]) == 0
    spool.close()
    await cluster.start("ingress", broker_up=False)
    await cluster.start("broker")  # its replay starts once it connects

    async def two_flights_replayed() -> bool:
        health = await cluster.ingress_health()
        return bool(health["events_replayed"] >= 2 * MAX_BATCH)

    await until(two_flights_replayed, "two flights replayed", 60, every=0.02)
    await cluster.kill("ingress")
    assert list(spool_dir.glob("*.seg")), "killed too late: the replay was over"

    await cluster.start("ingress")
    await until(lambda: _replayed_all(cluster), "the rest of the segment replayed", 60)
    health = await cluster.ingress_health()
    assert 0 < health["events_replayed"] <= len(events) - MAX_BATCH  # not all again
    assert health["events_dropped"] == 0
    assert list(spool_dir.glob("*.seg")) == [] and list(spool_dir.glob("*.done")) == []
    got = await read_all(cluster.bootstrap, {e.event_id for e in events})
    assert {e.event_id for e in got} == {e.event_id for e in events}  # each at least once
    assert len(got) - len(events) < len(events)  # fewer than the segment sent twice
    assert cluster.dead() == []


async def _replayed_all(cluster: Cluster) -> bool:
    health = await cluster.ingress_health()
    return bool(health["events_replayed"] > 0 and health["spool_bytes"] == 0)
