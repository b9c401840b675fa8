"""How llmtap reaches Kafka: the bootstrap servers and the connection's security.

Every Kafka client llmtap makes (the aiokafka producers, consumers and admin clients
of each process, and the worker's Faust app) is built from one ``Kafka`` value, which
``Settings.kafka`` makes from the ``kafka_*`` settings. PLAINTEXT suits the embedded
broker and a Kafka inside the compose network; a managed Kafka (MSK, Confluent Cloud,
Aiven, Redpanda Cloud) wants TLS, usually with SASL (README, Production: Kafka
security).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from llmtap.names import Names
from llmtap.tls import client_context

if TYPE_CHECKING:  # Faust is the worker's alone: the ingress does not import it
    from faust.types.auth import CredentialsT

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]

# How long a consumer's fetch may wait at the broker for data (``fetch.max.wait.ms``).
# Kafka answers a fetch as soon as there is data, so there this bounds only an idle
# poll: each consumer asks 1000 / this many times a second with nothing to read (a
# capped ingress follows two topics: ~12 ms of CPU a second each at 50, timed alone).
# The embedded Tansu broker answers only when the wait is over, so on it this is the
# latency of every hop (aiokafka's default, 500 ms, measured a median of 146 ms per
# message; 50 ms, 2 ms). The ``kafka_fetch_wait_ms`` setting; 50 suits Tansu, and
# docker-compose.yml sets 500 for Apache Kafka.
FETCH_WAIT_MS = 50


class ClientOptions(TypedDict, total=False):
    """The keyword arguments every aiokafka client takes to reach the brokers."""

    bootstrap_servers: str
    client_id: str
    security_protocol: str
    ssl_context: ssl.SSLContext | None
    sasl_mechanism: str
    sasl_plain_username: str
    sasl_plain_password: str


class ProducerOptions(ClientOptions, total=False):
    """... and those of a producer."""

    compression_type: str | None


class ConsumerOptions(ClientOptions, total=False):
    """... and those of a consumer."""

    fetch_max_wait_ms: int


@dataclass(frozen=True)
class Kafka:
    """Where the brokers are, how to connect to them, and what this deployment's topics,
    groups and clients are called there (``names``, llmtap/names.py).

    ``ssl_cafile`` None trusts the system's CAs (a managed Kafka's certificates are
    signed by a public CA); ``ssl_certfile`` and ``ssl_keyfile`` present a client
    certificate (mutual TLS). SASL sends ``sasl_username`` and ``sasl_password`` by
    ``sasl_mechanism``; over SASL_PLAINTEXT they cross the network in the clear.
    """

    bootstrap: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    names: Names = field(default_factory=Names)
    # What llmtap's producers compress their batches with (consumers read any codec).
    compression: Compression = "none"
    # How long a consumer's fetch waits at the broker with nothing to read (above).
    fetch_wait_ms: int = FETCH_WAIT_MS

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """One context for every client of the process, made on first use (llmtap/tls.py:
        it verifies the broker's certificate and host name)."""
        if not self.tls:
            return None
        return client_context(self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)

    def client_options(self, client: str) -> ClientOptions:
        """What an aiokafka client takes to reach the brokers; ``client`` says which of
        llmtap's it is (its ``client.id``, under the namespace: ``llmtap-ingress``)."""
        options = ClientOptions(
            bootstrap_servers=self.bootstrap,
            client_id=self.names.client_id(client),
            security_protocol=self.security_protocol,
        )
        if self.tls:
            options["ssl_context"] = self.ssl_context
        if self.sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    @property
    def codec(self) -> str | None:
        """The producers' ``compression_type``: None for none."""
        return None if self.compression == "none" else self.compression

    def producer_options(self, client: str) -> ProducerOptions:
        """``client_options`` and the batches' compression."""
        return ProducerOptions(**self.client_options(client), compression_type=self.codec)

    def consumer_options(self, client: str) -> ConsumerOptions:
        """``client_options`` and how long a fetch waits at the broker for data."""
        return ConsumerOptions(**self.client_options(client), fetch_max_wait_ms=self.fetch_wait_ms)

    def faust_brokers(self) -> list[str]:
        return [f"kafka://{host.strip()}" for host in self.bootstrap.split(",")]

    def faust_credentials(self) -> CredentialsT | None:
        """The same connection as Faust's ``broker_credentials``."""
        import faust

        if self.sasl:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                ssl_context=self.ssl_context,
                mechanism=self.sasl_mechanism,
            )
        if self.tls:
            return faust.SSLCredentials(self.ssl_context)
        return None
