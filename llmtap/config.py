"""Settings for every llmtap process.

Sources, highest priority first: environment variables (``LLMTAP_<FIELD>``, e.g.
``LLMTAP_PROXY_PORT=9000``), the YAML file named by ``--config`` / ``LLMTAP_CONFIG``,
then the embedded defaults below. Every YAML key is the lower-case field name.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import os
import re
import ssl
from collections.abc import Mapping
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from llmtap.config_sections import (
    BUILT_IN_PROVIDERS,
    BudgetConfig,
    ProviderConfig,
    SpikeRule,
    WebhookEndpoint,
    provider_url,
    unique_names,
)
from llmtap.config_sources import Environment, Overridden, YamlFile
from llmtap.dsn import dsn_database, sql_dsn, store_dsn
from llmtap.kafka import FETCH_WAIT_MS, Compression, Kafka, SaslMechanism, SecurityProtocol
from llmtap.names import NAMESPACE_PATTERN, Names
from llmtap.tls import UnusableFile, server_context

# The longest retention, in days (~27 years): a TTL (sql/retention.py) is a DateTime,
# whose last second is in 2106; a row's time plus more days than are left until then
# wraps around to the 1970s, so the row is expired as soon as it is stored.
MAX_RETENTION_DAYS = 10_000

# Kafka's group.min.session.timeout.ms by default (6000): the shortest stream worker
# session a Kafka broker takes (stream_session_timeout_s; the embedded broker has none).
KAFKA_MIN_SESSION_S = 6.0

CONFIG_ENV = "LLMTAP_CONFIG"
ADMIN_KEY_ENV = "LLMTAP_ADMIN_KEY"  # an admin key's secret: `llmtap alerts redeliver`
# The descriptor of the ingress lock (llmtap/data_dir.py) an `llmtap up` hands its ingress.
INGRESS_LOCK_ENV = "LLMTAP_INGRESS_LOCK_FD"
# Set while Settings.model_copy builds a copy: its values are the original's and the
# update, read from nowhere else (the environment may have changed since, and a dict
# setting would be merged with it).
_COPYING: ContextVar[bool] = ContextVar("llmtap_settings_copying", default=False)

# File settings an empty value leaves unset (compose's ``${VAR:-}``): their default, or
# the config file's.
_EMPTY_IS_UNSET = (
    "keys_file",
    "pricing_file",
    "tls_certfile",
    "tls_keyfile",
    "kafka_ssl_cafile",
    "kafka_ssl_certfile",
    "kafka_ssl_keyfile",
)
# And the directory: in the environment or the file, empty is its default (``.llmtap``),
# not the current directory (``Path("")``). (An empty variable of a list or map setting
# is no setting too: :class:`~llmtap.config_sources.Environment`.)
_EMPTY_IS_DEFAULT = frozenset({*_EMPTY_IS_UNSET, "data_dir"})
# The longest window, and window grace, the stream worker can keep: 366 days.
WINDOW_MAX_S = 366 * 86400


class Settings(BaseSettings):
    # An error names the setting and what is wrong, never the values given: they hold
    # secrets (a SASL password, a DSN's), and an error of the whole model shows them all.
    model_config = SettingsConfigDict(
        env_prefix="LLMTAP_", extra="forbid", hide_input_in_errors=True, allow_inf_nan=False
    )

    # Where embedded state lives: the chDB store, logs, and run files.
    data_dir: Path = Path(".llmtap")

    # Kafka. With embedded_broker, `llmtap up` starts Tansu on kafka_bootstrap.
    kafka_bootstrap: str = "127.0.0.1:9092"
    embedded_broker: bool = True
    # Kafka's CreateTopics carries partitions as an int32 and replicas as an int16: past
    # them, the topics could not even be asked for (a wait for the broker for ever).
    topic_partitions: int = Field(default=4, ge=1, le=2**31 - 1)
    # Copies of each topic llmtap makes: 1 for one broker; 3 on a production cluster
    # (a managed Kafka may refuse fewer), so a lost broker loses no event.
    topic_replication_factor: int = Field(default=1, ge=1, le=2**15 - 1)
    # How to connect (llmtap/kafka.py; README, Production: Kafka security): PLAINTEXT,
    # or TLS (SSL) and/or SASL for a managed Kafka. The CA file is None to trust the
    # system's CAs; a certificate and key present a client certificate (mutual TLS).
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_ssl_cafile: FilePath | None = None
    kafka_ssl_certfile: FilePath | None = None
    kafka_ssl_keyfile: FilePath | None = None
    kafka_sasl_mechanism: SaslMechanism = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    # What this deployment's topics, consumer groups and Kafka client ids start with
    # (llmtap/names.py): give staging and production their own to share one cluster.
    kafka_namespace: str = Field(default="llmtap", pattern=NAMESPACE_PATTERN.pattern)
    # What the producers compress event batches with: none on the embedded broker
    # (nothing to save on a loopback); lz4 or zstd to a Kafka billed by the byte.
    kafka_compression: Compression = "none"
    # How long each consumer's fetch waits at the broker with nothing to read: on Apache
    # Kafka (which answers at once when there is data) only idle polls, so 500 there
    # costs no latency; on the embedded Tansu (which answers when the wait is over) the
    # latency of every hop (llmtap/kafka.py).
    kafka_fetch_wait_ms: int = Field(default=FETCH_WAIT_MS, ge=1, le=1000)

    # ClickHouse: `http://user:pass@host:8123/db` for a server, or `chdb:///path`.
    # Empty means the embedded chDB store under data_dir.
    clickhouse_dsn: str = Field(default="", repr=False)  # its password: never shown
    # The SQL endpoint's own ClickHouse user on a server (`http://reader:pass@host:8123/db`,
    # the store's database): one granted SELECT on it alone, so the server itself holds
    # what the endpoint's checks hold (no other database, no file(), url()...). Empty: the
    # store's DSN, on a session of its own set readonly.
    sql_dsn: str = Field(default="", repr=False)

    # The proxy clients point their SDK at, and the analytics API.
    proxy_host: str = "127.0.0.1"
    # Not 0 (any free port): clients, `llmtap up` and compose need to know where.
    proxy_port: int = Field(default=8080, ge=1, le=65535)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8081, ge=1, le=65535)
    # Requests of the analytics API, SQL and dashboard one key may have in flight; past
    # it, a 429 (sql/admission.py).
    api_requests_per_key: int = Field(default=8, ge=1)
    # The stream worker's /metrics and /healthz (stream/web.py). 0: not served.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=8082, ge=0, le=65535)
    # Serve the proxy, the API and the worker's metrics over HTTPS with this certificate
    # (PEM, with its chain) and key (PEM; none: in the certificate file). None: plain
    # HTTP, TLS ended in front of llmtap.
    tls_certfile: FilePath | None = None
    tls_keyfile: FilePath | None = None
    # Admin keys of the analytics API (every tenant, and SQL): the SHA-256 hex digests
    # of their secrets. Virtual keys see their own tenant only (README, Analytics API).
    admin_key_hashes: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]] = Field(
        default_factory=list
    )

    # How clients authenticate. "keys": each call must present a virtual key (from
    # `llmtap keys create`); the provider key comes from the env var named below.
    # "passthrough": the client's own provider key is forwarded (recorded only as a
    # hash), never llmtap's (ingress/forward/endpoint.py: upstream_credential).
    auth: Literal["keys", "passthrough"] = "keys"
    # The virtual key file (hashes only). Empty: <data_dir>/keys.yaml.
    keys_file: Path | None = None
    # Identities the ingress keeps made (ingress/guards/auth.py): one per virtual key and
    # x-llmtap-* headers it came with, ~1.4 KB each (~2.8 KB with 1 KB of claims, the
    # most kept). More in rotation than this, and each call makes its own again.
    identity_cache_size: int = Field(default=4096, ge=1)

    # Upstream providers, and the env vars holding their keys.
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key_env: str = "OPENAI_API_KEY"
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_api_key_env: str = "ANTHROPIC_API_KEY"
    # More providers by name (any OpenAI-compatible API: Groq, vLLM, Ollama...), and
    # which provider serves which model: exact names, or prefixes ending in "*".
    # A model written "<provider>/<model>" goes to that provider as "<model>".
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    model_routes: dict[str, str] = Field(default_factory=dict)
    # The web origins whose pages may call the proxy from a browser (CORS), each
    # "scheme://host[:port]" or "*" for any; none: a browser's preflight gets 405, as
    # before (ingress/cors.py). A page that calls shows its virtual key to its users.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    # Larger request bodies get a 413 without reaching a provider.
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # ... and bodies of more JSON values than this (their commas counted), before they
    # are parsed (ingress/forward/capture.py: too_many_values).
    max_body_values: int = Field(default=2_000_000, ge=1000)
    # The longest a request body may take to arrive whole (a client that stalls mid-body
    # holds up to max_body_bytes of memory meanwhile): then a 408, not forwarded.
    body_read_timeout_s: float = Field(default=60.0, gt=0)
    upstream_connect_timeout_s: float = Field(default=10.0, gt=0)
    upstream_read_timeout_s: float = Field(default=600.0, gt=0)
    # After SIGTERM (a deploy, `docker stop`), how long calls in flight (a long stream)
    # may run on while the ingress takes no new connection; then they are cut (and
    # still recorded). Give the process longer than this to stop (compose's
    # stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
    shutdown_grace_s: float = Field(default=60.0, ge=0)
    # Before that, how long after SIGTERM the ingress goes on taking new calls while its
    # /readyz answers 503, for a load balancer to take it out of rotation first (0: it
    # stops listening at once). A second SIGTERM cuts the delay short.
    shutdown_delay_s: float = Field(default=0.0, ge=0, le=3600)

    # Extra or overriding prices, same format as stream/pricing.yaml.
    pricing_file: Path | None = None

    # Ingress -> Kafka: events wait here while the broker is slow; never the call.
    publish_queue_size: int = Field(default=100_000, ge=1)
    # Behind that queue, the on-disk spool (<data_dir>/spool): new events are dropped past this.
    spool_max_bytes: int = Field(default=1_073_741_824, ge=0)

    # The stream worker's consumer groups: kept short so a worker joins in seconds on Tansu.
    # At most 30 minutes: Kafka refuses a join past its group.max.session.timeout.ms
    # (1,800,000 by default), and the client cannot send one past 2^31 - 1 ms at all.
    stream_session_timeout_s: float = Field(default=10.0, gt=0, le=1800)
    stream_heartbeat_interval_s: float = Field(default=1.0, gt=0)
    # Records the stream worker's stages fetch and handle at a time, at most.
    stream_batch_records: int = Field(default=2000, ge=1, le=100_000)

    # ClickHouse writer: a batch is written when it has this many rows or is this old.
    # Every insert writes a part to `calls` and to each rollup, at a cost that does not
    # depend on its rows (~70-130 ms here): fewer, larger inserts, as ClickHouse advises
    # (about one a second), up to what keeps a `calls` part in the compact format (one
    # data file; ~59,000 rows of ~176 bytes make it wide). README, Storage.
    sink_batch_rows: int = Field(default=40_000, ge=1)
    sink_batch_seconds: float = Field(default=1.0, gt=0)
    # Processes that decode for the writer, overlapping its inserts and each other
    # (one: ~10% slower on two cores; 0: the writer's own process decodes, slower
    # still; README, Storage; bench/results/ingest.md).
    sink_decode_processes: int = Field(default=2, ge=0, le=16)

    # Alert webhooks (see README, Webhooks), and whether they may target loopback,
    # private, link-local or otherwise reserved addresses (refused by default: SSRF).
    webhooks: Annotated[list[WebhookEndpoint], unique_names("webhook endpoint")] = Field(
        default_factory=list
    )
    webhook_allow_private: bool = False

    # Budgets (README, Budgets). When a call's worst-case cost is reserved against a
    # hard cap, the pricing catalog gives each model's limits (max_output_tokens,
    # context_window); for a model it gives none for, these stand in: the output of a
    # call that names no max_tokens, and the input of a call whose body does not hold
    # it all (previous_response_id, file ids, image URLs, server-side tools:
    # ingress/guards/bounds.py), the largest context window of the models in use.
    budgets: Annotated[list[BudgetConfig], unique_names("budget")] = Field(default_factory=list)
    budget_default_max_tokens: int = Field(default=4096, ge=1)
    budget_default_context_tokens: int = Field(default=1_000_000, ge=1)
    # The most input tokens one image may count in a hard cap's worst case: providers
    # count pixels, not bytes (gpt-4o-mini's largest high-detail image is ~48,000).
    budget_image_tokens: int = Field(default=50_000, ge=1)
    # The web searches reserved for a call whose web search tool names no bound
    # (Anthropic's max_uses, the Responses API's max_tool_calls), each at its model's fee.
    budget_default_web_searches: int = Field(default=100, ge=0)
    # The calls reserved for an Anthropic advisor tool that names no max_uses, each at
    # the advisor model's prices (ingress/guards/worst_case.py: WorstCase.advisor_cost).
    budget_default_advisor_uses: int = Field(default=100, ge=0)
    # A call of a model with no price (not in the catalog, nor the pricing_file) under a
    # hard cap has no worst case to reserve: "refuse" it (a 400 naming the model), or
    # "admit" it with nothing reserved, its spend not counted.
    budget_unpriced: Literal["refuse", "admit"] = "refuse"

    # Tumbling windows (stream/windows.py): their lengths in seconds, each a multiple of
    # the smallest (larger windows are merged from closed smaller ones), and how long
    # after a window ends (in event time) calls may still arrive to be counted in it.
    # Each at most WINDOW_MAX_S (a window's end, the watermark less the grace, stay dates;
    # windows.size_s is a UInt32): longer ones stopped the worker with an OverflowError.
    window_sizes_s: tuple[int, ...] = (60, 3600)
    window_grace_s: float = Field(default=10.0, ge=0, le=WINDOW_MAX_S)
    # Spike rules judged on closed windows (README, Spike detection).
    spike_rules: Annotated[list[SpikeRule], unique_names("spike rule")] = Field(
        default_factory=list
    )

    # Retention in ClickHouse (sql/retention.py), in days: raw, the calls and the dead
    # letters (undecodable or unstorable messages, raw bytes); rollup, the hourly/daily
    # rollups, the windows, and the alerts with their webhook deliveries. The analytics
    # API refuses a range longer than the smaller of the two (sql/params.Kept). At most
    # MAX_RETENTION_DAYS: a TTL is a DateTime, which ends in 2106, and a row's time plus
    # more days wraps around to the past: every row expired, deleted at once.
    raw_retention_days: int = Field(default=90, ge=1, le=MAX_RETENTION_DAYS)
    rollup_retention_days: int = Field(default=400, ge=1, le=MAX_RETENTION_DAYS)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator(*_EMPTY_IS_UNSET, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty file setting (compose's ``${VAR:-}``) is its default, not the
        current directory (``Path("")``): every call was a 401 for want of the keys."""
        return None if value == "" else value

    @field_validator(*_EMPTY_IS_DEFAULT, mode="before")  # every path setting
    @classmethod
    def _home(cls, value: object) -> object:
        """``~/llmtap`` is under the home directory, as a shell reads it: given in the
        config file (YAML expands no ~) it was a directory named "~" in the current one."""
        if isinstance(value, str | Path) and str(value).startswith("~"):
            return Path(value).expanduser()
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_as_json(cls, value: object) -> object:
        """The environment's origins: its JSON, as written (NoDecode), for an error that
        says so (empty, it is no setting: :class:`~llmtap.config_sources.Environment`)."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(
                "not JSON: write a list, as LLMTAP_CORS_ORIGINS='[\"https://app.example.com\"]'"
            ) from None

    @field_validator("cors_origins")
    @classmethod
    def _web_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if origin == "*":
                continue
            parts = _ORIGIN.fullmatch(origin)
            if parts is None or not 1 <= int(parts[3] or 80) <= 65535:
                raise ValueError(
                    f"{origin!r} is not a web origin: write scheme://host[:port], as a "
                    "browser sends it in Origin (no path, no trailing slash), or * for any"
                )
            # Compared as a string with the page's Origin, which a browser writes so.
            scheme, host, port = parts.groups()
            default = "443" if scheme == "https" else "80"
            sent = f"{scheme}://{host.lower()}"
            if port is not None and int(port) != int(default):
                sent += f":{int(port)}"
            if sent != origin:
                raise ValueError(
                    f"{origin!r} is never a page's Origin: write {sent!r}, as a browser "
                    "sends it (the host in lower case, no port that is the scheme's own)"
                )
        return origins

    @field_validator("window_sizes_s")
    @classmethod
    def _nested_windows(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        ordered = tuple(sorted(set(sizes)))
        if not ordered or ordered[0] <= 0:
            raise ValueError("window_sizes_s needs at least one positive length")
        if any(size % ordered[0] for size in ordered):
            raise ValueError(f"every window length must be a multiple of {ordered[0]}s")
        if ordered[-1] > WINDOW_MAX_S:
            raise ValueError(f"a window may last at most {WINDOW_MAX_S}s (366 days)")
        return ordered

    @model_validator(mode="after")
    def _providers_located(self) -> Settings:
        for name, provider in self.providers.items():
            if name not in BUILT_IN_PROVIDERS and not provider.base_url:
                raise ValueError(
                    f"providers.{name}: base_url is required (only a provider named like a "
                    f"built-in one, {' or '.join(BUILT_IN_PROVIDERS)}, takes the built-in's)"
                )
        return self

    @model_validator(mode="after")
    def _routes_to_known_providers(self) -> Settings:
        known = self.providers_by_name
        for pattern, name in self.model_routes.items():
            if name not in known:
                raise ValueError(
                    f"model_routes: {pattern!r} is routed to provider {name!r}, which is not "
                    f"configured (providers: {', '.join(known)}; add it under providers)"
                )
        return self

    @model_validator(mode="after")
    def _rules_on_known_windows(self) -> Settings:
        for rule in self.spike_rules:
            if rule.window_s not in self.window_sizes_s:
                raise ValueError(
                    f"spike rule {rule.name!r}: window_s {rule.window_s} is not one of "
                    f"window_sizes_s {list(self.window_sizes_s)}"
                )
        return self

    @model_validator(mode="after")
    def _heartbeats_within_the_session(self) -> Settings:
        # Kafka's rule (heartbeat.interval.ms "must be set lower than session.timeout.ms"):
        # aiokafka checks nothing, and a worker beating no more often than its session
        # lasts is taken for dead by the coordinator again and again, its partitions
        # handed round for ever (Tansu does not expire sessions: unseen on it).
        if self.stream_heartbeat_interval_s >= self.stream_session_timeout_s:
            raise ValueError(
                f"stream_heartbeat_interval_s ({self.stream_heartbeat_interval_s:g}) must be "
                f"lower than stream_session_timeout_s ({self.stream_session_timeout_s:g}); "
                "Kafka advises at most a third of it"
            )
        return self

    @model_validator(mode="after")
    def _session_a_kafka_takes(self) -> Settings:
        # A Kafka broker refuses a join whose session is below its
        # group.min.session.timeout.ms (6 s by default; Redpanda's and MSK's alike):
        # INVALID_SESSION_TIMEOUT, from the worker's consumer once the broker answered,
        # naming no setting. The embedded broker (Tansu) has no such minimum.
        if not self.embedded_broker and self.stream_session_timeout_s < KAFKA_MIN_SESSION_S:
            raise ValueError(
                f"stream_session_timeout_s ({self.stream_session_timeout_s:g}) must be at "
                f"least {KAFKA_MIN_SESSION_S:g}: a Kafka broker refuses a consumer group's "
                "join below its group.min.session.timeout.ms (6000 by default)"
            )
        return self

    @model_validator(mode="after")
    def _budget_periods_kept(self) -> Settings:
        # The embedded broker forgets the budgets' spend when it stops: it is rebuilt from
        # the calls stored in the period (sinks/budget_seed.py), so calls deleted by then
        # are spend forgotten, and a hard cap spent again. (Kafka's compacted budgets
        # topic keeps it; readers keep the larger of the two.)
        longest = {"day": 1, "week": 7, "month": 31}
        for budget in self.budgets if self.embedded_broker else ():
            if self.raw_retention_days < longest[budget.period]:
                raise ValueError(
                    f"budget {budget.name!r} counts a {budget.period}: raw_retention_days "
                    f"({self.raw_retention_days}) must keep the calls of a whole one "
                    f"(at least {longest[budget.period]})"
                )
        return self

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        kafka = self.kafka
        if self.embedded_broker and kafka.security_protocol != "PLAINTEXT":
            raise ValueError(
                "the embedded broker speaks PLAINTEXT only: set embedded_broker to false "
                f"to reach a Kafka over kafka_security_protocol {kafka.security_protocol}"
            )
        if not kafka.tls and (kafka.ssl_cafile or kafka.ssl_certfile or kafka.ssl_keyfile):
            raise ValueError(
                "kafka_ssl_cafile, kafka_ssl_certfile and kafka_ssl_keyfile need "
                "kafka_security_protocol SSL or SASL_SSL"
            )
        if kafka.ssl_keyfile and not kafka.ssl_certfile:
            raise ValueError("kafka_ssl_keyfile needs kafka_ssl_certfile")
        if kafka.sasl and not (kafka.sasl_username and kafka.sasl_password):
            raise ValueError(
                f"kafka_security_protocol {kafka.security_protocol} needs "
                "kafka_sasl_username and kafka_sasl_password"
            )
        if not kafka.sasl and (kafka.sasl_username or kafka.sasl_password):
            raise ValueError(
                "kafka_sasl_username and kafka_sasl_password need kafka_security_protocol "
                "SASL_PLAINTEXT or SASL_SSL"
            )
        try:
            kafka.ssl_context  # noqa: B018 (made now: a file that is no PEM fails at start)
        except UnusableFile as exc:
            raise _refused(self, f"kafka_ssl_{exc.role}", exc) from exc
        return self

    @model_validator(mode="after")
    def _server_tls(self) -> Settings:
        if self.tls_keyfile and not self.tls_certfile:
            raise ValueError("tls_keyfile needs tls_certfile")
        try:
            self.server_ssl_context  # noqa: B018 (made now: a file that is no PEM fails at start)
        except UnusableFile as exc:
            raise _refused(self, f"tls_{exc.role}", exc) from exc
        return self

    @cached_property
    def server_ssl_context(self) -> ssl.SSLContext | None:
        """What the proxy, the analytics API and the worker's metrics serve HTTPS with;
        None: plain HTTP."""
        if self.tls_certfile is None:
            return None
        return server_context(self.tls_certfile, self.tls_keyfile)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update`` applied, validated as settings are at start.

        pydantic's copy validates nothing and keeps the original's cached properties:
        a copy given another ``kafka_bootstrap`` still reached the original's broker
        (``kafka``), and one given another provider URL could still route to the old
        one (``providers_by_name``). Here every field is validated again, so what is
        derived from them is made from the copy's own values, and a bad update fails.
        """
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        if deep:
            fields = copy.deepcopy(fields)
        token = _COPYING.set(True)  # from these values alone: no environment, no file
        try:
            return type(self)(**(fields | dict(update or {})))
        finally:
            _COPYING.reset(token)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile else "http"

    def _origin(self, host: str, port: int) -> str:
        """``scheme://host:port``, an IPv6 host bracketed (``http://::1:8081`` is no URL);
        an empty host (every address) is reached on this machine's."""
        host = host or "127.0.0.1"
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def health_url(self, service: Literal["store", "ingress"]) -> str:
        """Where ``llmtap up`` asks whether the store or the ingress is up."""
        if service == "store":
            return self._origin(self.api_host, self.api_port) + "/healthz"
        return self._origin(self.proxy_host, self.proxy_port) + "/healthz"

    @cached_property
    def kafka(self) -> Kafka:
        """How every client of this process reaches Kafka."""
        return Kafka(
            self.kafka_bootstrap,
            self.kafka_security_protocol,
            self.kafka_ssl_cafile,
            self.kafka_ssl_certfile,
            self.kafka_ssl_keyfile,
            self.kafka_sasl_mechanism,
            self.kafka_sasl_username,
            self.kafka_sasl_password.get_secret_value(),
            Names(self.kafka_namespace),
            self.kafka_compression,
            self.kafka_fetch_wait_ms,
        )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_servers(cls, value: str) -> str:
        for server in value.split(","):
            if not _broker_address(server.strip()):
                raise ValueError(
                    f"{server.strip()!r} is not host:port: kafka_bootstrap must be a "
                    "comma-separated list of host:port, each port 1 to 65535 (an IPv6 "
                    "address in brackets: [::1]:9092)"
                )
        return value

    @field_validator("clickhouse_dsn")
    @classmethod
    def _clickhouse_scheme(cls, dsn: str) -> str:
        return store_dsn(dsn)

    @field_validator("sql_dsn")
    @classmethod
    def _sql_scheme(cls, dsn: str) -> str:
        return sql_dsn(dsn)

    @model_validator(mode="after")
    def _sql_on_the_server(self) -> Settings:
        if self.sql_dsn and self.embedded_store:
            raise ValueError(
                "sql_dsn needs clickhouse_dsn to be a ClickHouse server (http:// or https://): "
                "the embedded store (chDB) has no users, and the SQL endpoint must read the "
                "store's tables"
            )
        if self.sql_dsn and dsn_database(self.sql_dsn) != dsn_database(self.clickhouse_dsn):
            raise ValueError(
                "sql_dsn must name the store's database, as clickhouse_dsn does (its path: "
                "http://user:pass@host:8123/<database>): the SQL endpoint reads the tables "
                "of its session's database only"
            )
        return self

    @field_validator("openai_base_url", "anthropic_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return provider_url(value)

    @cached_property
    def providers_by_name(self) -> dict[str, ProviderConfig]:
        """``all_providers()``, built once (routing asks on every call)."""
        return self.all_providers()

    def keys_unset(self) -> dict[str, str]:
        """The providers that take a key whose variable is unset or blank here, each
        with the variable's name: a call with a virtual key routed to one is refused
        (500, ``no_provider_key``) until it is set in the environment llmtap starts in."""
        return {
            name: provider.api_key_env
            for name, provider in self.providers_by_name.items()
            if provider.api_key_env and not os.environ.get(provider.api_key_env, "").strip()
        }

    def all_providers(self) -> dict[str, ProviderConfig]:
        """The built-in providers, then those configured: one named like a built-in
        changes it, keeping what it does not set (a provider ``openai`` naming only its
        ``default_service_tier`` still has OpenAI's URL and the key in OPENAI_API_KEY)."""
        built_in = {
            "openai": ProviderConfig(
                kind="openai", base_url=self.openai_base_url, api_key_env=self.openai_api_key_env
            ),
            "anthropic": ProviderConfig(
                kind="anthropic",
                base_url=self.anthropic_base_url,
                api_key_env=self.anthropic_api_key_env,
            ),
        }
        configured = {
            name: (
                built_in[name].model_copy(
                    update={field: getattr(provider, field) for field in provider.model_fields_set}
                )
                if name in built_in
                else provider
            )
            for name, provider in self.providers.items()
        }
        return built_in | configured

    @property
    def store_dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb:///{self.data_dir.resolve() / 'clickhouse'}"

    @property
    def embedded_store(self) -> bool:
        return self.store_dsn.startswith("chdb://")

    @property
    def key_file(self) -> Path:
        return self.keys_file or self.data_dir / "keys.yaml"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def proxy_url(self) -> str:
        return self._origin(self.proxy_host, self.proxy_port) + "/v1"

    @property
    def api_url(self) -> str:
        return self._origin(self.api_host, self.api_port) + "/api/v1"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _COPYING.get():
            return (init_settings,)
        environment = Environment(settings_cls)  # pydantic-settings' own, from model_config
        env = Overridden(settings_cls, environment, (init_settings,), _EMPTY_IS_DEFAULT)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_ENV}: no config file at {path}")
            file = YamlFile(settings_cls, yaml_file=path)
            above = (init_settings, environment)
            # A list or map left empty in the file is no setting, as in the environment.
            empty = _EMPTY_IS_DEFAULT | environment.json_settings()
            sources.append(Overridden(settings_cls, file, above, empty))
        return tuple(sources)


