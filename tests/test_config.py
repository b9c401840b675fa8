"""Settings: embedded defaults, a YAML file, env overrides; and the README keeps up."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_origin
from urllib.parse import urlsplit

import chdb
import pytest
import trustme
import yaml
from clickhouse_connect.driver._chdbclient import ChdbClient
from clickhouse_connect.driver.httpclient import HttpClient
from pydantic import ValidationError

from llmtap.config import CONFIG_ENV, ConfigError, Settings, load_settings
from llmtap.dsn import CHDB_DSN_OPTIONS, HTTP_DSN_OPTIONS
from llmtap.pinned_config import pinned_config
from sql.store import Store, connect
from tests.conftest import Broker
from tests.fake_provider import free_ports

README = Path(__file__).parent.parent / "README.md"
COMPOSE = Path(__file__).parent.parent / "docker-compose.yml"
LLMTAP_SERVICES = ("store", "migrate", "worker", "ingress")


def test_env_overrides_yaml_which_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "llmtap.yaml"
    config.write_text("proxy_port: 9000\napi_port: 9001\nopenai_base_url: http://yaml/v1/\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("LLMTAP_OPENAI_BASE_URL", "http://env/v1")
    settings = Settings()
    assert settings.proxy_port == 9000  # from the file
    assert settings.api_port == 9001
    assert settings.openai_base_url == "http://env/v1"  # env wins
    assert settings.anthropic_base_url == "https://api.anthropic.com"  # default


def test_a_bad_value_names_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTAP_PROXY_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="proxy_port"):
        Settings()


def test_the_worker_serves_its_metrics_on_a_port_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`llmtap up` runs every process on one host: on the defaults, the worker's
    /metrics takes no port the proxy, the API or the embedded broker has."""
    defaults = Settings()
    assert (defaults.worker_metrics_host, defaults.worker_metrics_port) == ("127.0.0.1", 8082)
    broker_port = int(defaults.kafka_bootstrap.rsplit(":", 1)[1])
    taken = {defaults.proxy_port, defaults.api_port, broker_port}
    assert len(taken | {defaults.worker_metrics_port}) == len(taken) + 1
    monkeypatch.setenv("LLMTAP_WORKER_METRICS_PORT", "0")  # not served
    assert Settings().worker_metrics_port == 0
    monkeypatch.setenv("LLMTAP_WORKER_METRICS_PORT", "65536")
    with pytest.raises(ValidationError, match="worker_metrics_port"):
        Settings()


def test_two_budgets_of_one_name_are_refused() -> None:
    """A budget's state is published, enforced and stored by its name: two budgets of one
    name would count into one state with either's limit."""
    budget = {"name": "x", "scope": "team", "value": "search", "limit_usd": "10"}
    with pytest.raises(ValidationError, match="budget names must be unique"):
        Settings(budgets=[budget, {**budget, "value": "ads"}])


def test_calls_are_kept_for_a_whole_period_of_every_budget() -> None:
    """On the embedded broker, which forgets it when it stops, a budget's spend is rebuilt
    from its period's stored calls: deleted before the period ends, they would be spend
    forgotten and a hard cap spent again."""
    monthly = {"name": "m", "scope": "team", "value": "search", "limit_usd": "10"}
    weekly = {**monthly, "name": "w", "period": "week"}
    assert Settings(budgets=[weekly], raw_retention_days=7).raw_retention_days == 7
    Settings(budgets=[monthly], raw_retention_days=31)
    with pytest.raises(ValidationError, match=r"budget 'm' counts a month: raw_retention_days"):
        Settings(budgets=[monthly], raw_retention_days=30)
    with pytest.raises(ValidationError, match=r"at least 7"):
        Settings(budgets=[weekly], raw_retention_days=6)
    # On Kafka, the compacted budgets topic keeps the spend.
    Settings(budgets=[monthly], raw_retention_days=14, embedded_broker=False)


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        ({"limit_usd": "1e30"}, r"budgets.0.limit_usd\n  Input should be less than 1000000000"),
        ({"limit_usd": "1000000000"}, r"budgets.0.limit_usd\n  Input should be less than"),
        ({"limit_usd": "0"}, r"budgets.0.limit_usd\n  Input should be greater than 0"),
        ({"thresholds": [-5, 0]}, r"budgets.0.thresholds.0\n  Input should be greater than 0"),
        ({"thresholds": [50, 50]}, r"budgets.0.thresholds\n.*thresholds must be distinct"),
        # Stored to nine places: an alert's baseline (the limit) of 1e-10 was stored as 0.
        ({"limit_usd": "0.0000000001"}, r"budgets.0.limit_usd\n.*no more than 9 decimal"),
        # A tenant budget counts its tenant's calls: another's `tenant` matched none.
        (
            {"scope": "tenant", "value": "acme", "tenant": "other"},
            r"budgets.0\n.*budget 'x' of tenant 'acme' names another tenant, 'other'",
        ),
    ],
)
def test_a_budget_whose_limit_or_thresholds_cannot_work_is_refused(
    given: dict[str, object], refused: str
) -> None:
    """A limit of 10^30 was taken, and each of its alerts (the limit is their baseline)
    went to dead letters; a threshold of -5% alerted at once, and [50, 50] twice."""
    budget = {"name": "x", "scope": "team", "value": "search", "limit_usd": "10"}
    with pytest.raises(ValidationError, match=refused):
        Settings(budgets=[{**budget, **given}])
    # The largest amount money columns hold, and an overspend alert past 100%.
    kept = Settings(
        budgets=[{**budget, "limit_usd": "999999999.999999999", "thresholds": [50, 150]}]
    ).budgets[0]
    assert kept.thresholds == (50, 150)
    # Trailing zeros are no places of their own; a tenant budget may name its own tenant.
    Settings(budgets=[{**budget, "limit_usd": "10.0000000000"}])
    Settings(budgets=[{**budget, "scope": "tenant", "value": "acme", "tenant": "acme"}])


