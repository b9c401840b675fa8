"""The broker killed (SIGKILL) during load, and restarted.

The embedded broker is Tansu with memory storage (the only kinds this build of it has
are memory and s3): killing it loses everything it held. So what a restart can
honestly prove here is what llmtap itself guarantees, not what Kafka's disk would:

- every proxied call succeeds while the broker is down (the ingress never waits for
  Kafka: it spools to disk);
- every event the ingress had not got acknowledged reaches ClickHouse after recovery,
  exactly once: all calls that started after the kill, and everything sent after the
  restart, with what was already consumed before the kill still there, never doubled;
- calls in flight at the moment of the kill may have had their events acknowledged by
  the old broker and not yet consumed: those are lost with memory storage (on Apache
  Kafka they would be on disk). They may be missing, never doubled.

Recovery is the one `llmtap up` performs: its supervisor stops every process when the
broker dies (the ingress cleanly, spooling what it holds in memory), then starts the
broker and creates the topics before any client connects, then the store, the worker
and the ingress, which replays its spool first.

The second test restarts the broker *under* the running store, worker and ingress,
which `llmtap up` never does; it fails today (see its xfail reason): the record of a
known bug, not a guarantee.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import MakeCluster
from tests.faults.harness import Cluster, HarnessError, until
from tests.faults.load import Load, Sent, compare

pytestmark = pytest.mark.faults

FEATURE = "broker-kill"
BEFORE = 45  # calls made and consumed before the kill
DURING = 40  # calls answered after the kill, with the broker down
AFTER = 45  # calls after recovery


async def drive_through_kill(cluster: Cluster, load: Load) -> float:
    """Load running, broker killed mid-load, calls going on while it is down. Returns
    the time of the kill (time.monotonic())."""
    stop = asyncio.Event()
    driving = asyncio.create_task(load.run_until(stop, lanes=2, pause_s=0.05))
    await until(lambda: _answered(load, BEFORE + 20), "calls under load", 60)
    await cluster.kill("broker")
    killed_at = time.monotonic()
    answered = len(load.sent) + len(load.failures)
    await until(lambda: _answered(load, answered + DURING), "calls with the broker down", 60)

    async def spooling() -> bool:
        return bool((await cluster.ingress_health())["events_spooled"] > 0)

    await until(spooling, "the ingress spooling to disk", 30)
    stop.set()
    await driving
    return killed_at


def split(sent: list[Sent], killed_at: float) -> tuple[list[Sent], list[Sent]]:
    """Calls whose events the old broker may have acknowledged and taken with it (made
    under load before the kill), and those whose events it cannot have: the calls
    consumed before the load (the first BEFORE), and every call started after the kill."""
    at_risk = [s for s in sent[BEFORE:] if s.started < killed_at]
    return at_risk, [s for s in sent if s not in at_risk]


async def test_broker_killed_mid_load_loses_no_unacknowledged_event(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster()
    await cluster.start_all()
    load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
    try:
        await load.run(BEFORE)
        await cluster.quiet()  # consumed and stored before the kill
        killed_at = await drive_through_kill(cluster, load)
        assert load.failures == []  # no call failed for the broker's sake

        # `llmtap up`'s recovery: all stopped (the ingress cleanly), then started in order.
        await cluster.terminate("ingress")
        await cluster.kill("worker")
        await cluster.kill("store")
        await cluster.start_all()
        await load.run(AFTER)
        assert load.failures == []
        await cluster.quiet()
        stored = await cluster.calls_by_request(FEATURE)

        at_risk, safe = split(load.sent, killed_at)
        assert compare(safe, {k: v for k, v in stored.items() if k not in _ids(at_risk)}) == []
        assert [
            s for s in at_risk if s.request_id in stored and stored[s.request_id]["rows"] != 1
        ] == []
        lost = [s for s in at_risk if s.request_id not in stored]
        print(
            f"calls made before the kill, events lost with the broker: {len(lost)}/{len(at_risk)}"
        )
        health = await cluster.ingress_health()
        assert health["events_replayed"] > 0 and health["events_dropped"] == 0
        assert cluster.dead() == []
    finally:
        await load.close()


@pytest.mark.xfail(
    strict=False,
    reason="Tansu 0.6 (memory) restarted under running clients: producers keep the "
    "topic metadata of the old broker and produce before anyone re-creates the topics; "
    "Tansu acknowledges produce requests for topics it does not have (the events are "
    "lost), and batches written that way collide with the re-created topic's offsets "
    "(AlreadyExists in the broker log, offsets repeated, consumers skip them). `llmtap "
    "up` (at start) and each process at its own start create the topics, and the ingress"
    " at each connection too: not before its producer's first sends to the new broker.",
)
async def test_broker_restarted_under_running_processes_loses_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster()
    await cluster.start_all()
    load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
    try:
        await load.run(BEFORE)
        await cluster.quiet()
        killed_at = await drive_through_kill(cluster, load)
        await cluster.start("broker")  # topics created as soon as it answers
        await load.run(AFTER)
        assert load.failures == []
        try:
            await cluster.quiet(30)
        except HarnessError as exc:
            pytest.fail(f"the pipeline did not catch up after the broker restart: {exc}")
        stored = await cluster.calls_by_request(FEATURE)
        at_risk, safe = split(load.sent, killed_at)
        assert compare(safe, {k: v for k, v in stored.items() if k not in _ids(at_risk)}) == []
    finally:
        await load.close()


def _ids(sent: list[Sent]) -> set[str]:
    return {s.request_id for s in sent}


async def _answered(load: Load, count: int) -> bool:
    return len(load.sent) + len(load.failures) >= count
