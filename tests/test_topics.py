"""Making llmtap's topics (llmtap/topics.py): as many copies as asked, and a refusal
said rather than waited on."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import InvalidReplicationFactorError, PolicyViolationError

from llmtap import topics
from llmtap.supervisor import embedded_broker
from tests.fake_provider import free_port


async def test_topics_are_made_with_the_replication_factor_asked() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    async with embedded_broker(bootstrap, 2, replicas=3):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics(list(topics.ALL))
        finally:
            await admin.close()
    assert {t["topic"] for t in described} == set(topics.ALL)
    replicas = {len(p["replicas"]) for t in described for p in t["partitions"]}
    assert replicas == {3}


def test_a_refusal_names_the_topic_and_why_and_a_topic_made_meanwhile_is_none() -> None:
    refused = topics.refusals(
        [
            ("llmtap.requests", InvalidReplicationFactorError.errno, "larger than brokers: 1"),
            ("llmtap.costed", 36, "Topic with this name already exists."),  # a race lost
            ("llmtap.alerts", 0, None),
            ("llmtap.windows", PolicyViolationError.errno),  # CreateTopics v0: no message
        ]
    )
    assert refused == [
        "llmtap.requests: InvalidReplicationFactorError (larger than brokers: 1)",
        "llmtap.windows: PolicyViolationError",
    ]
