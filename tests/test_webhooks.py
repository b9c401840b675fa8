"""Alert delivery (sinks/webhooks) on real parts: Tansu, chDB, and HTTP receivers here.

The receivers verify every signature with the `standardwebhooks` library, as a user's
receiver would. Each test's endpoints filter on a rule of their own, so alerts other
tests left on the shared topic are stored but never delivered to them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import sys
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from clickhouse_connect.driver.binding import format_bind_value
from prometheus_client import generate_latest
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from llmtap import topics
from llmtap.config import Settings
from llmtap.config_sections import BACKOFF_CAP_S, BudgetConfig, SpikeRule, WebhookEndpoint
from llmtap.events import Alert
from llmtap.kafka import Kafka
from llmtap.names import Names
from sinks.clickhouse.write import BOUND_BYTES
from sinks.metrics import store_registry
from sinks.webhooks import deliver, guard, probe, records, render, sign
from sinks.webhooks.dispatcher import MAX_BATCH, WebhookDispatcher, matches
from sinks.webhooks.worker import EndpointWorker, Owned
from sql.store import Store
from stream.baselines import sampling_noise
from stream.budgets import period_bounds
from stream.spikes import SeriesState, observe
from tests.conftest import Broker
from tests.fake_provider import free_port
from tests.prometheus import sample

SECRET = "whsec_" + base64.b64encode(b"llmtap-tests-webhook-secret-0032").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"llmtap-tests-webhook-secret-new1").decode()
TIMEOUT_S = 45  # every wait below is bounded by this


def make_alert(rule: str = "cost-spike", **changes: Any) -> Alert:
    start = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    fields: dict[str, Any] = {
        "event_id": uuid.uuid4(),
        "alert_type": "spike",
        "state": "firing",
        "severity": "warning",
        "rule": rule,
        "dimension": "team",
        "value": "search",
        "metric": "cost",
        "observed": Decimal("12.50"),
        "baseline": Decimal("3.10"),
        "window_start": start,
        "window_end": start + timedelta(minutes=5),
        "first_seen": start + timedelta(minutes=5),
        "message": "team search spent 4x its usual in 5 minutes",
    }
    return Alert(**(fields | changes))


def endpoint(name: str, url: str, **changes: Any) -> WebhookEndpoint:
    return WebhookEndpoint(name=name, url=url, secret=SECRET, backoff_s=0.01, **changes)


# -- rendering -------------------------------------------------------------------------


def test_json_template_is_the_full_alert() -> None:
    alert = make_alert(
        alert_type="budget", baseline=Decimal(1000), threshold=Decimal(80), period="week"
    )
    body = render.render(render.load("json"), alert)
    assert body.content_type == "application/json"
    assert Alert.model_validate_json(body.data) == alert
    assert json.loads(body.data)["period"] == "week"
    # A spike alert has no period: its payload is as before, with no such key.
    assert "period" not in json.loads(render.render(render.load("json"), make_alert()).data)


def test_slack_template_is_blocks_with_the_facts_escaped() -> None:
    alert = make_alert(value="r&d <all>", message="spend <doubled> & more")
    body = render.render(render.load("slack"), alert)
    message = json.loads(body.data)
    assert body.content_type == "application/json"
    assert message["text"] and message["blocks"][0]["type"] == "header"
    fields = [f["text"] for b in message["blocks"] if "fields" in b for f in b["fields"]]
    assert "*Scope*\nteam = r&amp;d &lt;all&gt;" in fields
    assert "*Observed*\n12.5" in fields and "*Baseline*\n3.1" in fields
    assert not any(f.startswith("*Tenant*") for f in fields)
    above = json.loads(render.render(render.load("slack"), make_alert(threshold=Decimal(5))).data)
    assert "*Alert above*\n5" in [f["text"] for f in above["blocks"][2]["fields"]]
    acme = json.loads(render.render(render.load("slack"), make_alert(tenant="a&b")).data)
    assert acme["text"].endswith("(team=search of tenant a&amp;b)")
    assert "*Tenant*\na&amp;b" in [f["text"] for f in acme["blocks"][2]["fields"]]
    assert "spend &lt;doubled&gt; &amp; more" in message["blocks"][1]["text"]["text"]


def test_text_template_is_one_short_line() -> None:
    alert = make_alert(rule="cost-spike", value="search", observed=Decimal("12.50"))
    body = render.render(render.load("text"), alert)
    text = body.data.decode()
    assert body.content_type.startswith("text/plain")
    assert "\n" not in text
    for fact in ("cost-spike", "search", "12.5", "FIRING"):
        assert fact in text
    assert "of tenant" not in text  # an alert of no tenant
    mine = render.render(render.load("text"), make_alert(tenant="acme")).data.decode()
    assert "on team=search of tenant acme: cost" in mine
    above = make_alert(threshold=Decimal("5.2"))
    assert (
        "vs baseline 3.1 (alert above 5.2), window"
        in render.render(render.load("text"), above).data.decode()
    )
    # A spike's decimals are quantized to nine places: shown exact and unpadded.
    padded = make_alert(observed=Decimal("30.000000000"), baseline=Decimal("2.500000000"))
    assert "cost observed 30 vs baseline 2.5, window" in (
        render.render(render.load("text"), padded).data.decode()
    )
    shown = json.loads(render.render(render.load("json"), padded).data)
    assert (shown["observed"], shown["baseline"]) == ("30", "2.5")
    budget = make_alert(alert_type="budget", threshold=Decimal(80))
    assert "(80% threshold)" in render.render(render.load("text"), budget).data.decode()
    # a value from a call (a model name is the client's) with line breaks in it
    broken = make_alert(rule="cost-spike", value="gpt\r\n4\u2028x", message="a\nb")
    text = render.render(render.load("text"), broken).data.decode()
    assert text.splitlines() == [text] and "=gpt 4 x:" in text and text.endswith(". a b")


def test_a_custom_template_file(tmp_path: Path) -> None:
    path = tmp_path / "teams.j2"
    path.write_text('{"title": {{ alert.rule | tojson }}, "summary": {{ alert.message | tojson }}}')
    alert = make_alert()
    body = render.render(render.load(str(path)), alert)
    assert json.loads(body.data) == {"title": alert.rule, "summary": alert.message}
    assert body.content_type == "application/json"
    with pytest.raises(FileNotFoundError):
        render.load(str(tmp_path / "missing.j2"))


def test_any_error_a_template_raises_is_a_template_error(tmp_path: Path) -> None:
    """What Python raises inside a template, or a file that is not text, is a
    TemplateError, which refuses a delivery (it does not stop the worker)."""
    adds = tmp_path / "adds.j2"
    adds.write_text("{{ alert.observed + 1 }}")  # observed is a decimal string
    with pytest.raises(jinja2.TemplateError, match="TypeError"):
        render.render(render.load(str(adds)), make_alert())
    escapes = tmp_path / "escapes.j2"
    escapes.write_text("{{ cycler.__init__.__globals__.os.getcwd() }}")
    with pytest.raises(jinja2.TemplateError, match="unsafe"):  # the sandbox: no Python inside
        render.render(render.load(str(escapes)), make_alert())
    endless = tmp_path / "endless.j2"
    endless.write_text("{% for i in range(10 ** 9) %}.{% endfor %}")
    with pytest.raises(jinja2.TemplateError, match="Range too big"):
        render.render(render.load(str(endless)), make_alert())
    binary = tmp_path / "binary.j2"
    binary.write_bytes(b"\xff\xfe\x00{{")
    with pytest.raises(jinja2.TemplateError, match="not UTF-8"):
        render.load(str(binary))


# -- signing, config, guard, retries, filters --------------------------------------


def test_signature_matches_the_standard_webhooks_published_example() -> None:
    # The example every Standard Webhooks library tests against.
    headers = sign.headers(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        b'{"test": 2432232314}',
        datetime.fromtimestamp(1614265330, UTC),
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_signed_headers_verify_and_a_changed_body_does_not() -> None:
    body = b'{"rule": "cost-spike"}'
    headers = sign.headers(SECRET, "an-alert-id", body)
    assert Webhook(SECRET).verify(body, headers) == {"rule": "cost-spike"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b'{"rule": "other"}', headers)


@pytest.mark.parametrize(
    "secret", ["not base64 !", "whsec_c2hvcnQ=", "whsec_" + base64.b64encode(bytes(65)).decode()]
)
def test_a_secret_must_be_whsec_base64_of_24_to_64_bytes(secret: str) -> None:
    with pytest.raises(ValidationError, match="secret"):
        WebhookEndpoint(name="a", url="https://example.com/", secret=secret)


def test_a_request_is_signed_with_the_secret_and_each_previous_one() -> None:
    """A secret being rotated: the receivers still on the old one and those already on
    the new one both verify the same request (Standard Webhooks: one signature per
    secret, space-separated, the current one first); any other secret does not."""
    body = b'{"rule": "cost-spike"}'
    headers = sign.headers([NEW_SECRET, SECRET], "an-alert-id", body)
    at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    alone = [
        sign.headers(s, "an-alert-id", body, at)["webhook-signature"] for s in (NEW_SECRET, SECRET)
    ]
    assert headers["webhook-signature"] == " ".join(alone)
    for secret in (NEW_SECRET, SECRET):
        assert Webhook(secret).verify(body, headers) == {"rule": "cost-spike"}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(bytes(32)).decode()).verify(body, headers)


def test_a_previous_secret_is_held_to_the_same_form_and_they_are_few() -> None:
    url = "https://example.com/"
    with pytest.raises(
        ValidationError, match=r"previous_secrets\.0\n  Value error, must be whsec_"
    ):
        WebhookEndpoint(name="a", url=url, secret=SECRET, previous_secrets=["not base64 !"])
    with pytest.raises(ValidationError, match="previous_secrets"):
        WebhookEndpoint(name="a", url=url, secret=SECRET, previous_secrets=[SECRET] * 4)
    rotating = WebhookEndpoint(name="a", url=url, secret=NEW_SECRET, previous_secrets=[SECRET])
    assert rotating.secrets() == [NEW_SECRET, SECRET]
    assert SECRET not in repr(rotating)  # shown as a SecretStr, never in clear


def test_max_attempts_fit_the_deliveries_table() -> None:
    """Attempts are numbered in a UInt16 column: a limit past it would wedge the worker."""
    with pytest.raises(ValidationError, match="max_attempts"):
        WebhookEndpoint(name="a", url="https://example.com/", secret=SECRET, max_attempts=70_000)


def test_an_endpoint_timeout_leaves_the_signature_fresh() -> None:
    """Each attempt is signed as it starts, and receivers refuse a timestamp over 5
    minutes old (Standard Webhooks' tolerance): `timeout_s: 600` let a slow receiver
    take a request it then had to refuse as stale. At most 120 s, leaving room for the
    clocks' skew."""
    with pytest.raises(ValidationError, match=r"timeout_s\n.*less than or equal to 120"):
        WebhookEndpoint(name="a", url="https://example.com/", secret=SECRET, timeout_s=600)
    WebhookEndpoint(name="a", url="https://example.com/", secret=SECRET, timeout_s=120)


def test_an_endpoint_timeout_must_be_finite() -> None:
    """`timeout_s: .inf` (YAML's infinity, or JSON's Infinity in LLMTAP_WEBHOOKS: "no
    timeout") was taken, and every attempt then failed inside the HTTP client before
    anything was sent ("OverflowError: cannot convert float infinity to integer"): each
    alert was retried max_attempts times and dead-lettered, and `llmtap alerts test`
    printed that error."""
    with pytest.raises(ValidationError, match="timeout_s"):
        WebhookEndpoint(name="a", url="https://example.com/", secret=SECRET, timeout_s=math.inf)
    with pytest.raises(ValidationError, match="timeout_s"):
        Settings(
            webhooks=json.loads(
                '[{"name": "a", "url": "https://example.com/", "timeout_s": Infinity, '
                f'"secret": "{SECRET}"}}]'
            )
        )
    WebhookEndpoint(name="a", url="https://example.com/", secret=SECRET, timeout_s=120)
    # Nor any other setting's: an endless upstream timeout, batch age or grace.
    with pytest.raises(ValidationError, match="upstream_read_timeout_s"):
        Settings(upstream_read_timeout_s=math.inf)


@pytest.mark.parametrize(
    "url",
    ["http://hooks.example.com:99999/x", "http://hooks.example.com:x/", "http://h.example:0/"],
)
def test_an_endpoint_url_with_a_bad_port_is_a_config_error(url: str) -> None:
    """Taken by the config (and by `llmtap up`'s checks), such a URL had every alert to
    the endpoint recorded as `refused`, the SSRF guard's outcome ("not a URL")."""
    with pytest.raises(ValidationError, match="url"):
        WebhookEndpoint(name="a", url=url, secret=SECRET)


def test_endpoint_names_are_unique_and_urls_http() -> None:
    ok = {"url": "https://example.com/", "secret": SECRET}
    with pytest.raises(ValidationError, match="unique"):
        Settings(webhooks=[{"name": "a", **ok}, {"name": "a", **ok}])
    with pytest.raises(ValidationError, match="http"):
        WebhookEndpoint(name="a", url="file:///etc/passwd", secret=SECRET)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://10.1.2.3/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://[::ffff:192.168.0.1]/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "ftp://93.184.215.14/",
        "file:///etc/passwd",
        # what the HTTP client reads as an IP: Unicode digits and dots (NFKC), and the
        # old IPv4 forms (decimal, octal, short, hex); IPv6 that reaches IPv4 inside
        "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:8080/",
        "http://127。0。0。1/",
        "http://①⑥⑨.②⑤④.①⑥⑨.②⑤④/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://0x7f.1/",
        "http://127.0.0.1./",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2002:a00:1::1]/",
        # not global, though this Python's ipaddress (3.11.7) calls them so: site-local
        # (routable on Linux), IPv4-compatible and -translated, local-use NAT64
        "http://[fec0::1]/",
        "http://[::7f00:1]/",
        "http://[::ffff:0:7f00:1]/",
        "http://[64:ff9b:1::7f00:1]/",
        "http://192.0.0.8/",
    ],
)
def test_guard_refuses_private_and_non_http_targets(url: str) -> None:
    with pytest.raises(guard.Refused):
        guard.check_url(url, allow_private=False)