@pytest.mark.parametrize(
    "bootstrap", ["not-a-host", "", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:0", "::1:9092"]
)
def test_a_kafka_bootstrap_that_is_no_list_of_host_port_is_refused(
    bootstrap: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """Each was taken: `llmtap up` then waited 120 s for a broker at no address, or
    raised OverflowError for the port 99999."""
    config = tmp_path / "llmtap.yaml"
    config.write_text(yaml.safe_dump({"kafka_bootstrap": bootstrap}))
    assert cli(["--config", str(config), "keys", "list"]) == 2
    err = capsys.readouterr().err
    assert "kafka_bootstrap\n" in err and "comma-separated list of host:port" in err, err
    assert f"{bootstrap!r} is not host:port" in err


def test_kafka_bootstrap_takes_host_names_addresses_and_bracketed_ipv6() -> None:
    for bootstrap in (
        "kafka-1:9092, kafka-2.internal:9093",
        "10.0.0.1:9092",
        "[::1]:65535",
        "kafka.example.com.:9092",  # a fully qualified name, its final dot written
    ):
        assert Settings(kafka_bootstrap=bootstrap).kafka_bootstrap == bootstrap


def test_a_webhook_filter_on_a_dimension_no_alert_has_is_refused() -> None:
    """A typo in `dimensions` ("teams") was taken, and the endpoint silently received
    no alert at all."""
    hook = {"name": "oncall", "url": "https://hooks.example.com/x", "secret": "whsec_" + "A" * 32}
    with pytest.raises(
        ValidationError, match=r"webhooks\.0\.dimensions\.0\n  Input should be 'tenant'"
    ):
        Settings(webhooks=[{**hook, "dimensions": ["teams"]}])
    assert Settings(webhooks=[{**hook, "dimensions": ["team", "model"]}]).webhooks[
        0
    ].dimensions == (
        "team",
        "model",
    )


def test_a_route_to_a_provider_that_is_not_configured_is_refused() -> None:
    """It was taken, and each call it routed got a 400 blaming the client."""
    groq = {"groq": {"base_url": "https://api.groq.com/openai/v1"}}
    refused = (
        r"model_routes: 'llama-\*' is routed to provider 'ghost', which is not configured "
        r"\(providers: openai, anthropic, groq;"
    )
    with pytest.raises(ValidationError, match=refused):
        Settings(providers=groq, model_routes={"gpt-*": "openai", "llama-*": "ghost"})
    routes = {"gpt-*": "openai", "claude-*": "anthropic", "llama-*": "groq"}
    assert Settings(providers=groq, model_routes=routes).model_routes == routes


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        ({"providers": {"groq": {"base_url": "not a url"}}}, "providers.groq.base_url"),
        (
            {"providers": {"groq": {"base_url": "ftp://files.example/v1"}}},
            "providers.groq.base_url",
        ),
        ({"providers": {"groq": {"base_url": "http://h:99999/v1"}}}, "providers.groq.base_url"),
        ({"providers": {"openai": {"base_url": "api.openai.com/v1"}}}, "providers.openai.base_url"),
        ({"openai_base_url": ""}, "openai_base_url"),
        ({"providers": {"openai": {"base_url": ""}}}, "providers.openai.base_url"),
        ({"anthropic_base_url": "api.anthropic.com"}, "anthropic_base_url"),
    ],
)
def test_a_provider_url_that_is_no_http_url_with_a_host_is_refused(
    given: dict[str, object], refused: str
) -> None:
    """Each was taken, and every call to the provider got a 502."""
    with pytest.raises(ValidationError, match=rf"{refused}\n  Value error, must be an http://"):
        Settings.model_validate(given)
    local = Settings(providers={"local": {"base_url": "http://[::1]:11434/v1/"}})
    assert local.providers_by_name["local"].base_url == "http://[::1]:11434/v1"


def test_two_spike_rules_of_one_name_are_refused() -> None:
    rule = {"name": "x", "dimension": "team", "metric": "cost"}
    Settings(spike_rules=[rule, {**rule, "name": "y"}])
    with pytest.raises(ValidationError, match="spike rule names must be unique"):
        Settings(spike_rules=[rule, {**rule, "metric": "requests"}])


def test_an_unknown_key_in_the_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "llmtap.yaml"
    config.write_text("proxy_prot: 9000\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    with pytest.raises(ValidationError, match="proxy_prot"):
        Settings()


def test_embedded_store_lives_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.store_dsn == f"chdb:///{tmp_path.resolve() / 'clickhouse'}"
    assert settings.embedded_store
    assert not Settings(clickhouse_dsn="http://ch:8123/llmtap").embedded_store


NOT_PEM = str(Path(__file__))  # a file, but no certificate
SSL_OUTSIDE = {"embedded_broker": False, "kafka_security_protocol": "SSL"}


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        ({"kafka_security_protocol": "SSL"}, "embedded broker speaks PLAINTEXT only"),
        ({**SSL_OUTSIDE, "kafka_security_protocol": "SASL_SSL"}, "needs kafka_sasl_username"),
        ({"kafka_sasl_username": "svc", "kafka_sasl_password": "pw"}, "need kafka_security_proto"),
        ({"kafka_ssl_cafile": NOT_PEM}, "need kafka_security_protocol SSL or SASL_SSL"),
        ({**SSL_OUTSIDE, "kafka_ssl_keyfile": NOT_PEM}, "needs kafka_ssl_certfile"),
        ({**SSL_OUTSIDE, "kafka_ssl_cafile": "no-such.pem"}, "kafka_ssl_cafile"),
        (
            {**SSL_OUTSIDE, "kafka_ssl_cafile": NOT_PEM},
            "kafka_ssl_cafile .*: NO_CERTIFICATE_OR_CRL_FOUND",
        ),
        (
            {**SSL_OUTSIDE, "kafka_ssl_certfile": NOT_PEM},
            "kafka_ssl_certfile .*: no PEM certificate in it",
        ),
    ],
)
def test_kafka_security_that_cannot_work_is_refused_naming_the_setting(
    given: dict[str, object], refused: str
) -> None:
    with pytest.raises(ValidationError, match=refused):
        Settings.model_validate(given)


def test_the_environment_replaces_a_map_of_the_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-settings merges maps across sources: the file's routes stayed under the
    environment's (a more specific one of the file beating the environment's), and
    ``LLMTAP_PROVIDERS='{}'`` removed none of the file's providers."""
    config = tmp_path / "llmtap.yaml"
    config.write_text(
        "providers:\n  groq:\n    base_url: https://api.groq.com/openai/v1\n"
        "model_routes:\n  'gpt-4o*': groq\n"
        "proxy_port: 9000\n"
    )
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("LLMTAP_MODEL_ROUTES", '{"gpt-*": "openai"}')
    monkeypatch.setenv("LLMTAP_PROVIDERS", "{}")
    settings = Settings()
    assert settings.model_routes == {"gpt-*": "openai"}
    assert settings.providers == {}
    assert settings.proxy_port == 9000  # what the environment leaves alone: the file's
    assert Settings(model_routes={"x*": "openai"}).model_routes == {"x*": "openai"}


