"""Kafka over TLS and SASL (llmtap/kafka.py; README, Production: Kafka security).

The real Tansu broker behind a TLS front (tests/tls.py): every connection a client
makes crosses TLS, and the front requires a client certificate from the test CA.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import trustme
from aiokafka.errors import KafkaConnectionError, KafkaError
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from llmtap import topics
from llmtap.kafka import Kafka
from llmtap.probes import broker_problem
from tests.conftest import FakeUpstream, run_llmtap
from tests.fake_provider import SNAPSHOT
from tests.test_e2e import expected_cost, model_row
from tests.tls import Certificates, client_of, tansu_behind_front

CLIENT = "llmtap-client.example"  # the client certificate's name (tests/tls.py)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certificates]:
    yield Certificates.issue(tmp_path_factory.mktemp("tls"))


async def test_every_stage_of_llmtap_up_runs_over_client_of(
    certificates: Certificates, upstream: FakeUpstream, tmp_path: Path
) -> None:
    async with tansu_behind_front(certificates) as broker:
        made_topics = len(broker.front.subjects)
        env = {
            "LLMTAP_EMBEDDED_BROKER": "false",
            "LLMTAP_KAFKA_BOOTSTRAP": broker.front.bootstrap,
            "LLMTAP_KAFKA_SECURITY_PROTOCOL": "SSL",
            "LLMTAP_KAFKA_SSL_CAFILE": str(certificates.cafile),
            "LLMTAP_KAFKA_SSL_CERTFILE": str(certificates.certfile),
            "LLMTAP_KAFKA_SSL_KEYFILE": str(certificates.keyfile),
        }
        async with run_llmtap(tmp_path, upstream, env) as running, running.openai() as sdk:
            await sdk.chat.completions.create(
                model="gpt-4.1-mini", messages=[{"role": "user", "content": "over tls"}]
            )
            # Published by the ingress, costed by the worker, written by the store: each
            # through the front only (Tansu's own port is in no setting).
            model = "gpt-4.1-mini" + SNAPSHOT
            row = await model_row(running.api_url, model, lambda r: r["requests"] >= 1)
            fake = upstream.provider
            cost = expected_cost(
                "gpt-4.1-mini", fake.prompt_tokens, fake.cached_tokens, fake.completion_tokens
            )
            assert Decimal(row["cost"]) == cost
    sessions = broker.front.subjects[made_topics:]
    assert len(sessions) >= 6  # producers, group consumers, readers of each process
    assert set(sessions) == {CLIENT}  # each presented the client certificate
    # Every client said which of llmtap's it is (a request header's client id: its
    # length, then its bytes), the worker's Faust producer among them; none went by
    # aiokafka's default name.
    for client in ("ingress", "worker", "worker-costs", "worker-spikes", "store-writer"):
        client_id = f"llmtap-{client}".encode()
        assert struct.pack(">h", len(client_id)) + client_id in broker.front.sent, client
    assert b"aiokafka-" not in broker.front.sent


async def test_a_broker_certificate_from_another_ca_is_refused(
    certificates: Certificates, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with tansu_behind_front(certificates) as broker:
        before = len(broker.front.subjects)
        trusting_other = Kafka(
            broker.front.bootstrap,
            "SSL",
            ssl_cafile=other,
            ssl_certfile=certificates.certfile,
            ssl_keyfile=certificates.keyfile,
        )
        with pytest.raises(KafkaConnectionError):
            await topics.ensure_topics(trusting_other, 2)
        assert len(broker.front.subjects) == before  # no session was opened
        # What `llmtap` says while it waits: the reason, not a bare "waiting".
        problem = await broker_problem(trusting_other, 2)
        assert "TLS with" in problem and "CERTIFICATE_VERIFY_FAILED" in problem


async def test_a_client_without_its_certificate_is_refused(certificates: Certificates) -> None:
    async with tansu_behind_front(certificates) as broker:
        before = len(broker.front.subjects)
        no_certificate = Kafka(broker.front.bootstrap, "SSL", ssl_cafile=certificates.cafile)
        with pytest.raises(KafkaConnectionError):
            await topics.ensure_topics(no_certificate, 2)
        assert len(broker.front.subjects) == before
        problem = await broker_problem(no_certificate, 2)
        assert "TLS with" in problem and "CERTIFICATE" in problem.upper(), problem
        # The same client with its certificate gets through.
        await topics.ensure_topics(client_of(broker.front, certificates), 2)
        assert broker.front.subjects[before:] and set(broker.front.subjects[before:]) == {CLIENT}


async def test_sasl_scram_credentials_reach_a_broker_that_requires_authentication(
    certificates: Certificates,
) -> None:
    """Tansu authenticates SCRAM, but a user can only be made on a broker that lets
    clients in without one, and its storage is memory only: no broker here knows a user.
    So this proves the credentials go out by the configured mechanism, over TLS, to a
    broker that checks them, and that a refusal is an error, not a way in."""
    async with tansu_behind_front(certificates, "--authentication", make_topics=False) as broker:
        scram = Kafka(
            broker.front.bootstrap,
            "SASL_SSL",
            ssl_cafile=certificates.cafile,
            ssl_certfile=certificates.certfile,
            ssl_keyfile=certificates.keyfile,
            sasl_mechanism="SCRAM-SHA-256",
            sasl_username="ledger-svc",
            sasl_password="not-a-known-password",
        )
        # Apache Kafka refuses by an error code (SaslAuthenticationFailedError); Tansu by
        # a SCRAM error message that aiokafka fails to parse (KeyError 'v').
        with pytest.raises((KafkaError, KeyError)):
            await topics.ensure_topics(scram, 2)
        problem = await broker_problem(scram, 2)
        assert "SASL SCRAM-SHA-256 authentication failed" in problem, problem
        assert "'ledger-svc'" in problem and "not-a-known-password" not in problem
    assert b"SCRAM-SHA-256" in broker.front.sent  # the handshake's mechanism
    assert b"n=ledger-svc,r=" in broker.front.sent  # SCRAM's client-first message
    assert b"not-a-known-password" not in broker.front.sent  # SCRAM never sends it
    assert not any(b"NoSharedMechanism" in line for line in broker.output)


@pytest.mark.parametrize(
    "kafka",
    [
        Kafka("b:9093"),
        Kafka("b:9093", "SSL"),
        Kafka("b:9093", "SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p"),
        Kafka("b:9093", "SASL_PLAINTEXT", sasl_username="u", sasl_password="p"),
    ],
    ids=lambda kafka: kafka.security_protocol,
)
def test_the_worker_s_faust_producer_connects_as_every_other_client(kafka: Kafka) -> None:
    options = kafka.client_options("worker").items()
    ours = {k: v for k, v in options if k not in ("bootstrap_servers", "client_id")}
    faust_options = credentials_to_aiokafka_auth(kafka.faust_credentials())
    assert {k: v for k, v in faust_options.items() if v is not None} == ours