def test_guard_allows_public_addresses_and_private_ones_when_allowed() -> None:
    guard.check_url("https://93.184.215.14/hook", allow_private=False)
    # an IPv6-only network's local NAT64 (DNS64) to a public IPv4 receiver
    guard.check_url("https://[64:ff9b:1::5db8:d70e]/hook", allow_private=False)
    guard.check_url("https://hooks.example.com/x", allow_private=False)  # names: at resolve
    guard.check_url("http://127.0.0.1:9/", allow_private=True)
    with pytest.raises(guard.Refused):  # never a valid target, allowed or not
        guard.check_url("http://224.0.0.1/", allow_private=True)
    with pytest.raises(guard.Refused, match=r"0\.0\.0\.0 is an unspecified address$"):
        guard.check_url("http://0.0.0.0/", allow_private=True)
    with pytest.raises(guard.Refused, match=r"127\.0\.0\.1 is a loopback address"):
        guard.check_url("http://127.0.0.1/", allow_private=False)


async def test_guard_resolver_refuses_a_name_that_resolves_to_loopback() -> None:
    resolver = guard.GuardedResolver(allow_private=False)
    try:
        with pytest.raises(guard.Refused, match="loopback"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


class _NoDefaultExecutor(ThreadPoolExecutor):
    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the event loop's default executor was used")


def test_guard_resolver_looks_up_names_on_its_own_thread() -> None:
    """A receiver whose DNS hangs must not hold up the store's writes, which run on the
    event loop's default executor: the resolver does not use it. And what it resolves
    connects (a name, to a receiver on the loopback)."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> int:
        asyncio.get_running_loop().set_default_executor(_NoDefaultExecutor(1))
        app = web.Application()
        app.router.add_post("/", ok)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with deliver.client_session(allow_private=True) as session:
                url = f"http://localhost:{server.port}/"
                async with session.post(url, data=b"{}") as resp:
                    return resp.status
        finally:
            await server.close()

    assert asyncio.run(main()) == 200


def test_retry_after_is_honoured_and_backoff_doubles_with_jitter() -> None:
    assert deliver.parse_retry_after("0") == 0
    assert deliver.parse_retry_after("120") == 120
    now = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    # the three forms of an HTTP date (RFC 9110 5.6.7), all GMT
    assert deliver.parse_retry_after("Thu, 01 May 2025 10:00:30 GMT", now) == 30
    assert deliver.parse_retry_after("Thursday, 01-May-25 10:00:30 GMT", now) == 30
    assert deliver.parse_retry_after("Thu May  1 10:00:30 2025", now) == 30
    assert deliver.parse_retry_after("Thu, 01 May 2025 10:00:30 -0000", now) == 30
    for bad in ("soon", "²", "١٢", "-5", "1.5e3", ""):
        assert deliver.parse_retry_after(bad) is None, bad
    # the receiver's word when longer than the backoff (tests/test_webhook_retries.py)
    assert deliver.retry_delay(3, 1.0, retry_after=30, rand=lambda: 1.0) == 30
    assert deliver.retry_delay(3, 1.0, rand=lambda: 0.0) == 2.0
    assert deliver.retry_delay(3, 1.0, rand=lambda: 1.0) == 4.0
    assert deliver.retry_delay(30, 1.0, rand=lambda: 1.0) == BACKOFF_CAP_S
    # a week of retries at the cap (2.0 ** 1024 overflowed: retried at once, every second)
    assert deliver.retry_delay(5000, 1.0, rand=lambda: 1.0) == BACKOFF_CAP_S


def test_filters_empty_means_all() -> None:
    url = "https://example.com/"
    spike = make_alert(rule="cost-spike", dimension="team", value="search")
    assert matches(endpoint("all", url), spike)
    assert not matches(endpoint("budgets", url, alert_types=["budget"]), spike)
    assert matches(endpoint("rule", url, rules=["cost-spike", "x"]), spike)
    assert not matches(endpoint("other-team", url, dimensions=["team"], values=["ads"]), spike)
    assert matches(endpoint("team", url, dimensions=["team"], values=["search"]), spike)
    acme = make_alert(rule="cost-spike", dimension="team", value="search", tenant="acme")
    assert matches(endpoint("acme", url, tenants=["acme"]), acme)
    assert not matches(endpoint("globex", url, tenants=["globex"]), acme)
    assert not matches(endpoint("acme", url, tenants=["acme"]), spike)  # of no tenant


# -- delivery on real parts ---------------------------------------------------------


@dataclass
class Behaviour:
    fail_first: tuple[int, ...] = ()  # statuses of the first attempts of each alert id
    always: int | None = None  # answer every request with this status
    redirect_to: str | None = None  # answer 302 to there
    hold: asyncio.Event | None = None  # a slow receiver: answers once this is set
    retry_after: str | None = None  # sent with each failure (429s get "0" without it)


@dataclass
class Arrival:
    seq: int  # order of arrival across every route
    route: str
    webhook_id: str
    status: int = 0  # what the receiver answered (0 until it answered)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Receiver:
    """HTTP receivers on 127.0.0.1, one per route, that verify every signature."""

    behaviours: dict[str, Behaviour]
    arrivals: list[Arrival] = field(default_factory=list)
    accepted: list[Arrival] = field(default_factory=list)  # in order of acceptance
    bad_signatures: int = 0
    base_url: str = ""

    def requests(self, route: str, webhook_id: str | None = None) -> list[Arrival]:
        return [
            a
            for a in self.arrivals
            if a.route == route and (webhook_id is None or a.webhook_id == webhook_id)
        ]

    def accepted_ids(self, route: str) -> Counter[str]:
        return Counter(a.webhook_id for a in self.accepted if a.route == route)

    async def handle(self, request: web.Request) -> web.Response:
        route = request.match_info["route"]
        body = await request.read()
        try:
            Webhook(SECRET).verify(body, dict(request.headers), json_parse=False)
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=401)
        webhook_id = request.headers["webhook-id"]
        earlier = len(self.requests(route, webhook_id))
        arrival = Arrival(len(self.arrivals), route, webhook_id)
        self.arrivals.append(arrival)
        how = self.behaviours.get(route, Behaviour())
        headers = {}
        if how.redirect_to is not None:
            arrival.status, headers = 302, {"location": how.redirect_to}
        elif how.always is not None:
            arrival.status = how.always
        elif earlier < len(how.fail_first):
            arrival.status = how.fail_first[earlier]
            if arrival.status == 429:
                headers = {"retry-after": "0"}
        else:
            if how.hold is not None:
                await how.hold.wait()
            arrival.status = 200
            self.accepted.append(arrival)
        if arrival.status != 200 and how.retry_after is not None:
            headers["retry-after"] = how.retry_after
        return web.Response(status=arrival.status, headers=headers, text="ok")


@contextlib.asynccontextmanager
async def receiver(behaviours: dict[str, Behaviour]) -> AsyncIterator[Receiver]:
    rec = Receiver(behaviours)
    app = web.Application()
    app.router.add_post("/{route}", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    rec.base_url = str(server.make_url("")).rstrip("/")
    try:
        yield rec
    finally:
        for how in behaviours.values():
            if how.hold is not None:
                how.hold.set()
        await server.close()


@contextlib.asynccontextmanager
async def dispatching(
    settings: Settings, store: Store, group_id: str = ""
) -> AsyncIterator[WebhookDispatcher]:
    group_id = group_id or f"webhooks-test-{uuid.uuid4()}"
    dispatcher = WebhookDispatcher(settings, store, group_id=group_id)
    task = asyncio.create_task(dispatcher.run())
    try:
        yield dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(bootstrap: str, items: Sequence[Alert | bytes]) -> dict[TopicPartition, int]:
    """Publish alerts keyed as llmtap keys them (or raw bytes); return each partition's
    end offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        sent = []
        for item in items:
            if isinstance(item, Alert):
                value, key = item.model_dump_json().encode(), topics.alert_key(item)
            else:
                value, key = item, str(uuid.uuid4()).encode()
            sent.append(await producer.send(Names().alerts, value, key=key))
        ends: dict[TopicPartition, int] = {}
        for metadata in await asyncio.gather(*sent):
            tp = TopicPartition(metadata.topic, metadata.partition)
            ends[tp] = max(ends.get(tp, 0), metadata.offset + 1)
        return ends
    finally:
        await producer.stop()


def partition_of(alert: Alert, partitions: int = 2) -> int:
    """The alerts-topic partition a producer sends ``alert`` to (the tests' topics have
    two), by the producer's own partitioner."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(topics.alert_key(alert), every, every))


async def alerts_on(bootstrap: str) -> int:
    """How many alerts a dispatcher reading the alerts topic from its start counts as
    read: those that decode and are in range (the rest are dead letters)."""
    count = 0
    for raw in await topics.read_all(Kafka(bootstrap), Names().alerts):
        try:
            count += not records.out_of_range(Alert.model_validate_json(raw))
        except ValidationError:
            pass
    return count


def scrape(dispatcher: WebhookDispatcher) -> str:
    """The store's /metrics, of this dispatcher (sinks/metrics.py)."""
    return generate_latest(store_registry(lambda: None, lambda: dispatcher)).decode()


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll a condition (sync or async) until it holds, within TIMEOUT_S."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.05)


async def all_committed(bootstrap: str, group: str, ends: dict[TopicPartition, int]) -> bool:
    """Whether ``group`` committed up to ``ends`` (read directly: Tansu's end offsets count
    record batches, not records, so a lag computed from them is wrong for batched sends)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
    finally:
        await admin.close()
    return all(tp in committed and committed[tp].offset >= end for tp, end in ends.items())


def attempts(store: Store, alert_ids: list[uuid.UUID]) -> dict[tuple[str, str], list[Any]]:
    """Every recorded step, per (endpoint, alert id), in attempt order."""
    rows = store.rows(
        "SELECT endpoint, alert_id, attempt, status_code, outcome, error"
        " FROM webhook_deliveries WHERE alert_id IN {ids:Array(UUID)}"
        " ORDER BY endpoint, alert_id, attempt, ts",
        {"ids": alert_ids},
    )
    found: dict[tuple[str, str], list[Any]] = {}
    for r in rows:
        step = (r["attempt"], r["status_code"], r["outcome"], r["error"])
        found.setdefault((r["endpoint"], str(r["alert_id"])), []).append(step)
    return found


def finished(store: Store, alert_ids: list[uuid.UUID], pairs: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        steps = await asyncio.to_thread(attempts, store, alert_ids)
        final = [s for s in steps.values() if s[-1][2] in records.FINAL]
        return len(final) == pairs

    return check


async def test_each_alert_is_accepted_once_despite_failures_duplicates_and_a_slow_receiver(
    broker: Broker, store: Store
) -> None:
    rule = f"rule-{uuid.uuid4()}"
    alerts = [
        make_alert(rule),
        make_alert(rule, alert_type="budget", metric="spend", threshold=Decimal(80)),
        make_alert(rule, value="ads"),
    ]
    unmatched = make_alert(f"other-{rule}")
    hold = asyncio.Event()
    behaviours = {"flaky": Behaviour(fail_first=(500, 429)), "slow": Behaviour(hold=hold)}
    async with receiver(behaviours) as rec:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[
                endpoint("flaky", f"{rec.base_url}/flaky", rules=[rule], template="slack"),
                endpoint("slow", f"{rec.base_url}/slow", rules=[rule], timeout_s=TIMEOUT_S),
            ],
        )
        # The dispatcher's new group reads the topic from its start: what other tests put
        # there too (an ingress's hard cap alerts).
        before = await alerts_on(broker.bootstrap)
        # The first alert twice: once more after the others, as a replay would.
        ends = await publish(broker.bootstrap, [*alerts, unmatched, alerts[0]])
        ids = [str(a.event_id) for a in alerts]
        group = f"webhooks-test-{uuid.uuid4()}"
        async with dispatching(settings, store, group) as dispatcher:
            # The slow receiver holds its first request; the other endpoint still gets
            # every alert, and the consumer still commits everything it read.
            await until(lambda: set(rec.accepted_ids("flaky")) == set(ids))
            assert len(rec.requests("slow")) == 1 and not rec.accepted_ids("slow")
            await until(lambda: all_committed(broker.bootstrap, group, ends))
            assert sample(scrape(dispatcher), "llmtap_webhook_queued", endpoint="slow") == 2
            hold.set()
            await until(finished(store, [a.event_id for a in alerts], pairs=6))
            metrics = scrape(dispatcher)

    assert rec.bad_signatures == 0
    for route in ("flaky", "slow"):
        assert rec.accepted_ids(route) == Counter(ids)  # exactly one accepted per alert id
    # /metrics counts what the deliveries table holds: each attempt, each delivery once.
    assert sample(metrics, "llmtap_webhook_alerts_read_total") == before + 5  # with a replay
    delivered = {"endpoint": "flaky", "outcome": "delivered"}
    assert sample(metrics, "llmtap_webhook_attempts_total", **delivered) == 3
    assert sample(metrics, "llmtap_webhook_attempts_total", endpoint="flaky") == 9
    assert sample(metrics, "llmtap_webhook_deliveries_total", **delivered) == 3
    assert sample(metrics, "llmtap_webhook_deliveries_total", endpoint="slow") == 3
    assert sample(metrics, "llmtap_webhook_queued") == 0
    # The slow receiver's first request arrived before the other endpoint's deliveries
    # went through, and was answered only after all of them: it held up nobody.
    order = [a.route for a in rec.accepted]
    assert order == ["flaky"] * 3 + ["slow"] * 3
    assert rec.requests("slow")[0].seq < max(a.seq for a in rec.accepted if a.route == "flaky")

    steps = attempts(store, [a.event_id for a in [*alerts, unmatched]])
    assert set(steps) == {(route, i) for route in ("flaky", "slow") for i in ids}
    for i in ids:
        assert [s[:3] for s in steps["flaky", i]] == [
            (0, None, "pending"),
            (1, 500, "retrying"),
            (2, 429, "retrying"),
            (3, 200, "delivered"),
        ]
        assert [s[:3] for s in steps["slow", i]] == [(0, None, "pending"), (1, 200, "delivered")]
        for route in ("flaky", "slow"):  # the table holds every request the receiver saw
            sent = [s for s in steps[route, i] if s[0] > 0]
            assert [s[1] for s in sent] == [a.status for a in rec.requests(route, i)]
    stored = store.rows(
        "SELECT event_id, rule FROM alerts WHERE event_id IN {ids:Array(UUID)}",
        {"ids": [a.event_id for a in [*alerts, unmatched]]},
    )
    assert len(stored) == 4  # each alert once, the unmatched one too (stored, not delivered)


async def test_a_receiver_still_on_the_previous_secret_takes_alerts_during_a_rotation(
    broker: Broker, store: Store
) -> None:
    """The endpoint's secret changed to a new one, the old kept in previous_secrets: a
    receiver that verifies with the old secret (every Receiver here) still accepts."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    async with receiver({}) as rec:
        rotating = WebhookEndpoint(
            name="rotating",
            url=f"{rec.base_url}/rotating",
            secret=NEW_SECRET,
            previous_secrets=[SECRET],
            rules=[rule],
            backoff_s=0.01,
        )
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, webhook_allow_private=True, webhooks=[rotating]
        )
        await publish(broker.bootstrap, [alert])
        async with dispatching(settings, store):
            await until(finished(store, [alert.event_id], pairs=1))
    assert rec.accepted_ids("rotating") == {str(alert.event_id): 1}
    assert rec.bad_signatures == 0