def test_an_empty_file_setting_means_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LLMTAP_KEYS_FILE=""`` (compose's ``${VAR:-}``) was the current directory: every
    call 401, the proxy logging the file unreadable every second."""
    monkeypatch.setenv("LLMTAP_KEYS_FILE", "")
    monkeypatch.setenv("LLMTAP_PRICING_FILE", "")
    settings = Settings(data_dir=tmp_path)
    assert settings.key_file == tmp_path / "keys.yaml"
    assert settings.pricing_file is None
    # Empty in the environment, set in the file: the file's (an empty value is unset).
    config = tmp_path / "llmtap.yaml"
    config.write_text(f"keys_file: {tmp_path / 'team-keys.yaml'}\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    assert Settings(data_dir=tmp_path).key_file == tmp_path / "team-keys.yaml"


# The settings the environment gives as JSON: the lists and maps.
JSON_SETTINGS = [
    name
    for name, field in Settings.model_fields.items()
    if get_origin(field.annotation) in (list, tuple, dict)
]


def test_an_empty_variable_of_a_json_setting_is_no_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LLMTAP_PROVIDERS=`` (compose's ``${VAR:-}``) stopped llmtap at start: "" is no
    JSON. It is no setting: the file's, else the default."""
    assert {"admin_key_hashes", "providers", "model_routes", "cors_origins", "webhooks"} | {
        "budgets",
        "window_sizes_s",
        "spike_rules",
    } <= set(JSON_SETTINGS)
    for name in JSON_SETTINGS:
        monkeypatch.setenv(f"LLMTAP_{name.upper()}", "")
    monkeypatch.setenv("LLMTAP_PROXY_HOST", "")  # a string's empty value is as given
    settings = Settings()
    for name in JSON_SETTINGS:
        assert getattr(settings, name) == Settings.model_fields[name].get_default(
            call_default_factory=True
        ), name
    assert settings.proxy_host == ""
    file_says = {
        "admin_key_hashes": ["a" * 64],
        "providers": {"groq": {"base_url": "https://api.groq.com/openai/v1"}},
        "model_routes": {"llama-*": "groq"},
        "cors_origins": ["https://app.example.com"],
        "window_sizes_s": [30, 60],
        "budgets": [{"name": "b", "scope": "tenant", "value": "t", "limit_usd": "5"}],
    }
    config = tmp_path / "llmtap.yaml"
    config.write_text(yaml.safe_dump(file_says))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    settings = Settings()
    assert settings.admin_key_hashes == ["a" * 64]
    assert settings.providers["groq"].base_url == "https://api.groq.com/openai/v1"
    assert settings.model_routes == {"llama-*": "groq"}
    assert settings.cors_origins == ("https://app.example.com",)
    assert settings.window_sizes_s == (30, 60)
    assert [budget.name for budget in settings.budgets] == ["b"]
    assert settings.webhooks == [] and settings.spike_rules == []


def test_an_empty_list_or_map_in_the_config_file_is_no_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A templated file left empty (``cors_origins: "{{ .Values.cors }}"``) is as the
    variable: the default, not a start error."""
    config = tmp_path / "llmtap.yaml"
    config.write_text("".join(f'{name}: ""\n' for name in JSON_SETTINGS))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    settings = load_settings()
    for name in JSON_SETTINGS:
        assert getattr(settings, name) == Settings.model_fields[name].get_default(
            call_default_factory=True
        ), name


@pytest.mark.parametrize("name", JSON_SETTINGS)
def test_a_json_setting_s_variable_that_is_no_json_is_refused_naming_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"LLMTAP_{name.upper()}", "[")
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_urls_of_ipv6_hosts_are_bracketed() -> None:
    """``http://::1:8081/healthz`` is no URL: ``llmtap up`` on an IPv6 host never saw its
    store ready, and gave up after two minutes."""
    settings = Settings(proxy_host="::1", api_host="::", proxy_port=8080, api_port=8081)
    assert settings.proxy_url == "http://[::1]:8080/v1"
    assert settings.api_url == "http://[::]:8081/api/v1"
    assert urlsplit(settings.health_url("store")).hostname == "::"
    assert Settings().health_url("ingress") == "http://127.0.0.1:8080/healthz"


def test_the_clickhouse_passwords_are_never_in_the_settings_repr() -> None:
    """As the SASL password is not: a settings object shown in a log line, a traceback
    with its locals or an error report must not carry the store's password, nor a
    webhook URL (a Slack one's path is its secret)."""
    settings = Settings(
        clickhouse_dsn="http://llmtap:hunter2@ch:8123/llmtap",
        sql_dsn="http://llmtap_sql:swordfish@ch:8123/llmtap",
        webhooks=[
            {
                "name": "slack",
                "url": "https://hooks.slack.com/services/T0/B0/s3cr3t",
                "secret": "whsec_" + "A" * 32,
            }
        ],
    )
    shown = repr(settings) + str(settings)
    for secret in ("hunter2", "swordfish", "s3cr3t"):
        assert secret not in shown
    assert settings.clickhouse_dsn.endswith("@ch:8123/llmtap")


def test_a_refused_setting_never_shows_the_secrets_given_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMTAP_CLICKHOUSE_DSN", "clickhouse://llmtap:hunter2@ch:9000/llmtap")
    with pytest.raises(ValidationError) as refused:  # the DSN's scheme, with its password
        Settings()
    assert "clickhouse_dsn" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    monkeypatch.delenv("LLMTAP_CLICKHOUSE_DSN")
    monkeypatch.setenv("LLMTAP_KAFKA_SASL_PASSWORD", "hunter2")
    with pytest.raises(ValidationError) as refused:  # all given, SASL on the embedded broker
        Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="llmtap")
    assert "embedded broker speaks PLAINTEXT only" in str(refused.value)
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        ({"tls_keyfile": NOT_PEM}, "tls_keyfile needs tls_certfile"),
        ({"tls_certfile": NOT_PEM}, "tls_certfile .*: no PEM certificate in it"),
        ({"tls_certfile": "no-such.pem"}, "tls_certfile"),
    ],
)
def test_https_that_cannot_work_is_refused_naming_the_setting(
    given: dict[str, object], refused: str
) -> None:
    with pytest.raises(ValidationError, match=refused):
        Settings.model_validate(given)


def test_a_server_certificate_without_its_key_is_refused_saying_what_is_missing(
    tmp_path: Path,
) -> None:
    """OpenSSL says "[SSL] PEM lib (_ssl.c:3926)" for a certificate with no key, a key
    file that holds none, and a file that is no certificate alike: each is told apart,
    naming the setting whose file lacks what."""
    issued = trustme.CA().issue_cert("llmtap.example")
    cert, key, other = tmp_path / "cert.pem", tmp_path / "key.pem", trustme.CA()
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    with pytest.raises(ValidationError, match=r"tls_certfile .*: a certificate without its PEM"):
        Settings(tls_certfile=cert)
    with pytest.raises(ValidationError, match=r"tls_keyfile .*: no PEM private key in it"):
        Settings(tls_certfile=cert, tls_keyfile=NOT_PEM)
    with pytest.raises(ValidationError, match=r"tls_certfile .*: no PEM certificate in it"):
        Settings(tls_certfile=key, tls_keyfile=key)
    stranger = tmp_path / "stranger.pem"
    other.issue_cert("x").private_key_pem.write_to_path(str(stranger))
    with pytest.raises(ValidationError, match=r"tls_keyfile .*: KEY_VALUES_MISMATCH"):
        Settings(tls_certfile=cert, tls_keyfile=stranger)
    assert Settings(tls_certfile=cert, tls_keyfile=key).server_ssl_context is not None


def test_kafka_security_settings_make_the_clients_connection(tmp_path: Path) -> None:
    cafile = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(cafile))
    settings = Settings(
        embedded_broker=False,
        kafka_bootstrap="b-1.example:9096,b-2.example:9096",
        kafka_security_protocol="SASL_SSL",
        kafka_ssl_cafile=cafile,
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="llmtap",
        kafka_sasl_password="s3cret",
    )
    options = settings.kafka.client_options("ingress")
    assert options["client_id"] == "llmtap-ingress"
    assert options["security_protocol"] == "SASL_SSL"
    assert options["ssl_context"] is settings.kafka.ssl_context  # one for every client
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("llmtap", "s3cret")
    assert settings.kafka.faust_brokers() == [
        "kafka://b-1.example:9096",
        "kafka://b-2.example:9096",
    ]
    assert "s3cret" not in repr(settings) + repr(settings.kafka)  # never in a log line


