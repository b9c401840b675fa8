"""What a client's headers may put into a call's events: ``x-llmtap-*`` claims an
event cannot carry, or a property the analytics API cannot ask for, are refused (400,
recorded under the key's own attribution), no other header reaches an event, and an
event that still cannot be encoded is counted.

Headers are sent byte for byte on a socket (tests/raw_http.py): aiohttp's server
reads a value's bytes that are not UTF-8 as lone surrogates (surrogateescape)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict

from ingress.forward.call import MAX_CLAIMS_CHARS, BadClaim, Call, Claims, key_id
from ingress.forward.outcome import Announcement, record_outcome
from ingress.guards import auth
from ingress.guards.auth import Refusal, authenticate
from ingress.guards.key_store import KeyStore
from ingress.guards.keys import create_key, read_keys
from ingress.keys import METRICS, PUBLISHER
from ingress.metrics import IngressMetrics
from ingress.publisher import EventPublisher
from llmtap.config import Settings
from llmtap.events import Attribution, Usage
from sql.params import BadParameter, Query
from tests.conftest import Broker, FakeUpstream
from tests.prometheus import sample
from tests.raw_http import RawAnswer, raw_request
from tests.test_ingress_ops import make_key, response_event

CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = orjson.dumps(
    {"model": "claude-3-5-haiku", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
)
JSON = ("Content-Type", b"application/json")


async def chat_with(ingress: str, secret: str, *headers: tuple[str, bytes]) -> RawAnswer:
    """A chat call with the key ``secret`` and ``headers`` sent byte for byte."""
    credential = ("Authorization", b"Bearer " + secret.encode())
    return await raw_request(
        ingress, "POST", "/v1/chat/completions", [credential, JSON, *headers], CHAT
    )


@pytest.mark.parametrize(
    ("path", "header", "value"),
    [
        ("/v1/chat/completions", "x-llmtap-feature", b"\xff\xfe"),
        ("/v1/chat/completions", "x-llmtap-team", b"search\xff"),
        ("/v1/messages", "x-llmtap-property-c", b"\xff"),
        ("/v1/messages", "x-llmtap-env", b"caf\xe9"),  # Latin-1, not UTF-8
    ],
)
async def test_a_claim_that_is_not_utf8_is_refused_and_recorded_under_the_key(
    ingress: str,
    ingress_settings: Settings,
    broker: Broker,
    upstream: FakeUpstream,
    path: str,
    header: str,
    value: bytes,
) -> None:
    """It went to the provider (200) and was never recorded: its events could not be
    encoded. Now it is refused before the provider, and recorded as the 403 of a false
    claim is: under the key's own tenant, team and user, with the model it asked for."""
    secret = await make_key(ingress, ingress_settings.key_file, team="search")
    [key] = [k for k in read_keys(ingress_settings.key_file).keys if k.team == "search"]
    anthropic = path == "/v1/messages"
    credential = (
        ("x-api-key", secret.encode())
        if anthropic
        else ("Authorization", b"Bearer " + secret.encode())
    )
    before = len(upstream.provider.received)
    answer = await raw_request(
        ingress, "POST", path, [credential, JSON, (header, value)], MESSAGES if anthropic else CHAT
    )
    assert answer.status == 400, answer.body
    body = answer.json()
    if anthropic:
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
    else:
        assert body["error"]["code"] == "invalid_attribution_header"
        assert body["error"]["param"] == header  # what the error is about, as OpenAI's say
        message = body["error"]["message"]
    assert f"header {header} is not UTF-8" in message
    assert len(upstream.provider.received) == before  # the provider was not contacted

    event = await response_event(broker.bootstrap, answer.headers["x-request-id"])
    assert (event.status, event.http_status, event.error_class) == (
        "bad_request",
        400,
        "invalid_attribution_header",
    )
    assert event.model_requested == ("claude-3-5-haiku" if anthropic else "gpt-4o")
    assert event.attribution == Attribution(
        tenant="acme", team="search", key_id=key.id
    )  # the claims, none of them, with it