async def test_a_dead_receiver_is_dead_lettered_and_a_redirect_is_not_followed(
    broker: Broker, store: Store
) -> None:
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    # Before it, two messages that cannot be stored: they are kept aside, and block nothing.
    huge = make_alert(rule, observed=Decimal("1e30"))
    poison: list[Alert | bytes] = [b"\x00not an alert", huge]
    async with receiver({}) as rec:
        rec.behaviours["dead"] = Behaviour(always=500)
        rec.behaviours["moved"] = Behaviour(redirect_to=f"{rec.base_url}/elsewhere")
        rec.behaviours["gone"] = Behaviour(always=410)
        # A retry-after that is no number ("²" passes str.isdigit): ignored, not a crash.
        rec.behaviours["odd"] = Behaviour(always=503, retry_after="²")
        names = ("dead", "moved", "gone", "odd")
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[
                endpoint(name, f"{rec.base_url}/{name}", rules=[rule], max_attempts=3)
                for name in names
            ],
        )
        await publish(broker.bootstrap, [*poison, alert])
        async with dispatching(settings, store) as dispatcher:
            await until(finished(store, [alert.event_id], pairs=len(names)))
            metrics = scrape(dispatcher)

    steps = attempts(store, [alert.event_id])
    i = str(alert.event_id)
    for name, status in (("dead", 500), ("odd", 503)):  # three attempts, then given up
        assert [s[:3] for s in steps[name, i]] == [
            (0, None, "pending"),
            (1, status, "retrying"),
            (2, status, "retrying"),
            (3, status, "dead_lettered"),
        ]
        assert len(rec.requests(name)) == 3
    for name, retried, final in (
        ("dead", 2, "dead_lettered"),
        ("moved", 0, "dead_lettered"),
        ("gone", 0, "gone"),  # 410: the receiver asks for nothing more
    ):
        given_up = {"endpoint": name, "outcome": final}
        assert sample(metrics, "llmtap_webhook_deliveries_total", **given_up) == 1
        assert sample(metrics, "llmtap_webhook_deliveries_total", endpoint=name) == 1
        assert sample(metrics, "llmtap_webhook_attempts_total", **given_up) == 1
        again = {"endpoint": name, "outcome": "retrying"}
        assert sample(metrics, "llmtap_webhook_attempts_total", **again) == retried
    # 3xx and 4xx other than 408/425/429 are final at once: the same request would fail.
    (_, moved), (_, gone) = steps["moved", i], steps["gone", i]
    assert moved[:3] == (1, 302, "dead_lettered") and "not followed" in moved[3]
    assert gone[:3] == (1, 410, "gone")
    assert rec.requests("elsewhere") == []
    assert rec.bad_signatures == 0
    letters = store.rows(
        "SELECT raw, error FROM dead_letters WHERE topic = {topic:String}",
        {"topic": Names().alerts},
    )
    assert len(letters) == 2 and any("does not fit" in d["error"] for d in letters)
    assert attempts(store, [huge.event_id]) == {}