def test_a_copy_of_the_settings_is_made_from_its_own_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What is derived from the settings (the Kafka connection, the providers) follows
    a copy's update, and an update that cannot work is refused as at start: pydantic's
    copy kept the original's, so a test's ingress given another broker reached the
    original's. The environment and the config file are not read again."""
    monkeypatch.setenv("LLMTAP_MODEL_ROUTES", '{"gpt-*": "openai"}')
    settings = Settings(kafka_bootstrap="a.example:9092", openai_base_url="http://a.example/v1")
    monkeypatch.setenv("LLMTAP_CONFIG", "/nonexistent/llmtap.yaml")  # gone since the start
    assert settings.model_copy(update={"model_routes": {}}).model_routes == {}
    assert settings.providers_by_name["openai"].base_url == "http://a.example/v1"
    moved = settings.model_copy(
        update={"kafka_bootstrap": "b.example:9092", "openai_base_url": "http://b.example/v1/"}
    )
    assert moved.kafka.bootstrap == "b.example:9092"
    assert moved.providers_by_name["openai"].base_url == "http://b.example/v1"
    assert settings.kafka.bootstrap == "a.example:9092"  # the original is untouched
    assert moved.model_copy(deep=True).kafka.bootstrap == "b.example:9092"
    with pytest.raises(ValidationError, match="embedded broker speaks PLAINTEXT only"):
        settings.model_copy(update={"kafka_security_protocol": "SASL_SSL"})


def test_readme_documents_every_setting() -> None:
    """In the Configuration table itself (other tables have rows named `providers` and
    `budgets`), and no row for a setting there is not."""
    text = README.read_text()
    table = text[text.index("\n## Configuration\n") : text.index("\n## The event contract\n")]
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", table, re.M))
    names = {name for pair in documented for name in pair if name}
    assert set(Settings.model_fields) - names == set()
    assert names - set(Settings.model_fields) == set()


def test_readme_names_every_kafka_client_id_and_no_other() -> None:
    """README (Sharing a Kafka cluster) lists the client.id of each Kafka client llmtap
    makes, for a broker's logs, metrics and quotas: it named `llmtap-store-reservations`
    (a client the store no longer makes) and not `llmtap-worker-budgets` (the worker's
    follower of the budgets topic), so a quota or an ACL written from it missed one."""
    root = README.parent
    source = "\n".join(
        path.read_text()
        for folder in ("ingress", "stream", "sinks", "llmtap")
        for path in (root / folder).rglob("*.py")
    )
    made = set(re.findall(r"\"((?:ingress|worker|store)(?:-[a-z]+)+)\"", source))
    made |= set(re.findall(r"(?:_options|client_id)\(\"([a-z-]+)\"\)", source))
    text = README.read_text()
    start = text.index("Every Kafka client says which of llmtap's it is")
    listed = set(re.findall(r"`llmtap-([a-z-]+)`", text[start : text.index("\n\n", start)]))
    assert listed == made