async def test_no_other_header_a_client_sends_reaches_an_event(
    ingress: str, ingress_settings: Settings, broker: Broker
) -> None:
    """x-request-id, traceparent, user-agent that are not UTF-8 are passed on as they
    are: no event holds them (the request id is llmtap's own), so the call is recorded."""
    secret = await make_key(ingress, ingress_settings.key_file)
    answer = await chat_with(
        ingress,
        secret,
        ("x-request-id", b"\xff"),
        ("traceparent", b"00-\xfe-\xff-01"),
        ("User-Agent", b"sdk/\xff"),
    )
    assert answer.status == 200, answer.body
    request_id = answer.headers["x-request-id"]
    assert str(uuid.UUID(request_id)) == request_id  # llmtap's, not the client's
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.attribution.tenant) == ("ok", "acme")


def test_a_claim_that_is_not_utf8_in_passthrough_is_refused_under_the_credential(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, auth="passthrough")
    headers = CIMultiDictProxy(
        CIMultiDict(
            {
                "Authorization": "Bearer sk-own",
                "x-llmtap-user": b"\xff".decode(errors="surrogateescape"),
            }
        )
    )
    with pytest.raises(Refusal) as refused:
        authenticate(headers, settings, KeyStore(settings.key_file))
    assert refused.value.status == 400
    assert "x-llmtap-user" in refused.value.message
    assert refused.value.attribution == Attribution(key_id=key_id("sk-own"))


def test_the_identities_kept_made_are_as_many_as_the_setting_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """identity_cache_size: one identity kept per key and claims in rotation (each user
    of a tenant-wide key is one); more than the default 4,096 in rotation are all kept
    when it says so, each made once, not again at every call."""
    monkeypatch.setattr(auth, "_made", {})
    settings = Settings(data_dir=tmp_path, identity_cache_size=5000)
    secret, _ = create_key(settings.key_file, tenant="acme")
    keys = KeyStore(settings.key_file)
    keys.reload()

    def headers(user: int) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(
            CIMultiDict({"Authorization": f"Bearer {secret}", "x-llmtap-user": f"u{user}"})
        )

    made = [authenticate(headers(user), settings, keys) for user in range(5000)]
    again = [authenticate(headers(user), settings, keys) for user in range(5000)]
    assert all(second is first for first, second in zip(made, again, strict=True))
    assert again[4999].attribution.user == "u4999"