@dataclass
class Stalling:
    """A receiver on a raw socket that reads each request whole, sends the head of the
    answer its path names (``/400``: a 400 announcing a 64-byte body) and then nothing
    more until the test ends: its status known, its body never coming."""

    paths: list[str] = field(default_factory=list)
    base_url: str = ""


@contextlib.asynccontextmanager
async def stalling() -> AsyncIterator[Stalling]:
    rec, done = Stalling(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            fields = dict(line.lower().partition(":")[::2] for line in lines if line)
            await reader.readexactly(int(fields["content-length"]))
            path = request_line.split()[1]
            rec.paths.append(path)
            status = int(path.rsplit("/", 1)[1])
            writer.write(
                f"HTTP/1.1 {status} Stalled\r\ncontent-length: 64\r\n"
                "retry-after: 0\r\n\r\n".encode()
            )
            await writer.drain()
            await done.wait()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    rec.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield rec
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_an_answer_whose_body_stalls_is_decided_by_its_status(
    broker: Broker, store: Store
) -> None:
    """The status is the answer once the head came: a 4xx whose body never comes is
    dead-lettered at once (not retried as a timeout), a 503 or 429 retried as such."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    async with stalling() as rec:
        names = {"refused": 400, "gone": 410, "busy": 503, "slow-down": 429}
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[
                endpoint(
                    name,
                    f"{rec.base_url}/{name}/{status}",
                    rules=[rule],
                    max_attempts=2,
                    timeout_s=5,  # what a stalled body ran into: a timeout, no status
                )
                for name, status in names.items()
            ],
        )
        await publish(broker.bootstrap, [alert])
        async with dispatching(settings, store):
            await until(finished(store, [alert.event_id], pairs=len(names)))

    steps = attempts(store, [alert.event_id])
    i = str(alert.event_id)
    for name, outcome in (("refused", "dead_lettered"), ("gone", "gone")):
        status = names[name]
        assert [s[:3] for s in steps[name, i]] == [
            (0, None, "pending"),
            (1, status, outcome),
        ]
        final = steps[name, i][-1]
        assert final[3].startswith(f"HTTP {status} Stalled") and "body not received" in final[3]
        assert rec.paths.count(f"/{name}/{status}") == 1
    for name in ("busy", "slow-down"):
        status = names[name]
        assert [s[:3] for s in steps[name, i]] == [
            (0, None, "pending"),
            (1, status, "retrying"),
            (2, status, "dead_lettered"),
        ]


async def test_private_targets_are_refused_and_never_contacted(
    broker: Broker, store: Store
) -> None:
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    async with receiver({}) as rec:
        port = rec.base_url.rsplit(":", 1)[1]
        targets = {
            "loopback": f"{rec.base_url}/loopback",
            "by-name": f"http://localhost:{port}/by-name",  # refused where it is resolved
            # 127.0.0.1 in full-width digits: the HTTP client reads it as that IP
            "unicode": f"http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/unicode",
            "private": "http://10.20.30.40/hook",
            "metadata": "http://169.254.169.254/latest/meta-data/",
        }
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhooks=[endpoint(name, url, rules=[rule]) for name, url in targets.items()],
        )
        assert not settings.webhook_allow_private  # the default
        await publish(broker.bootstrap, [alert])
        async with dispatching(settings, store):
            await until(finished(store, [alert.event_id], pairs=len(targets)))

    assert rec.arrivals == []
    steps = attempts(store, [alert.event_id])
    for name in targets:
        pending, refused = steps[name, str(alert.event_id)]
        assert pending[:3] == (0, None, "pending")
        assert refused[1:3] == (None, "refused") and refused[3].startswith("refused: ")


async def test_two_store_processes_send_each_delivery_once(broker: Broker, store: Store) -> None:
    """Two dispatchers in one group, on one ClickHouse, as two store processes are: the
    first has every alert's delivery retrying (the receiver answers 503) when the second
    joins. Each resumed every unfinished delivery, so each alert was sent, accepted and
    recorded as delivered twice; now each process sends its partitions' only, and the
    first stops sending the ones it gives up."""
    alerts: list[Alert] = []
    while len({partition_of(a) for a in alerts}) < 2:  # 8 series: 1 in 128 on one alone
        rule = f"rule-{uuid.uuid4()}"
        alerts = [make_alert(rule, value=f"team-{n}") for n in range(8)]
    ids = [str(a.event_id) for a in alerts]
    async with receiver({"shared": Behaviour(always=503)}) as rec:
        hook = endpoint("shared", f"{rec.base_url}/shared", rules=[rule], max_attempts=1000)
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, webhook_allow_private=True, webhooks=[hook]
        )
        ends = await publish(broker.bootstrap, alerts)
        assert len(ends) == 2  # both partitions hold some
        group = f"webhooks-test-{uuid.uuid4()}"
        async with dispatching(settings, store, group) as first:
            await until(lambda: len(rec.requests("shared")) >= 3)  # retrying
            await until(lambda: all_committed(broker.bootstrap, group, ends))
            async with dispatching(settings, store, group) as second:
                await until(
                    lambda: (
                        bool(first.owned.partitions)
                        and bool(second.owned.partitions)
                        and first.owned.partitions | second.owned.partitions == {0, 1}
                    )
                )
                assert not first.owned.partitions & second.owned.partitions
                rec.behaviours["shared"].always = None  # the receiver is back
                await until(finished(store, [a.event_id for a in alerts], pairs=len(alerts)))
                # Both done with everything they took (each took every delivery, and
                # sent each once more, before).
                workers = [first.workers["shared"], second.workers["shared"]]
                await until(lambda: all(w.idle for w in workers))
    assert rec.accepted_ids("shared") == Counter(ids)
    steps = attempts(store, [a.event_id for a in alerts])
    for i in ids:
        final = [s for s in steps["shared", i] if s[2] in records.FINAL]
        assert [s[2] for s in final] == ["delivered"], steps["shared", i]


async def test_a_delivery_whose_partition_is_not_given_again_stops(store: Store) -> None:
    """A consumer made again (the broker went away) is given partitions without any
    being revoked first: a delivery of one it is not given any more stops there, and is
    resumed once its partition is given back."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    hold = asyncio.Event()
    alerts_topic = Names().alerts
    async with receiver({"held": Behaviour(hold=hold)}) as rec:
        hook = endpoint("held", f"{rec.base_url}/held", rules=[rule], timeout_s=TIMEOUT_S)
        settings = Settings(webhook_allow_private=True, webhooks=[hook])
        records.store_batch(store, [alert], [("held", alert)], [], {alert.event_id: 1})
        dispatcher = WebhookDispatcher(settings, store)
        worker = dispatcher.workers["held"]
        running = asyncio.create_task(worker.run())
        try:
            both = [TopicPartition(alerts_topic, p) for p in (0, 1)]
            await dispatcher.handover.on_partitions_assigned(both)
            await until(lambda: len(rec.requests("held")) == 1)  # held by the receiver
            await dispatcher.handover.on_partitions_assigned(both[:1])
            assert dispatcher.owned.partitions == {0}
            await until(lambda: worker.idle)  # stopped, and its rescan found nothing of 0
            assert len(rec.requests("held")) == 1
            await dispatcher.handover.on_partitions_assigned(both)  # given back: resumed
            await until(lambda: len(rec.requests("held")) == 2)
            hold.set()
            await until(finished(store, [alert.event_id], pairs=1))
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    steps = attempts(store, [alert.event_id])["held", str(alert.event_id)]
    assert [s[2] for s in steps] == ["pending", "delivered"]  # the stopped one: no record


async def test_a_delivery_handed_over_keeps_waiting_out_its_retry_after(store: Store) -> None:
    """A delivery stopped by a rebalance while it waits out the receiver's retry-after
    is resumed by the partition's next owner no sooner than the retry was due: it was
    sent again at once."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    alerts_topic = Names().alerts
    async with receiver({"busy": Behaviour(fail_first=(429,), retry_after="2")}) as rec:
        hook = endpoint("busy", f"{rec.base_url}/busy", rules=[rule])
        settings = Settings(webhook_allow_private=True, webhooks=[hook])
        records.store_batch(store, [alert], [("busy", alert)], [], {alert.event_id: 1})
        dispatcher = WebhookDispatcher(settings, store)
        worker = dispatcher.workers["busy"]
        running = asyncio.create_task(worker.run())
        both = [TopicPartition(alerts_topic, p) for p in (0, 1)]

        def steps() -> list[Any]:
            return attempts(store, [alert.event_id]).get(("busy", str(alert.event_id)), [])

        try:
            await dispatcher.handover.on_partitions_assigned(both)
            await until(lambda: len(steps()) == 2)  # pending, then the 429 recorded
            await dispatcher.handover.on_partitions_assigned(both[:1])  # taken, then
            await until(lambda: worker.idle)
            await dispatcher.handover.on_partitions_assigned(both)  # given back
            await until(finished(store, [alert.event_id], pairs=1))
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    (due,) = store.rows(
        "SELECT retry_at FROM webhook_deliveries WHERE alert_id = {id:UUID} AND attempt = 1",
        {"id": alert.event_id},
    )
    due_at = due["retry_at"].replace(tzinfo=UTC)
    first, second = rec.requests("busy")
    assert [first.status, second.status] == [429, 200]
    assert due_at >= first.at + timedelta(seconds=1.9)  # its retry-after: 2
    assert second.at >= due_at
    assert [s[2] for s in steps()] == ["pending", "retrying", "delivered"]


async def test_unfinished_deliveries_are_resumed_at_start(broker: Broker, store: Store) -> None:
    """A process stopped mid-delivery: the alert and two steps are recorded, nothing final."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    async with receiver({}) as rec:
        hook = endpoint("resumed", f"{rec.base_url}/resumed", rules=[rule])
        records.store_batch(store, [alert], [("resumed", alert)], [])
        failed = records.Attempt(
            alert.event_id, "resumed", 1, datetime.now(UTC), 503, "HTTP 503", "retrying"
        )
        records.record(store, [failed])
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, webhook_allow_private=True, webhooks=[hook]
        )
        async with dispatching(settings, store):
            await until(finished(store, [alert.event_id], pairs=1))

    assert rec.accepted_ids("resumed") == Counter([str(alert.event_id)])
    steps = attempts(store, [alert.event_id])["resumed", str(alert.event_id)]
    assert [s[:3] for s in steps] == [
        (0, None, "pending"),
        (1, 503, "retrying"),
        (2, 200, "delivered"),  # numbering goes on from what was recorded
    ]