@pytest.mark.parametrize("where", ["before", "after", "last"])
def test_config_is_read_wherever_it_is_given(
    where: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """`llmtap --config F keys list`, `llmtap keys --config F list` and `llmtap keys
    list --config F` read the same file (the last, as the README's `alerts test
    --endpoint E --config F`, was refused)."""
    from ingress.guards.keys import create_key

    keys_file = tmp_path / "team-keys.yaml"
    config = tmp_path / "llmtap.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nkeys_file: {keys_file}\n")
    _, key = create_key(keys_file, tenant="acme")
    argv = ["--config", str(config), "keys", "list"]
    if where == "after":
        argv = ["keys", "--config", str(config), "list"]
    if where == "last":
        argv = ["keys", "list", "--config", str(config)]
    assert cli(argv) == 0
    assert key.id in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (None, "no config file at"),
        ("proxy_port: [1\n", "is not valid YAML"),
        ("- proxy_port\n- 8080\n", "must be a mapping of setting names to values"),
        ("proxy_port: -5\nprox_port: 9000\n", "proxy_port\n  Input should be greater"),
        ("providers: {groq: {kind: openai}}\n", "providers.groq: base_url is required"),
        # 0 is any free port: `llmtap up` waited 120 s for a proxy on port 0.
        ("proxy_port: 0\n", "proxy_port\n  Input should be greater than or equal to 1"),
    ],
)
def test_a_config_that_cannot_be_used_is_said_plainly_not_with_a_traceback(
    text: str | None,
    said: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """Every command (`llmtap up` too) read a bad config file by raising: a traceback
    ending in pyyaml's, pydantic's or pydantic-settings' own error, exit status 1."""
    config = tmp_path / "llmtap.yaml"
    if text is not None:
        config.write_text(text)
    assert cli(["--config", str(config), "keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmtap: ") and said in err, err
    assert "Traceback" not in err
    if "prox_port" in (text or ""):
        assert "prox_port\n  Extra inputs are not permitted" in err  # each one named


def test_an_environment_variable_that_cannot_be_parsed_is_named_as_such(
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It was said as a config file that is no mapping (LLMTAP_CONFIG empty or not)."""
    monkeypatch.setenv("LLMTAP_ADMIN_KEY_HASHES", "abc")  # JSON expected
    assert cli(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmtap: invalid settings: error parsing value for field "), err
    assert '"admin_key_hashes"' in err and "mapping" not in err


def test_an_environment_variable_that_names_no_setting_is_said(
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The environment source ignores an LLMTAP_* variable it has no setting for: a
    budget given as LLMTAP_BUDGET (for LLMTAP_BUDGETS) was no budget, silently. Such a
    variable is now logged at WARNING with the setting it likely meant; a provider's
    key variable named LLMTAP_* is not one."""
    monkeypatch.setenv("LLMTAP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LLMTAP_BUDGET", '[{"scope": "tenant", "owner": "acme"}]')
    monkeypatch.setenv("LLMTAP_NOTHING_LIKE_IT", "1")
    monkeypatch.setenv(
        "LLMTAP_PROVIDERS",
        '{"groq": {"kind": "openai", '
        '"base_url": "https://api.groq.com/openai/v1", "api_key_env": "LLMTAP_GROQ"}}',
    )
    monkeypatch.setenv("LLMTAP_GROQ", "gsk-secret")
    assert cli(["keys", "list"]) == 0
    err = capsys.readouterr().err
    assert "LLMTAP_BUDGET (did you mean LLMTAP_BUDGETS?) is not a setting" in err, err
    assert "LLMTAP_NOTHING_LIKE_IT is not a setting" in err
    assert "LLMTAP_GROQ " not in err and "LLMTAP_DATA_DIR" not in err
    assert "gsk-secret" not in err and "acme" not in err  # names only, never values


def test_up_s_children_read_the_config_as_it_was_at_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child `llmtap up` restarts (a crash, a broker restart) read the config file
    again: edited meanwhile, the restarted proxy listened on the new port, which `up`
    neither checked nor announced, and broken YAML made it crash again and again. They
    now read a copy made at the start: `up`'s own (a second `up`, failing on the same
    ports, replaces nothing of it), its owner's only (it may hold secrets), gone at the
    end."""
    monkeypatch.setenv(CONFIG_ENV, "")  # recorded, so teardown restores it (or its absence)
    config = tmp_path / "llmtap.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nproxy_port: 19180\n")
    config.chmod(0o600)
    with pinned_config(load_settings(str(config))) as settings:
        config.write_text("proxy_port: 19186\n")  # edited while up runs
        child = Settings()  # as a child process loads them, from the environment it inherits
        assert (settings.proxy_port, child.proxy_port) == (19180, 19180)
        assert child.data_dir == tmp_path / "data"
        config.write_text("proxy_port: [\n")
        assert Settings().proxy_port == 19180
        [copy] = (tmp_path / "data" / "run").glob("config.*.yaml")
        assert copy.stat().st_mode & 0o777 == 0o600
        config.write_text(f"data_dir: {tmp_path / 'data'}\nproxy_port: 19190\n")
        with monkeypatch.context() as another:  # a second `up`, another process
            another.setattr(os, "getpid", lambda: 2**22 + 1)  # past Linux's pid_max
            another.setenv(CONFIG_ENV, "")
            with pinned_config(load_settings(str(config))) as second:
                assert second.proxy_port == 19190
        assert copy.read_text().endswith("proxy_port: 19180\n")  # the first's, untouched
        assert Settings().proxy_port == 19180
    assert not copy.exists()


def compose_service(name: str) -> tuple[dict[str, str], dict[str, str]]:
    """A docker-compose.yml service's environment, each ``${VAR:-default}`` taken at its
    default (``${VAR}``: empty), and its volumes as mount point -> volume name."""
    service = yaml.safe_load(COMPOSE.read_text())["services"][name]
    env = {
        key: re.sub(r"\$\{\w+(?::-([^}]*))?\}", lambda m: m[1] or "", str(value))
        for key, value in service.get("environment", {}).items()
    }
    volumes = dict(reversed(v.split(":")[:2]) for v in service.get("volumes", []))
    return env, volumes


@pytest.mark.parametrize("name", LLMTAP_SERVICES)
def test_compose_services_give_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LLMTAP_ variable in docker-compose.yml names a setting (the environment
    source ignores a misspelt one) and the values validate."""
    env, _ = compose_service(name)
    named = {k.removeprefix("LLMTAP_").lower() for k in env if k.startswith("LLMTAP_")}
    assert named - set(Settings.model_fields) == set()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert not settings.embedded_broker


def test_compose_exposes_each_workers_metrics_to_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker serves /metrics on every address of its container, on the port
    compose exposes (to the network, not the host: `--scale worker=N` would have N
    containers bind one host port)."""
    env, _ = compose_service("worker")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    service = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    assert settings.worker_metrics_host == "0.0.0.0"
    assert str(settings.worker_metrics_port) in service["expose"]
    assert "ports" not in service


@pytest.mark.parametrize(
    ("name", "port"),
    [("store", "api_port"), ("worker", "worker_metrics_port"), ("ingress", "proxy_port")],
)
def test_compose_checks_each_service_s_health_at_its_own_healthz(
    name: str, port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's too: its ready file is left only by the worker given the cost
    stage's partitions, so with budgets the replicas standing by would show unhealthy
    for good."""
    env, _ = compose_service(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    test = " ".join(yaml.safe_load(COMPOSE.read_text())["services"][name]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{getattr(settings, port)}/healthz" in test


def test_compose_runs_the_clickhouse_release_the_tests_run() -> None:
    """chDB embeds ClickHouse's engine: the server of docker-compose.yml is its release,
    so what the tests check (migrations, EXPLAIN's output the SQL endpoint reads, its
    function list) is what production runs. A chDB upgrade (pyproject.toml pins its
    release) moves the compose file's with it."""
    image = yaml.safe_load(COMPOSE.read_text())["services"]["clickhouse"]["image"]
    release = ".".join(chdb.engine_version.split(".")[:2])
    assert image == f"clickhouse/clickhouse-server:{release}"


def test_compose_s_kafka_makes_no_topic_a_client_names_before_llmtap_made_it() -> None:
    """Kafka's auto.create.topics.enable is on unless told: a send, or a consumer's
    metadata request (aiokafka asks the broker to make what it names), that came before
    llmtap had made its topics made them with the broker's defaults, cleanup.policy
    delete for llmtap.budgets, .reservations and .checkpoints, which must be compacted
    (a budget's state gone after retention.ms). The apache/kafka image reads a property
    from KAFKA_ and its name with '.' as '_', '_' as '__' and '-' as '___'.
    (tests/test_topics.py: `llmtap up` on a broker that makes no topic itself.)"""
    env, _ = compose_service("kafka")
    properties = {
        re.sub(
            "_+", lambda m: {1: ".", 2: "_", 3: "-"}[len(m[0])], key.removeprefix("KAFKA_")
        ).lower(): value
        for key, value in env.items()
        if key.startswith("KAFKA_")
    }
    assert properties["auto.create.topics.enable"] == "false"
    assert properties["log.dirs"] == "/var/lib/kafka/data"  # the reading holds


def test_compose_s_clickhouse_user_can_make_the_sql_endpoint_s_own() -> None:
    """The ClickHouse image removes its default user and makes CLICKHOUSE_USER without
    ACCESS MANAGEMENT unless told: no user could then run the README's CREATE USER for
    the SQL endpoint's user (sql_dsn), which the compose file offers to enable."""
    env, _ = compose_service("clickhouse")
    assert env["CLICKHOUSE_USER"] == "llmtap"
    assert env["CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT"] == "1"
    store, _ = compose_service("store")
    assert urlsplit(store["LLMTAP_CLICKHOUSE_DSN"]).username == env["CLICKHOUSE_USER"]


def test_compose_store_and_ingress_read_one_key_file_and_the_spool_persists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key made in one container is seen by the proxy and the analytics API; the
    ingress's spool outlives its container."""
    mounted = []
    for name in ("store", "ingress"):
        env, volumes = compose_service(name)
        with monkeypatch.context() as service:  # one service's environment at a time
            for key, value in env.items():
                service.setenv(key, value)
            settings = Settings()
        mounted.append(volumes.get(str(settings.key_file.parent)))
        if name == "ingress":
            assert volumes.get(str(settings.data_dir)) is not None  # spool_dir is under it
    assert mounted[0] is not None
    assert mounted[0] == mounted[1]


def test_compose_migrates_once_before_any_store_starts() -> None:
    """Each store migrated at its start, and `docker-compose up -d` (an upgrade's) starts
    them together: two applying a backfill at once counted its calls twice. One
    `llmtap migrate` runs first, with the store's settings (its retention), and the
    stores start only once it succeeded. ClickHouse is ready when its server answers at
    the container's address: the image's first server, making the user and database,
    listens on localhost only."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["llmtap", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["clickhouse"] == {"condition": "service_healthy"}
    stores = [name for name in LLMTAP_SERVICES if services[name]["command"][1] == "store"]
    assert stores
    for name in stores:
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
        assert compose_service(name)[0] == compose_service("migrate")[0]
    probe = services["clickhouse"]["healthcheck"]["test"]
    assert probe[0] == "CMD-SHELL"
    assert "http://$$(hostname):8123/ping" in probe[1]
    assert "localhost" not in probe[1] and "127.0.0.1" not in probe[1]


@pytest.mark.parametrize("name", LLMTAP_SERVICES)
def test_the_image_runs_llmtap_under_an_init(name: str) -> None:
    """As PID 1 a process ignores every signal it has no handler for: a SIGTERM in
    llmtap's first second (its imports, before its handlers) was lost, and `docker
    stop` (or Kubernetes) waited out the grace, then killed it. The image's entrypoint
    is tini, and no service replaces it, so llmtap is a child wherever the image runs."""
    entrypoints = [
        json.loads(line.removeprefix("ENTRYPOINT"))
        for line in (COMPOSE.parent / "Dockerfile").read_text().splitlines()
        if line.startswith("ENTRYPOINT")
    ]
    assert entrypoints == [["tini", "--"]]
    assert "entrypoint" not in yaml.safe_load(COMPOSE.read_text())["services"][name]


def test_compose_gives_the_ingress_longer_to_stop_than_its_calls_in_flight_may_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Docker kills a container 10 s after SIGTERM unless told otherwise: a stream in
    flight at a deploy would be cut before the ingress's own grace ran out, and its
    events with it."""
    env, _ = compose_service("ingress")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    period = yaml.safe_load(COMPOSE.read_text())["services"]["ingress"]["stop_grace_period"]
    seconds = re.fullmatch(r"(\d+)s", period)
    assert seconds is not None
    settings = Settings()
    # its delay (taking calls while unready), its grace, and its events flushed after
    assert int(seconds[1]) > settings.shutdown_delay_s + settings.shutdown_grace_s + 10


def test_a_provider_named_like_a_built_in_one_changes_only_what_it_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`openai: {default_service_tier: priority}` under providers (as the README says to
    set it on the built-in one) keeps OpenAI's URL and the key in OPENAI_API_KEY: it
    replaced the built-in whole, with no key, and every OpenAI call was a 500. A
    provider named otherwise needs a base_url, and the error says so."""
    config = tmp_path / "llmtap.yaml"
    config.write_text(
        "providers:\n"
        "  openai: {default_service_tier: priority}\n"
        "  anthropic: {base_url: http://relay.example/}\n"
        "  local: {base_url: http://127.0.0.1:11434/v1}\n"
    )
    monkeypatch.setenv(CONFIG_ENV, str(config))
    providers = Settings().providers_by_name
    openai = providers["openai"]
    assert (openai.kind, openai.base_url, openai.api_key_env) == (
        "openai",
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
    )
    assert openai.default_service_tier == "priority"
    anthropic = providers["anthropic"]
    assert (anthropic.kind, anthropic.base_url, anthropic.api_key_env) == (
        "anthropic",
        "http://relay.example",
        "ANTHROPIC_API_KEY",
    )
    assert (providers["local"].base_url, providers["local"].api_key_env) == (
        "http://127.0.0.1:11434/v1",
        "",
    )
    config.write_text("providers:\n  groq: {api_key_env: GROQ_API_KEY}\n")
    with pytest.raises(ValidationError, match=r"providers\.groq: base_url is required"):
        Settings()


def test_the_providers_whose_key_is_unset_are_those_that_take_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key's variable unset or blank is unset; a provider that takes no key (no
    api_key_env: a local server) is never listed."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-set")
    monkeypatch.setenv("ANTHROPIC_API_KEY", " \n")  # a blank secret file's
    monkeypatch.delenv("LLMTAP_TEST_GROQ_KEY", raising=False)
    settings = Settings(
        providers={
            "groq": {
                "base_url": "https://api.groq.com/openai/v1",
                "api_key_env": "LLMTAP_TEST_GROQ_KEY",
            },
            "local": {"base_url": "http://127.0.0.1:11434/v1"},
        }
    )
    assert settings.keys_unset() == {
        "anthropic": "ANTHROPIC_API_KEY",
        "groq": "LLMTAP_TEST_GROQ_KEY",
    }


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "No such file or directory"),
        ("models: [", "while parsing"),
        ("models: {x: {provider: openai, prices: [{input: '1'}]}}", "effective_from"),
        # A model priced twice: the first price was dropped without a word.
        (
            "models:\n"
            "  my-model: {provider: openai, prices: [{effective_from: 2025-01-01,\n"
            "             input: '1', output: '2'}]}\n"
            "  my-model: {provider: openai, prices: [{effective_from: 2025-01-01,\n"
            "             input: '0.1', output: '0.2'}]}\n",
            "found duplicate key 'my-model'",
        ),
    ],
)
def test_up_refuses_a_pricing_file_it_cannot_load_before_starting_anything(
    tmp_path: Path, content: str | None, error: str
) -> None:
    """A pricing_file missing, not YAML or not the catalog's format is a setting `llmtap
    up` cannot use: one message naming it, exit status 2, nothing started. It was found by
    the worker only, after the broker and the store had been started: a traceback, and
    `up` gave up with status 1 (the ingress and a lone `llmtap worker` the same)."""
    prices = tmp_path / "prices.yaml"
    if content is not None:
        prices.write_text(content)
    broker_port, proxy_port, api_port = free_ports(3)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path / "data"),
        "LLMTAP_PRICING_FILE": str(prices),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_PROXY_PORT": str(proxy_port),
        "LLMTAP_API_PORT": str(api_port),
        "LLMTAP_WORKER_METRICS_PORT": "0",
    }
    env.pop(CONFIG_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "llmtap", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert f"pricing_file {prices}" in out and error in out, out
    assert "Traceback" not in out and "started broker" not in out, out


def _dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's rules as Docker reads them (moby/patternmatcher): one a line,
    ``#`` a comment, ``!`` an exception, ``**`` any number of directories, ``*`` and
    ``?`` within one; each (is exception, regex of a context-relative path)."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex)))
    return rules


def _in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends ``path`` to the build: the last rule matching it (or one of
    its parent directories) decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not exception
    return not excluded


def _copied_into_image(paths: list[str]) -> set[str]:
    """Of ``paths`` (beside the Dockerfile), those its COPY instructions put in the image."""
    root = COMPOSE.parent
    rules = _dockerignore_patterns((root / ".dockerignore").read_text())
    context = [p for p in paths if _in_build_context(p, rules)]
    copied: set[str] = set()
    for line in (root / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY":
            continue
        *sources, _ = [w for w in words[1:] if not w.startswith("--")]
        for source in sources:
            source = os.path.normpath(source)
            copied |= {
                p for p in context if source == "." or p == source or p.startswith(source + "/")
            }
    return copied


def test_the_image_holds_what_pip_install_needs_and_no_file_of_secrets_beside_it() -> None:
    """docker-compose.yml builds the image from the directory it is in, where the README
    has the operator keep a `.env` (compose reads OPENAI_API_KEY, CLICKHOUSE_PASSWORD...
    from it), and likely the config file mounted as LLMTAP_CONFIG (webhook secrets, a
    SASL password) and Kafka's client key: none of it may end in an image layer."""
    root = COMPOSE.parent
    shipped = [
        str(path.relative_to(root))
        for top in ("llmtap", "ingress", "stream", "sinks", "sql")
        for path in (root / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ] + ["pyproject.toml", "README.md"]
    secrets_beside = [".env", "llmtap.yaml", "config/llmtap.yaml", "certs/client.key"]
    image = _copied_into_image(shipped + secrets_beside)
    assert set(shipped) <= image
    assert image & set(secrets_beside) == set()


@pytest.mark.parametrize(
    ("text", "twice"),
    [
        # A second budgets block (added at the end of the file) dropped the first's
        # budgets and their hard caps, with no word.
        (
            "budgets:\n  - {name: a, scope: tenant, value: acme, limit_usd: 10}\n"
            "proxy_port: 9000\n"
            "budgets:\n  - {name: b, scope: tenant, value: beta, limit_usd: 10}\n",
            "budgets",
        ),
        # A provider defined twice: the first definition was silently dropped.
        (
            "providers:\n  groq: {base_url: https://api.groq.com/openai/v1}\n"
            "  groq: {base_url: http://127.0.0.1:11434/v1}\n",
            "groq",
        ),
        # Inside an entry too: which limit holds?
        (
            "budgets:\n  - {name: a, scope: tenant, value: acme, limit_usd: 10, limit_usd: 1000}\n",
            "limit_usd",
        ),
    ],
)
def test_a_setting_given_twice_in_the_file_is_refused_naming_it(
    text: str,
    twice: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cli: Callable[[list[str]], int],
) -> None:
    """YAML's mapping keys are unique (YAML 1.2, 3.2.1.1); PyYAML keeps the last of
    a repeated one without a word, so half of what the operator wrote was not run."""
    config = tmp_path / "llmtap.yaml"
    config.write_text(text)
    assert cli(["--config", str(config), "keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmtap: ") and f"duplicate key {twice!r}" in err, err
    assert "Traceback" not in err
    # YAML's merge keys still merge (an entry given by an anchor, a field overridden).
    config.write_text(
        "budgets:\n  - &a {name: a, scope: tenant, value: acme, limit_usd: 10}\n"
        "  - {<<: *a, name: b, value: beta}\n"
    )
    assert [b.value for b in load_settings(str(config)).budgets] == ["acme", "beta"]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("window_grace_s", 1e11),  # now - grace: before year 1 (OverflowError at the first tick)
        ("window_grace_s", 1e14),  # timedelta(seconds=...): the worker exits as it starts
        ("window_sizes_s", [60, 60 * 10**10]),  # a window's end after year 9999
        ("window_sizes_s", [60, 60 * 71_582_789]),  # past 2^32: windows.size_s is a UInt32
    ],
)
def test_window_lengths_and_grace_the_worker_cannot_keep_are_refused(
    setting: str, value: object
) -> None:
    """They were taken, and the stream worker died on them, started again and again
    by `llmtap up` (or compose), with an OverflowError for the only word."""
    from datetime import UTC, datetime, timedelta

    from stream.windows import Windower

    with pytest.raises(ValidationError, match=setting):
        Settings.model_validate({setting: value})
    # The longest of each that is taken, the windows count and close with.
    longest = Settings(window_sizes_s=(60, 366 * 86400), window_grace_s=366 * 86400)
    windower = Windower(longest.window_sizes_s, timedelta(seconds=longest.window_grace_s))
    assert windower.advance(datetime.now(UTC), [0]) == []


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        # The worker started, and died at its group's join with aiokafka's "'i' format
        # requires -2147483648 <= n <= 2147483647" (an int32 of milliseconds), started
        # again and again by `llmtap up`. (Kafka refuses a join past its
        # group.max.session.timeout.ms, 30 minutes by default, too.)
        ("stream_session_timeout_s", "1e7"),
        # Each waited for the broker for ever, saying "waiting for the broker at ...:
        # ValueError: ... 'h' format requires -32768 <= number <= 32767" every second
        # (CreateTopics carries an int32 of partitions and an int16 of replicas).
        ("topic_replication_factor", "40000"),
        ("topic_partitions", "3000000000"),
    ],
)
async def test_a_number_kafka_cannot_carry_is_refused_before_the_worker_starts(
    setting: str, value: str, tmp_path: Path, broker: Broker
) -> None:
    import asyncio

    from tests.fake_provider import free_port

    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_KAFKA_BOOTSTRAP": broker.bootstrap,
        "LLMTAP_KAFKA_NAMESPACE": f"refused-{setting}",  # no topics of the session's made
        "LLMTAP_TOPIC_PARTITIONS": "2",
        "LLMTAP_WORKER_METRICS_PORT": str(free_port()),
        f"LLMTAP_{setting.upper()}": value,
    }
    env.pop(CONFIG_ENV, None)
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llmtap", "worker"),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(worker.communicate(), 30)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert worker.returncode == 2, err.decode()[-2000:]
    assert err.decode().startswith("llmtap: invalid settings") and setting in err.decode()
    # Kafka's own most, by default; and the protocol's.
    Settings(stream_session_timeout_s=1800, topic_replication_factor=32767)


@pytest.mark.parametrize(
    ("dsn", "said"),
    [
        # No data directory: chDB's in-memory store. `llmtap up` ran on it, every call
        # stored was gone when the store stopped, and `llmtap migrate` applied every
        # migration again each time, exit 0.
        ("chdb://", "no data directory"),
        ("chdb://memory", "no data directory"),
        # No host: clickhouse-connect's default, localhost:8123, whatever is there.
        ("http://", "host"),
        ("http://:8123/llmtap", "host"),
        # Taken, then "Port out of range 0-65535" from the store process at its start.
        ("http://clickhouse:99999/llmtap", "port"),
    ],
)
def test_a_clickhouse_dsn_that_names_no_store_is_refused(
    dsn: str, said: str, tmp_path: Path
) -> None:
    env = {**os.environ, "LLMTAP_DATA_DIR": str(tmp_path), "LLMTAP_CLICKHOUSE_DSN": dsn}
    env.pop(CONFIG_ENV, None)
    migrate = [sys.executable, "-m", "llmtap", "migrate"]
    done = subprocess.run(migrate, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr[-2000:])
    assert done.stderr.startswith("llmtap: invalid settings"), done.stderr
    assert "clickhouse_dsn" in done.stderr and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    Settings(clickhouse_dsn=f"chdb:///{tmp_path / 'clickhouse'}")  # a directory: taken
    Settings(clickhouse_dsn="https://user:pass@clickhouse:8443/llmtap")


def test_a_path_under_the_home_directory_is_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data_dir: ~/llmtap` in the config file made a directory named "~" in the current
    one and kept the store, the spool and the keys there (the shell expands a ~ in an
    environment variable; YAML does not; the webhook templates' paths were expanded)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "llmtap.yaml"
    config.write_text("data_dir: ~/llmtap\nkeys_file: ~/keys.yaml\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    settings = Settings()
    assert settings.data_dir == home / "llmtap"
    assert settings.key_file == home / "keys.yaml"
    assert settings.store_dsn == f"chdb:///{home / 'llmtap' / 'clickhouse'}"


# PostgreSQL's and clickhouse-jdbc's ways to ask for TLS, a ClickHouse setting, a
# name's case, a part the DSN gives: on a server, every option of a DSN is an argument
# of clickhouse-connect's HTTP client, none a ClickHouse setting, and the store's start
# failed with a TypeError naming no setting, after the broker was waited for (compose
# restarting it for ever).
_SERVER_OPTIONS_UNKNOWN = [
    ("https://llmtap:s3cret@ch:8443/llmtap?sslmode=require", "sslmode"),
    ("http://llmtap:s3cret@ch:8123/llmtap?ssl=true", "ssl"),
    ("http://llmtap:s3cret@ch:8123/llmtap?max_threads=4", "max_threads"),
    ("http://llmtap:s3cret@ch:8123/llmtap?ca_cert=/ca.pem&Connect_Timeout=5", "Connect_Timeout"),
    ("http://llmtap:s3cret@ch:8123/llmtap?password=other", "password"),
]


@pytest.mark.parametrize(
    ("setting", "dsn", "option"),
    [
        *(("clickhouse_dsn", dsn, option) for dsn, option in _SERVER_OPTIONS_UNKNOWN),
        *(("sql_dsn", dsn, option) for dsn, option in _SERVER_OPTIONS_UNKNOWN),
        # chDB's: clickhouse-connect ignored it, but for a warning.
        ("clickhouse_dsn", "chdb:///var/lib/llmtap?sslmode=require", "sslmode"),
    ],
)
def test_an_option_the_clickhouse_client_does_not_know_is_refused_naming_it(
    setting: str, dsn: str, option: str
) -> None:
    given = {"clickhouse_dsn": "http://llmtap:s3cret@ch:8123/llmtap", setting: dsn}
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate(given)
    said = str(refused.value)
    assert said.startswith(f"1 validation error for Settings\n{setting}\n"), said
    assert f"?{option}= is not an option" in said, said
    assert "query_limit" not in said, said  # refused: not offered as an option (was)
    assert "s3cret" not in said
    if dsn.startswith("http"):
        with pytest.raises(TypeError, match=option):  # what the store met at its start
            connect(dsn, {})


@pytest.mark.parametrize(
    "dsn",
    [
        "https://llmtap:s3cret@ch:8443/llmtap?ca_cert=/ca.pem&verify=true",
        "http://ch:8123/llmtap?user=llmtap&connect_timeout=5&send_receive_timeout=60",
        "http://llmtap:s3cret@ch:8123/llmtap?compression=lz4&client_name=llmtap",
        "chdb:///var/lib/llmtap?ch_max_threads=4&tz_mode=utc",
    ],
)
def test_an_option_the_clickhouse_client_knows_is_taken(dsn: str) -> None:
    assert Settings(clickhouse_dsn=dsn).clickhouse_dsn == dsn


def test_the_dsn_options_taken_are_those_clickhouse_connect_reads() -> None:
    """The options taken (llmtap/config.py) are the arguments of clickhouse-connect's
    clients a DSN's query can give: an upgrade that adds or drops one fails here."""
    # Given by the DSN itself or by llmtap (a duplicate argument), or not a string.
    not_from_a_query = {"self", "interface", "host", "port", "username", "password"}
    not_from_a_query |= {"database", "settings", "headers", "pool_mgr", "token_provider"}
    http = set(inspect.signature(HttpClient).parameters) - not_from_a_query
    assert HTTP_DSN_OPTIONS == http | {"user", "user_name", "compression"}
    chdb = set(inspect.signature(ChdbClient).parameters) - {"self", "settings", "chdb_options"}
    assert CHDB_DSN_OPTIONS == chdb


@pytest.mark.parametrize(
    ("dsn", "option"),
    [
        ("http://llmtap:s3cret@ch:8123/llmtap?query_limit=100", "query_limit"),
        ("chdb:///var/lib/llmtap/chdb?query_limit=100", "query_limit"),
        ("http://llmtap:s3cret@ch:8123/llmtap?session_id=llmtap", "session_id"),
        ("chdb:///var/lib/llmtap/chdb?ch_limit=100", "ch_limit"),
        ("chdb:///var/lib/llmtap/chdb?ch_offset=10", "ch_offset"),
    ],
)
def test_an_option_that_changes_llmtaps_own_queries_is_refused(dsn: str, option: str) -> None:
    """The client takes them, and llmtap's queries would then answer short (a LIMIT on
    each one with none) or fail when they overlap (one session)."""
    with pytest.raises(ValidationError, match=rf"\?{option}= is refused: it "):
        Settings(clickhouse_dsn=dsn)


def test_a_query_limit_would_cut_llmtaps_answers_short(tmp_path: Path) -> None:
    """Why ?query_limit= is refused: the client the store would make puts the limit on
    a query of llmtap's that has none."""
    store = Store(f"chdb://{tmp_path / 'chdb'}?query_limit=3")
    try:
        assert len(store.rows("SELECT number FROM system.numbers LIMIT 10")) == 10
        assert len(store.rows("SELECT number FROM numbers(10)")) == 3
    finally:
        store.close()


def test_a_limit_setting_would_cut_llmtaps_answers_short(tmp_path: Path) -> None:
    """Why ?ch_limit= is refused on chDB too: ClickHouse's setting ``limit`` cuts every
    answer, a LIMIT said or not (was: taken, as any ch_<setting>)."""
    store = Store(f"chdb://{tmp_path / 'chdb'}?ch_limit=3")
    try:
        assert len(store.rows("SELECT number FROM system.numbers LIMIT 10")) == 3
    finally:
        store.close()


@pytest.mark.parametrize(
    ("dsn", "option"),
    [
        ("http://llmtap:s3cret@ch:8123/llmtap?user=other", "user"),
        ("http://ch:8123/llmtap?user=llmtap&user_name=other", "user_name"),
        ("http://ch:8123/llmtap?compress=true&compression=lz4", "compression"),
    ],
)
def test_an_option_said_twice_is_refused_as_the_client_would_fail_on_it(
    dsn: str, option: str
) -> None:
    """user=, user_name= and compression= stand in for the DSN's user and compress= only
    when those are not given; otherwise clickhouse-connect passes them to its client."""
    with pytest.raises(ValidationError, match=rf"\?{option}= says again"):
        Settings(clickhouse_dsn=dsn)
    with pytest.raises(TypeError, match=option):  # what the store met at its start
        connect(dsn, {})