async def test_an_event_that_cannot_be_encoded_is_counted_as_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever else might carry a value no JSON can hold into an event: publishing it
    neither raises (which lost the event unseen, after the client had its answer) nor
    passes silently: it is counted in events_dropped (/healthz, /metrics) and logged."""
    settings = Settings(data_dir=tmp_path)
    publisher = EventPublisher(
        settings.kafka,
        queue_size=10,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=1 << 20,
    )  # not started: what is published waits in its queue
    app = web.Application()
    app[PUBLISHER] = publisher
    app[METRICS] = IngressMetrics(publisher)
    bad = Call(provider="openai", endpoint="chat.completions")
    bad.attribution = Attribution(tenant="acme", feature=b"\xff".decode(errors="surrogateescape"))
    with caplog.at_level(logging.ERROR, logger="ingress.publisher"):
        Announcement(publisher, bad, request_bytes=10, max_tokens=None)()
        record_outcome(app, bad, "ok", 200, Usage())
    assert (publisher.dropped, publisher.backlog) == (2, 0)
    assert "could not be encoded" in caplog.text
    assert sample(app[METRICS].render().decode(), "llmtap_events_dropped_total") == 2

    good = Call(provider="openai", endpoint="chat.completions")
    record_outcome(app, good, "ok", 200, Usage())
    assert (publisher.dropped, publisher.backlog) == (2, 1)


@pytest.mark.parametrize(
    ("name", "taken"),
    [
        ("", False),
        ("a" * 65, False),
        ("a+b", False),
        ("a!", False),
        ("a~b", False),
        ("a" * 64, True),
        ("Cust.Id_2-x", True),
    ],
)
def test_the_ingress_takes_the_property_names_the_api_can_group_by(name: str, taken: bool) -> None:
    """One rule for both (llmtap.events.PROPERTY_NAME): a property the ingress records
    can be asked for by group_by=property:<name>, and one it cannot be asked for is
    refused at the ingress, not stored where only SQL reaches it."""
    headers = CIMultiDictProxy(CIMultiDict({f"x-llmtap-property-{name}": "v"}))
    try:
        recorded = Claims.of(headers).properties == {name.lower(): "v"}
    except BadClaim as bad:
        assert bad.header == f"x-llmtap-property-{name}".lower()
        recorded = False
    try:
        grouped = Query(MultiDict(group_by=f"property:{name}"), "group_by").group_by()
    except BadParameter:
        grouped = None
    assert recorded is taken
    assert grouped == (("property", name.lower()) if taken else None)


async def test_a_property_name_the_api_cannot_group_by_is_refused_and_recorded(
    ingress: str, ingress_settings: Settings, broker: Broker, upstream: FakeUpstream
) -> None:
    secret = await make_key(ingress, ingress_settings.key_file, team="search")
    [key] = [k for k in read_keys(ingress_settings.key_file).keys if k.team == "search"]
    before = len(upstream.provider.received)
    for header in ("x-llmtap-property-", "x-llmtap-property-a+b", "x-llmtap-property-" + "p" * 65):
        answer = await chat_with(ingress, secret, (header, b"v"))
        assert answer.status == 400, answer.body
        error = answer.json()["error"]
        assert error["code"] == "invalid_attribution_header"
        assert f"invalid custom property header {header!r}" in error["message"]
        assert error["param"] == header
        assert "1 to 64 of A-Z a-z 0-9 _ . -" in error["message"]
        event = await response_event(broker.bootstrap, answer.headers["x-request-id"])
        assert (event.status, event.error_class) == ("bad_request", "invalid_attribution_header")
        assert event.attribution == Attribution(tenant="acme", team="search", key_id=key.id)
    assert len(upstream.provider.received) == before


async def test_a_repeated_claim_keeps_its_first_value_properties_too(
    ingress: str, ingress_settings: Settings, broker: Broker
) -> None:
    """As headers.get reads a header, for every claim: a repeated x-llmtap-feature kept
    its first value, but a repeated x-llmtap-property-<name> its last."""
    secret = await make_key(ingress, ingress_settings.key_file)
    answer = await chat_with(
        ingress,
        secret,
        ("x-llmtap-feature", b"first"),
        ("x-llmtap-property-cust", b"first"),
        ("x-llmtap-feature", b"second"),
        ("X-LLMTAP-PROPERTY-CUST", b"second"),
    )
    assert answer.status == 200, answer.body
    event = await response_event(broker.bootstrap, answer.headers["x-request-id"])
    assert event.attribution.feature == "first"
    assert event.attribution.properties == {"cust": "first"}


def test_claims_are_taken_up_to_their_bound_in_all() -> None:
    """Names and values together, up to MAX_CLAIMS_CHARS: a call's claims are copied into
    both its events, which must fit the broker's 1 MiB limit."""
    name = "x-llmtap-property-p"
    at_bound = "v" * (MAX_CLAIMS_CHARS - len(name))
    claims = Claims.from_pairs(((name, at_bound),))
    assert claims.properties == {"p": at_bound}
    with pytest.raises(BadClaim) as refused:
        Claims.from_pairs(((name, at_bound), ("x-llmtap-feature", "f")))
    assert refused.value.header == "x-llmtap-feature"


async def test_claims_too_large_for_an_event_are_refused_and_recorded(
    ingress: str, ingress_settings: Settings, broker: Broker, upstream: FakeUpstream
) -> None:
    """100 properties of 8,000 quotes each (~1.6 MB once JSON escapes them, in each of
    the call's events): the call was forwarded and its events refused by Kafka, never
    recorded. Now it is refused before the provider, and recorded, its claims left out."""
    secret = await make_key(ingress, ingress_settings.key_file, team="search")
    [key] = [k for k in read_keys(ingress_settings.key_file).keys if k.team == "search"]
    before = len(upstream.provider.received)
    properties = [(f"x-llmtap-property-p{i}", b'"' * 8000) for i in range(100)]
    answer = await chat_with(ingress, secret, *properties)
    assert answer.status == 400, answer.body
    error = answer.json()["error"]
    assert error["code"] == "invalid_attribution_header"
    assert f"more than {MAX_CLAIMS_CHARS} characters" in error["message"]
    event = await response_event(broker.bootstrap, answer.headers["x-request-id"])
    assert (event.status, event.error_class) == ("bad_request", "invalid_attribution_header")
    assert event.attribution == Attribution(tenant="acme", team="search", key_id=key.id)
    assert len(upstream.provider.received) == before