def test_a_series_alerts_share_a_partition_key_and_other_series_do_not() -> None:
    firing = make_alert("cost-spike")
    resolved = make_alert("cost-spike", state="resolved", observed=Decimal(1))
    assert topics.alert_key(firing) == topics.alert_key(resolved)
    budget: dict[str, Any] = {"alert_type": "budget", "metric": "spend"}
    fifty = make_alert("monthly", **budget, threshold=Decimal(50))
    eighty = make_alert("monthly", **budget, threshold=Decimal(80))
    assert topics.alert_key(fifty) == topics.alert_key(eighty)
    others = [
        make_alert("cost-spike", value="ads"),
        make_alert("cost-spike", dimension="user"),
        make_alert("cost-spike", tenant="globex"),
        make_alert("other-rule"),
        make_alert("cost-spike", alert_type="budget"),
    ]
    assert len({topics.alert_key(a) for a in [firing, fifty, *others]}) == 2 + len(others)


async def test_a_series_alerts_are_delivered_in_the_order_they_were_raised(
    broker: Broker, store: Store
) -> None:
    """Spikes fired then resolved, budgets past 50% then 80%, on a two-partition topic.
    Keyed by alert id, a series' two alerts were on either partition, and a batch read
    partition by partition gave the resolve first about as often as not."""
    rule = f"rule-{uuid.uuid4()}"
    pairs: list[tuple[Alert, Alert]] = []
    for n in range(12):
        series = {"value": f"team-{n}"}
        pairs.append((make_alert(rule, **series), make_alert(rule, **series, state="resolved")))
    for n in range(6):
        budget = {"alert_type": "budget", "metric": "spend", "value": f"budget-{n}"}
        pairs.append(
            (
                make_alert(rule, **budget, threshold=Decimal(50)),
                make_alert(rule, **budget, threshold=Decimal(80)),
            )
        )
    raised = [alert for pair in pairs for alert in pair]
    async with receiver({}) as rec:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            webhook_allow_private=True,
            webhooks=[endpoint("ordered", f"{rec.base_url}/ordered", rules=[rule])],
        )
        ends = await publish(broker.bootstrap, raised)
        assert len(ends) == 2  # both partitions hold some
        async with dispatching(settings, store):
            await until(finished(store, [a.event_id for a in raised], pairs=len(raised)))
    order = [a.webhook_id for a in rec.accepted]
    assert sorted(order) == sorted(str(a.event_id) for a in raised)
    for first, then in pairs:
        assert order.index(str(first.event_id)) < order.index(str(then.event_id))


