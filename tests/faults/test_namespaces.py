"""Two llmtap deployments on one Kafka (staging and production sharing a cluster), told
apart by ``kafka_namespace`` alone: each meters its own calls, exactly, and none of the
other's; the broker knows each one's topics, groups and clients by its namespace."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from llmtap.kafka import Kafka
from llmtap.names import TOPICS
from tests.faults.conftest import MakeCluster
from tests.faults.harness import Cluster
from tests.faults.load import Load

pytestmark = pytest.mark.faults

FEATURE = "shared-kafka"
CALLS = 9  # each deployment's: three of each kind (OpenAI, OpenAI streamed, Anthropic)


async def metered(cluster: Cluster) -> tuple[set[str], set[str]]:
    """The request ids of the calls made through ``cluster``, and those in its store."""
    load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
    try:
        await load.run(CALLS)
    finally:
        await load.close()
    assert not load.failures
    await cluster.quiet()
    stored = await cluster.calls_by_request(FEATURE)
    assert all(row["rows"] == 1 for row in stored.values())
    return {sent.request_id for sent in load.sent}, set(stored)


async def group_members(kafka: Kafka, group: str) -> list[str]:
    admin = AIOKafkaAdminClient(**kafka.client_options("admin"))
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    # DescribeGroups v2: (error, group, state, protocol type, protocol, members), each
    # member (member id, client id, ...).
    return [member[0] for response in described for g in response.groups for member in g[5]]


async def test_two_deployments_share_one_kafka_by_namespace(make_cluster: MakeCluster) -> None:
    production = await make_cluster()
    await production.start_all()
    staging = await make_cluster(
        {"LLMTAP_KAFKA_NAMESPACE": "staging"}, shared_broker=production.bootstrap
    )
    await staging.start_all()
    assert staging.bootstrap == production.bootstrap

    made_in_production, stored_in_production = await metered(production)
    made_in_staging, stored_in_staging = await metered(staging)
    # Had they shared topics and groups, each writer would hold some of the other's
    # calls (the two writers splitting one group's partitions), or none of its own.
    assert len(made_in_production) == len(made_in_staging) == CALLS
    assert stored_in_production == made_in_production
    assert stored_in_staging == made_in_staging

    kafka = staging.settings.kafka
    admin = AIOKafkaAdminClient(**kafka.client_options("admin"))
    await admin.start()
    try:
        on_the_broker = set(await admin.list_topics())
    finally:
        await admin.close()
    for namespace in ("llmtap", "staging"):
        assert {f"{namespace}.{kind}" for kind in TOPICS} <= on_the_broker
    # A member's id starts with its client id (Tansu, as Kafka: "<client.id>-<uuid>").
    for cluster, namespace in ((production, "llmtap"), (staging, "staging")):
        names = cluster.settings.kafka.names
        for group, client in (
            (names.stream_group, "worker-costs"),
            (names.spikes_group, "worker-spikes"),
            (names.sink_group, "store-writer"),
        ):
            members = await group_members(kafka, group)
            assert len(members) == 1, (group, members)
            assert members[0].startswith(f"{namespace}-{client}-"), (group, members)