# A web origin as a browser writes it in Origin: scheme, host (a name, an IPv4 address,
# or an IPv6 one in brackets), and a port unless the scheme's own.
_ORIGIN = re.compile(
    r"(https?)://([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?"
)
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")  # FQDN: a final dot


def _broker_address(server: str) -> bool:
    """Whether ``server`` is a ``host:port`` every client of llmtap reaches a broker at
    (aiokafka, Faust, Tansu's listener and the probes all split it so): a host name or
    IPv4 address, or an IPv6 address in brackets, and a port 1 to 65535."""
    host, _, port = server.rpartition(":")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return bool(_HOST_NAME.fullmatch(host))


def _refused(settings: Settings, name: str, exc: UnusableFile) -> ValueError:
    return ValueError(f"{name} {getattr(settings, name)}: {exc}")


def unknown_variables(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """What of ``environ`` looks like a setting but is none: an ``LLMTAP_*`` variable
    that names no setting (a typo: ``LLMTAP_BUDGET`` for ``LLMTAP_BUDGETS``), each with
    the setting it most likely meant. The environment source ignores such a variable,
    so a budget given so was no budget at all. A provider's key variable
    (``api_key_env``) may start with ``LLMTAP_`` too, and is not one."""
    prefix = "LLMTAP_"
    known = {prefix + name.upper() for name in Settings.model_fields} | {
        CONFIG_ENV,
        INGRESS_LOCK_ENV,
        ADMIN_KEY_ENV,
    }
    known |= {provider.api_key_env.upper() for provider in settings.all_providers().values()}
    said = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(prefix) and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
            said.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return said


class ConfigError(Exception):
    """Settings that cannot be used, said for an operator: what is wrong, and where."""


def load_settings(config_file: str | None = None) -> Settings:
    """Load settings; a config file given here is also exported for child processes.
    Raises :class:`ConfigError` for a file that is missing, not YAML or not a mapping,
    or a setting that is not valid (each one named)."""
    if config_file:
        os.environ[CONFIG_ENV] = str(Path(config_file).resolve())
    where = os.environ.get(CONFIG_ENV, "")
    try:
        return Settings()
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:  # a file it may not read, say
        raise ConfigError(f"{CONFIG_ENV}: {where} cannot be read: {exc}") from None
    except SettingsError as exc:  # a value its setting cannot parse (an LLMTAP_* JSON)
        raise ConfigError(f"invalid settings: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{CONFIG_ENV}: {where} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        origin = f"{where} and the LLMTAP_* environment" if where else "the LLMTAP_* environment"
        raise ConfigError(f"invalid settings (from {origin}): {exc}") from None
    except (ValueError, TypeError) as exc:  # what the file's YAML made is not settings
        raise ConfigError(
            f"{CONFIG_ENV}: {where} must be a mapping of setting names to values ({exc})"
        ) from None