def test_a_process_resumes_the_deliveries_of_its_partitions_only(store: Store) -> None:
    rule = f"rule-{uuid.uuid4()}"
    hook = f"owned-{uuid.uuid4()}"
    on = {n: make_alert(rule, value=f"team-{n}") for n in (0, 1, 2)}
    unknown = make_alert(rule, value="before partitions were recorded")
    records.store_batch(
        store, list(on.values()), [(hook, a) for a in on.values()], [],
        {a.event_id: n for n, a in on.items()},
    )  # fmt: skip
    records.store_batch(store, [unknown], [(hook, unknown)], [])

    def resumed(partitions: set[int]) -> set[uuid.UUID]:
        jobs = records.unfinished(store, hook, 10, partitions).jobs
        assert all(job.partition in partitions | {-1} for job in jobs)
        return {job.alert.event_id for job in jobs}

    assert resumed({1}) == {on[1].event_id}
    assert resumed({0, 2}) == {on[0].event_id, on[2].event_id, unknown.event_id}
    assert resumed(set()) == set()


def test_deliveries_recorded_together_resume_in_the_order_they_were_raised(store: Store) -> None:
    """A spike's firing and its resolve recorded in one batch (a backlog read at once)
    share their `since`: they were resumed in the order of their ids, so a receiver
    could be told of the resolve first."""
    rule = f"rule-{uuid.uuid4()}"
    start = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    firing = make_alert(rule, event_id=uuid.UUID(int=2**127 + 1), first_seen=start)
    resolved = make_alert(
        rule,
        event_id=uuid.UUID(int=1),
        state="resolved",
        first_seen=start,  # the lower id
    )
    earlier = make_alert(rule, event_id=uuid.UUID(int=2), first_seen=start - timedelta(minutes=5))
    # A budget's thresholds crossed by one call: 50% before 80%.
    budget: dict[str, Any] = {"alert_type": "budget", "first_seen": start}
    eighty = make_alert(**budget, event_id=uuid.UUID(int=3), threshold=Decimal(80))
    fifty = make_alert(**budget, event_id=uuid.UUID(int=4), threshold=Decimal(50))
    alerts = [resolved, firing, earlier, eighty, fifty]
    hook = f"ordered-{uuid.uuid4()}"
    records.store_batch(store, alerts, [(hook, a) for a in alerts], [])
    jobs = records.unfinished(store, hook, 10, {0}).jobs  # no partition given: partition 0's
    assert [job.alert.event_id for job in jobs] == [
        earlier.event_id,
        fifty.event_id,
        eighty.event_id,
        firing.event_id,  # no threshold: after those
        resolved.event_id,
    ]


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (None, "no such file"),
        ("{% if %}", "(line 1): Expected an expression"),
        ("{{ alert.rule | no_such_filter }}", "No filter named 'no_such_filter'"),
    ],
)
async def test_up_refuses_a_template_it_cannot_load_before_starting_anything(
    tmp_path: Path, source: str | None, error: str
) -> None:
    """A template missing or not Jinja2 is a setting `llmtap up` cannot use: one line
    naming the endpoint, exit status 2, nothing started. It was found by the store process
    only, after the broker had been started and the migrations run: a traceback, and
    `up` gave up with status 1 (a compose deployment restarted the store for ever)."""
    template = tmp_path / "hook.j2"
    if source is not None:
        template.write_text(source)
    hooks = [
        {"name": "ops", "url": "https://hooks.example.com/llmtap", "secret": SECRET,
         "template": str(template)},
    ]  # fmt: skip
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path / "data"),
        "LLMTAP_WEBHOOKS": json.dumps(hooks),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "LLMTAP_PROXY_PORT": str(free_port()),
        "LLMTAP_API_PORT": str(free_port()),
        "LLMTAP_WORKER_METRICS_PORT": "0",
    }
    env.pop("LLMTAP_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "llmtap", "up"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = out.decode()
    assert process.returncode == 2, text
    assert "endpoint 'ops'" in text and str(template) in text and error in text, text
    assert "Traceback" not in text and "started broker" not in text, text


async def test_alerts_test_command_sends_a_signed_sample(tmp_path: Path) -> None:
    async with receiver({}) as rec:
        hooks = [
            {"name": "ops", "url": f"{rec.base_url}/ops", "secret": SECRET, "template": "text"},
            {"name": "closed", "url": f"{rec.base_url}/closed", "secret": SECRET},
            {
                "name": "gone",
                "url": f"{rec.base_url}/ops",
                "secret": SECRET,
                "template": str(tmp_path / "missing.j2"),
            },
            {
                "name": "typo",
                "url": f"{rec.base_url}/ops",
                "secret": SECRET,
                "template": str(tmp_path / "typo.j2"),
            },
        ]
        (tmp_path / "typo.j2").write_text("{{ alert.rul }}")
        rec.behaviours["closed"] = Behaviour(always=403)
        env = {
            **os.environ,
            "LLMTAP_DATA_DIR": str(tmp_path),
            "LLMTAP_WEBHOOKS": json.dumps(hooks),
            "LLMTAP_WEBHOOK_ALLOW_PRIVATE": "true",
        }

        async def cli(name: str) -> tuple[int, str]:
            argv = ("-m", "llmtap", "alerts", "test", "--endpoint", name)
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *argv,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(TIMEOUT_S):
                out, _ = await process.communicate()
            assert process.returncode is not None
            return process.returncode, out.decode()

        code, out = await cli("ops")
        assert code == 0 and "delivered sample alert" in out, out
        assert len(rec.accepted) == 1 and rec.bad_signatures == 0
        assert (await cli("closed"))[0] == 1
        assert (await cli("nope"))[0] == 2
        # A template missing or broken: said in a line, not a traceback; nothing sent.
        for name, error in (("gone", "no such file"), ("typo", "UndefinedError")):
            code, out = await cli(name)
            assert code == 1 and error in out and "Traceback" not in out, out
        assert len(rec.accepted) == 1


@pytest.mark.parametrize(
    ("filters", "dimension", "tenant"),
    [
        ({}, "team", "example"),
        ({"dimensions": ["model"], "values": ["gpt-4o"]}, "model", ""),
        ({"dimensions": ["tenant"], "values": ["acme"]}, "tenant", "acme"),
        ({"tenants": ["acme"], "rules": ["latency"]}, "model", ""),
    ],
)
def test_the_sample_spike_alert_is_one_a_rule_raises(
    filters: dict[str, Any], dimension: str, tenant: str
) -> None:
    """`llmtap alerts test` sent a spike alert with no threshold (real ones carry the
    level the window passed, since 2026-12-01) and severity info (a spike is warning or
    critical): a receiver's parser written against the sample broke on the first real
    alert. It is a firing alert as the spike rule makes one (the configured rule the
    endpoint names, or a cost rule), its window the rule's."""
    latency = SpikeRule(name="latency", dimension="model", metric="p95_latency", window_s=300)
    hook = endpoint("ops", "http://127.0.0.1:9/", **filters)
    alert = probe.sample_alert(hook, spike_rules=[latency])
    assert (alert.alert_type, alert.state, alert.dimension, alert.tenant) == (
        "spike",
        "firing",
        dimension,
        tenant,
    )
    assert alert.severity in ("warning", "critical")
    assert alert.baseline is not None and alert.threshold is not None
    assert alert.observed > alert.threshold > alert.baseline
    rule = latency if "rules" in filters else SpikeRule(name="x", dimension="team", metric="cost")
    assert alert.metric == rule.metric
    assert alert.window_end - alert.window_start == timedelta(seconds=rule.window_s)
    assert alert.first_seen == alert.window_start
    assert "alert above" in alert.message and "not real" in alert.message
    sent = render.render(render.load("json"), alert).data
    assert Alert.model_validate_json(sent) == alert and json.loads(sent)["threshold"]


def test_the_sample_error_rate_alert_is_floored_by_sampling_noise() -> None:
    """The detector judges an error rate's window against a scale at least its sampling
    noise for the window's calls; the sample was judged with none (0.02 -> 0.05 against
    a threshold of 0.035, which takes some 2,000 calls a window). It is the alert the
    detector sends for a window of ``probe.SAMPLE_CALLS`` calls."""
    errors = SpikeRule(name="errors", dimension="model", metric="error_rate")
    alert = probe.sample_alert(
        endpoint("ops", "http://127.0.0.1:9/", rules=["errors"]), spike_rules=[errors]
    )
    assert alert.baseline is not None and alert.threshold is not None
    noise = sampling_noise(alert.baseline, probe.SAMPLE_CALLS)
    assert alert.threshold >= alert.baseline + errors.sensitivity * noise
    history = tuple(alert.baseline * f for f in probe.SPREAD)
    before = SeriesState(history=history, last_window=alert.window_start - timedelta(minutes=1))
    _, [real] = observe(
        errors,
        alert.value,
        before,
        alert.window_start,
        alert.window_end,
        alert.observed,
        calls=probe.SAMPLE_CALLS,
    )
    assert (real.observed, real.baseline, real.threshold, real.severity) == (
        alert.observed,
        alert.baseline,
        alert.threshold,
        alert.severity,
    )
    assert 0 < alert.observed * probe.SAMPLE_CALLS == int(alert.observed * probe.SAMPLE_CALLS)


def test_the_sample_error_rate_is_a_rate_at_a_high_floor() -> None:
    """A rule firing only past 80% of calls failed: its sample's rate was 1.19, more
    calls failed than were made. It is at most 1, and still fires."""
    errors = SpikeRule(name="errors", dimension="model", metric="error_rate", min_value=0.8)
    alert = probe.sample_alert(
        endpoint("ops", "http://127.0.0.1:9/", rules=["errors"]), spike_rules=[errors]
    )
    assert alert.state == "firing" and alert.threshold is not None
    assert alert.threshold <= alert.observed <= 1


@pytest.mark.parametrize(
    ("filters", "scope", "value", "tenant"),
    [
        ({"alert_types": ["budget"]}, "team", "example", "example"),
        (
            {"alert_types": ["budget"], "dimensions": ["model", "team"]},
            "team",
            "example",
            "example",
        ),
        ({"alert_types": ["budget"], "rules": ["ads-daily"]}, "team", "ads", "acme"),
    ],
)
def test_the_sample_budget_alert_is_one_a_budget_raises(
    filters: dict[str, Any], scope: str, value: str, tenant: str
) -> None:
    """The budget sample was severity info at 80% (a budget says warning there), over a
    five-minute window (a budget's is its period), and of any dimension the endpoint
    named first, model too (no budget has that scope). It is a threshold alert as the
    budget (the configured one the endpoint names, or a monthly one) raises it."""
    ads = BudgetConfig(
        name="ads-daily", scope="team", value="ads", tenant="acme", period="day", limit_usd=50
    )
    hook = endpoint("ops", "http://127.0.0.1:9/", **filters)
    alert = probe.sample_alert(hook, budgets=[ads])
    budget = ads if "rules" in filters else None
    assert (alert.alert_type, alert.state, alert.dimension, alert.value, alert.tenant) == (
        "budget",
        "firing",
        scope,
        value,
        tenant,
    )
    assert alert.metric == "spend" and alert.threshold == Decimal(80)
    assert alert.severity == "warning"  # as at 80% of a real budget
    assert alert.baseline == (ads.limit_usd if budget else alert.baseline)
    assert alert.baseline is not None and alert.observed >= alert.baseline * 80 / 100
    period = budget.period if budget else "month"
    assert (alert.window_start, alert.window_end) == period_bounds(period, alert.first_seen)
    assert matches(hook, alert) and "not real" in alert.message


def test_the_sample_of_a_budget_with_no_thresholds_is_at_80_percent() -> None:
    """A budget may raise no threshold alerts (``thresholds: []``, a hard cap alone):
    its sample is still a budget alert, at 80%, not a crash of the command."""
    quiet = BudgetConfig(name="quiet", scope="tenant", value="acme", limit_usd=10, thresholds=[])
    hook = endpoint("ops", "http://127.0.0.1:9/", alert_types=["budget"], rules=["quiet"])
    alert = probe.sample_alert(hook, budgets=[quiet])
    assert (alert.rule, alert.threshold, alert.severity) == ("quiet", Decimal(80), "warning")


async def test_a_firing_dropped_on_a_full_queue_is_sent_after_its_resolve(store: Store) -> None:
    """A delivery dropped when its endpoint's queue was full (it is pending in
    ClickHouse, for a rescan) was overtaken by a later alert offered once there was
    room: a spike's resolve reached the receiver before its firing, and the incident
    stayed open there. While a rescan is due, later deliveries wait for it too."""
    arrived: list[str] = []
    holds: dict[str, asyncio.Event] = {}

    async def handle(request: web.Request) -> web.Response:
        webhook_id = request.headers["webhook-id"]
        arrived.append(webhook_id)
        if webhook_id in holds:
            await holds[webhook_id].wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    rule = "order-rule"
    other_a = make_alert(rule, value="other-a")
    other_b = make_alert(rule, value="other-b")
    firing = make_alert(rule, value="search")
    resolved = make_alert(rule, value="search", state="resolved", observed=Decimal(1))
    holds[str(other_a.event_id)] = asyncio.Event()
    holds[str(other_b.event_id)] = asyncio.Event()
    hook = endpoint("ordered", str(server.make_url("/hook")), rules=[rule], timeout_s=30)
    settings = Settings(webhook_allow_private=True, webhooks=[hook])
    dispatcher = WebhookDispatcher(settings, store)
    worker = dispatcher.workers["ordered"]
    worker._queue = asyncio.Queue(1)  # QUEUE_SIZE (1000) made small for the test
    running = asyncio.create_task(worker.run())
    try:
        await dispatcher.handover.on_partitions_assigned([TopicPartition(Names().alerts, 0)])

        def offer(
            alert: Alert,
        ) -> None:  # what WebhookDispatcher._consume_batches does with a new alert
            stored = records.store_batch(
                store, [alert], [("ordered", alert)], [], {alert.event_id: 0}
            )
            for name, new in stored.new:
                dispatcher.workers[name].offer(records.Job(new, partition=0))

        offer(other_a)
        await until(lambda: arrived == [str(other_a.event_id)])  # being sent, held
        offer(other_b)  # queued: the queue is full now
        offer(firing)  # dropped (QueueFull), left to a rescan
        holds[str(other_a.event_id)].set()
        await until(lambda: len(arrived) == 2)  # other_b being sent; the queue has room
        offer(resolved)  # the spike's resolve, raised a little later
        holds[str(other_b.event_id)].set()
        await until(lambda: len(arrived) == 4)
    finally:
        for event in holds.values():
            event.set()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await server.close()
    order = arrived[2:]
    assert order == [str(firing.event_id), str(resolved.event_id)], (
        "the resolve reached the receiver before its firing"
    )


async def test_a_resolve_read_as_a_rebalance_ends_overtakes_its_retrying_firing(
    store: Store,
) -> None:
    """Default queue size: the firing is retrying (503, retry-after 1) when a rebalance
    gives the partition back; the dispatcher's first batch after it holds the resolve,
    offered before the worker's rescan has queued the firing again."""
    arrived: list[tuple[str, int]] = []
    firing = make_alert("order-rule-2", value="search")
    resolved = make_alert("order-rule-2", value="search", state="resolved", observed=Decimal(1))

    async def handle(request: web.Request) -> web.Response:
        webhook_id = request.headers["webhook-id"]
        first = webhook_id == str(firing.event_id) and not arrived
        status = 503 if first else 200
        arrived.append((webhook_id, status))
        return web.Response(status=status, headers={"retry-after": "1"} if first else {})

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    hook = endpoint("ordered2", str(server.make_url("/hook")), rules=["order-rule-2"])
    settings = Settings(webhook_allow_private=True, webhooks=[hook])
    dispatcher = WebhookDispatcher(settings, store)
    worker = dispatcher.workers["ordered2"]
    running = asyncio.create_task(worker.run())
    tp = TopicPartition(Names().alerts, 0)
    try:
        records.store_batch(store, [firing], [("ordered2", firing)], [], {firing.event_id: 0})
        await dispatcher.handover.on_partitions_assigned([tp])
        await until(lambda: arrived == [(str(firing.event_id), 503)])  # retrying
        await dispatcher.handover.on_partitions_revoked([tp])  # a rebalance: eager
        await dispatcher.handover.on_partitions_assigned([tp])  # given back
        # The dispatcher's first batch after the rebalance: the resolve, stored and offered.
        stored = records.store_batch(
            store, [resolved], [("ordered2", resolved)], [], {resolved.event_id: 0}
        )
        for name, new in stored.new:
            dispatcher.workers[name].offer(records.Job(new, partition=0))
        await until(lambda: len(arrived) == 3)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await server.close()
    assert [i for i, s in arrived if s == 200] == [str(firing.event_id), str(resolved.event_id)]


def test_a_body_that_starts_with_a_deep_bracket_run_is_a_template_error(tmp_path: Path) -> None:
    """Past the template itself, what render() raised (json.loads's RecursionError on a
    body led by ~1,000 brackets, which a user's name can hold) was no template error:
    the worker neither sent nor dead-lettered the delivery, and resumed it every second
    for ever (the next test)."""
    # A chat-style custom template that leads with the series' value; a client's
    # x-llmtap-user header (up to ~8 KB) chose that value.
    chat = tmp_path / "chat.j2"
    chat.write_text("{{ alert.value }} spent {{ alert.observed }}")
    alert = make_alert(dimension="user", value="[" * 2000)
    try:  # a body (sent as text), or a template error (dead-lettered): nothing else
        body = render.render(render.load(str(chat)), alert)
    except jinja2.TemplateError:
        return
    assert body.content_type.startswith("text/plain")


async def test_such_a_delivery_is_dead_lettered_not_resumed_for_ever(
    store: Store, tmp_path: Path
) -> None:
    chat = tmp_path / "chat.j2"
    chat.write_text("{{ alert.value }} spent {{ alert.observed }}")
    alert = make_alert("poison-rule", dimension="user", value="[" * 2000)
    hook = endpoint(
        "chat",
        "http://127.0.0.1:9/",
        rules=["poison-rule"],
        template=str(chat),
        max_attempts=1,
    )
    dispatcher = WebhookDispatcher(Settings(webhook_allow_private=True, webhooks=[hook]), store)
    worker = dispatcher.workers["chat"]
    records.store_batch(store, [alert], [("chat", alert)], [], {alert.event_id: 0})
    running = asyncio.create_task(worker.run())
    try:
        await dispatcher.handover.on_partitions_assigned([TopicPartition(Names().alerts, 0)])

        def outcomes() -> list[str]:
            rows = store.rows(
                "SELECT outcome FROM webhook_deliveries WHERE alert_id = {id:UUID} ORDER BY ts",
                {"id": alert.event_id},
            )
            return [r["outcome"] for r in rows]

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await until(lambda: outcomes()[-1] in records.FINAL)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    # dead-lettered after its one attempt (nothing listens on :9); a template error
    # would be `refused`: finished either way
    assert outcomes() in (["pending", "dead_lettered"], ["pending", "refused"])


def test_a_lone_surrogate_a_template_writes_is_a_template_error(tmp_path: Path) -> None:
    odd = tmp_path / "odd.j2"
    odd.write_text('{"t": "{{ "\\ud83d" }}{{ alert.rule }}"}')
    with pytest.raises(jinja2.TemplateError):
        render.render(render.load(str(odd)), make_alert())


async def test_an_endpoint_s_url_is_never_in_what_an_attempt_says(tmp_path: Path) -> None:
    """A webhook URL is a secret (a Slack incoming webhook's path is its key): settings
    are shown without it. A receiver answering something that is not HTTP made
    aiohttp's ClientResponseError, whose text ends in the URL, the attempt's error:
    printed by `llmtap alerts test`, and kept in `webhook_deliveries.error`."""
    path = "/services/T000/B000/k3ep-th1s-s3cret"

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 2000 OK\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    endpoint = {"name": "ops", "url": f"http://127.0.0.1:{port}{path}", "secret": SECRET}
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(tmp_path),
        "LLMTAP_WEBHOOKS": json.dumps([endpoint]),
        "LLMTAP_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    try:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "llmtap", "alerts", "test", "--endpoint", "ops"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        server.close()
    said = out.decode()
    assert process.returncode == 1 and "failed" in said, said
    assert "k3ep-th1s-s3cret" not in said, said


def test_slack_and_text_show_a_budget_s_period_and_a_resolve_s_resolution() -> None:
    """A budget alert names its period, a resolved spike why it resolved; a quiet or
    unjudged resolve (``observed`` 0, never measured) shows no observed value."""

    def text(alert: Alert) -> str:
        return render.render(render.load("text"), alert).data.decode()

    def slack(alert: Alert) -> list[str]:
        blocks = json.loads(render.render(render.load("slack"), alert).data)["blocks"]
        return [f["text"] for b in blocks if "fields" in b for f in b["fields"]]

    budget = make_alert(
        alert_type="budget",
        metric="spend",
        observed=Decimal(800),
        baseline=Decimal(1000),
        threshold=Decimal(80),
        period="week",
    )
    assert "spend observed 800 vs limit 1000 a week (80% threshold)" in text(budget)
    assert "*Period*\nweek" in slack(budget)
    older = make_alert(alert_type="budget", baseline=Decimal(1000), threshold=Decimal(80))
    assert "vs limit 1000 (80% threshold)" in text(older)  # raised before periods came
    assert not any(f.startswith("*Period*") for f in slack(older))

    resolved: dict[str, Any] = {"state": "resolved", "threshold": Decimal("5.2")}
    normal = make_alert(observed=Decimal(2), resolution="normal", **resolved)
    assert "cost observed 2 vs baseline 3.1 (alert above 5.2), resolved: normal" in text(normal)
    assert "*Observed*\n2" in slack(normal) and "*Resolution*\nnormal" in slack(normal)
    for why in ("quiet", "unjudged"):
        unmeasured = make_alert(observed=Decimal(0), resolution=why, **resolved)
        shown = text(unmeasured)
        assert "observed 0" not in shown
        assert f"cost not measured vs baseline 3.1 (alert above 5.2), resolved: {why}" in shown
        fields = slack(unmeasured)
        assert "*Observed*\nnot measured" in fields and f"*Resolution*\n{why}" in fields
    firing = make_alert()
    assert "resolved:" not in text(firing)
    assert not any(f.startswith("*Resolution*") for f in slack(firing))


async def test_a_worker_is_not_idle_while_it_rescans(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`idle` (what tests wait on) is false while a rescan reads ClickHouse: the read
    may find deliveries to send."""
    started, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    read = records.unfinished

    def held_read(*args: Any, **kwargs: Any) -> records.Resumed:
        loop.call_soon_threadsafe(started.set)
        release.wait(TIMEOUT_S)
        return read(*args, **kwargs)

    monkeypatch.setattr(records, "unfinished", held_read)
    worker = EndpointWorker(
        endpoint("idle", "http://127.0.0.1:9/idle"),
        store,
        allow_private=True,
        owned=Owned(frozenset({0})),
    )
    running = asyncio.create_task(worker.run())
    try:
        worker.reassigned()
        async with asyncio.timeout(TIMEOUT_S):
            await started.wait()
        assert not worker.idle  # the read is under way
        release.set()
        await until(lambda: worker.idle)
    finally:
        release.set()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_queued_counts_deliveries_not_a_wake_up(store: Store) -> None:
    """``llmtap_webhook_queued`` (worker.queued) counts deliveries in the queue: not the
    marker a rescan due puts there to wake the worker, which stays in it while a
    delivery is being sent."""
    rule = f"rule-{uuid.uuid4()}"
    alert = make_alert(rule)
    hold = asyncio.Event()
    async with receiver({"held": Behaviour(hold=hold)}) as rec:
        worker = EndpointWorker(
            endpoint("held", f"{rec.base_url}/held", rules=[rule], timeout_s=TIMEOUT_S),
            store,
            allow_private=True,
            owned=Owned(frozenset({0})),
        )
        records.store_batch(store, [alert], [("held", alert)], [], {alert.event_id: 0})
        running = asyncio.create_task(worker.run())
        try:
            worker.offer(records.Job(alert, partition=0))
            await until(lambda: len(rec.requests("held")) == 1)  # being sent, held
            worker.redelivered()  # a rescan is due once this delivery is done
            assert worker.queued == 0
            hold.set()
            await until(lambda: worker.idle)
            assert worker.queued == 0
        finally:
            hold.set()
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


def test_an_alert_batch_binds_its_ids_in_a_value_a_clickhouse_server_takes() -> None:
    """store_batch binds a batch's alert ids as one value (alerts_existing.sql,
    webhook_delivery_states.sql), unsplit: a ClickHouse server refuses a value past its
    http_max_field_value_size (128 KiB). A batch holds at most MAX_BATCH alerts, whose
    ids bind in ~20 KB, within what the writer's duplicate check binds at once
    (BOUND_BYTES); a larger cap would need them bound in parts, as it does."""
    ids = [uuid.uuid4() for _ in range(MAX_BATCH)]
    assert len(format_bind_value(ids)) <= BOUND_BYTES
