"""Operating the ingress: /metrics, /readyz, and a client that hangs up mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import socket
import struct
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer
from anthropic import APIStatusError as AnthropicStatusError
from anthropic import AsyncAnthropic
from anthropic import DefaultAsyncHttpxClient as AnthropicHttpxClient
from anthropic import InternalServerError as AnthropicServerError
from openai import APIStatusError, AsyncOpenAI, DefaultAsyncHttpxClient, InternalServerError
from yarl import URL

from ingress.app import create_app
from ingress.errors import anthropic_error, openai_error
from ingress.forward import tokens
from ingress.forward.call import Call
from ingress.guards.fields import MAX_MODEL_CHARS
from ingress.guards.keys import create_key, read_keys
from ingress.metrics import MAX_MODEL_LABELS, OTHER_MODEL, IngressMetrics
from ingress.publisher import EventPublisher
from ingress.routing import asks_stream_usage
from llmtap.config import Settings
from llmtap.config_sections import ProviderConfig
from llmtap.events import RequestEvent, ResponseEvent, Status, Usage
from llmtap.names import Names
from tests.conftest import (
    INGRESS_PROVIDER_KEY,
    Broker,
    FakeUpstream,
    ingress_at,
    ingress_before,
    serve_ingress,
)
from tests.fake_provider import AZURE_FIRST_CHUNK, PROVIDER_REQUEST_ID
from tests.prometheus import sample
from tests.raw_http import raw_request


async def make_key(ingress: str, key_file: Path, team: str = "") -> str:
    """A fresh virtual key of tenant acme (and ``team``), once the ingress has loaded it."""
    secret, _ = create_key(key_file, tenant="acme", team=team)
    async with aiohttp.ClientSession() as session, asyncio.timeout(10):
        while True:
            async with session.post(
                f"{ingress}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": []},
                headers={"Authorization": f"Bearer {secret}"},
            ) as response:
                if response.status != 401:
                    return secret
            await asyncio.sleep(0.1)


async def response_event(bootstrap: str, request_id: str) -> ResponseEvent:
    """Read llmtap.responses from the start until the call's response event shows."""
    return ResponseEvent.model_validate_json(
        await event_of(bootstrap, Names().responses, request_id)
    )


async def event_of(bootstrap: str, topic: str, request_id: str) -> bytes:
    """Read ``topic`` from the start until an event of the call shows; its JSON."""
    return await _first_of(bootstrap, topic, lambda value: _request_id(value) == request_id)


def _request_id(value: bytes) -> object:
    """The request id of an event's JSON; None for anything else on the topic (the
    publisher's tests write their own payloads to the same broker's topics)."""
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return event.get("request_id") if isinstance(event, dict) else None


async def response_event_where(
    bootstrap: str, wanted: Callable[[ResponseEvent], bool]
) -> ResponseEvent:
    """Read llmtap.responses from the start until a response event ``wanted`` shows."""
    value = await _first_of(
        bootstrap, Names().responses, lambda value: wanted(ResponseEvent.model_validate_json(value))
    )
    return ResponseEvent.model_validate_json(value)


async def _first_of(bootstrap: str, topic: str, wanted: Callable[[bytes], bool]) -> bytes:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        value: bytes | None = record.value
                        assert value is not None
                        if wanted(value):
                            return value
    finally:
        await consumer.stop()


async def serve_with_provider(
    settings: Settings, name: str, provider: ProviderConfig, models: str
) -> tuple[TestServer, str, Settings]:
    """An ingress with one more provider, ``name``, serving the models ``models`` names
    (a model_routes pattern): its server, base URL and settings."""
    routed = settings.model_copy(
        update={"providers": {name: provider}, "model_routes": {models: name}}
    )
    server = await serve_ingress(routed)
    return server, str(server.make_url("")).rstrip("/"), routed


async def test_a_call_forwarded_or_refused_after_its_route_has_its_request_event(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request event is published once the request has left for the provider, or,
    for a call refused once its route is known (here: llmtap holds no key for that
    provider), before its refusal's response event."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    keyless = ProviderConfig(base_url=upstream.base_url, api_key_env="LLMTAP_TEST_UNSET_KEY")
    monkeypatch.delenv("LLMTAP_TEST_UNSET_KEY", raising=False)
    server, base, settings = await serve_with_provider(
        ingress_settings, "keyless", keyless, "keyless-*"
    )
    try:
        secret = await make_key(base, settings.key_file)
        sent = {}
        async with aiohttp.ClientSession() as session:
            for model, status in (("gpt-4o", 200), ("keyless-model", 500)):
                body = orjson.dumps({"model": model, "max_tokens": 7, "messages": []})
                async with session.post(
                    f"{base}/v1/chat/completions",
                    data=body,
                    headers={"Authorization": f"Bearer {secret}"},
                ) as response:
                    assert response.status == status
                    sent[response.headers["x-request-id"]] = (model, len(body))
    finally:
        await server.close()
    for request_id, (model, size) in sent.items():
        event = RequestEvent.model_validate_json(
            await event_of(broker.bootstrap, Names().requests, request_id)
        )
        assert (event.model_requested, event.request_bytes, event.max_tokens) == (model, size, 7)
        assert event.attribution.tenant == "acme"


async def test_metrics_count_calls_overhead_and_rejections(
    ingress: str, ingress_settings: Settings
) -> None:
    secret = await make_key(ingress, ingress_settings.key_file)
    async with aiohttp.ClientSession() as session:
        for key in (secret, secret, "ltk_wrong"):
            async with session.post(
                f"{ingress}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                await response.read()
        async with session.get(f"{ingress}/metrics") as response:
            assert response.status == 200
            text = await response.text()
    ok = sample(text, "llmtap_requests_total", endpoint="chat.completions", status="ok")
    assert ok >= 2
    assert sample(text, "llmtap_proxy_overhead_seconds_count", endpoint="chat.completions") >= 2
    assert sample(text, "llmtap_rejections_total", reason="invalid_key") >= 1
    assert "llmtap_events_backlog" in text


async def test_a_rate_limited_call_is_a_rejection(ingress: str, ingress_settings: Settings) -> None:
    """A key's rate limit refuses before the provider is asked: a rejection by reason,
    as the metric's help says, and not a call the latency histograms time."""
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", rpm=1)
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ingress}/metrics") as response:
            before = await response.text()
        async with asyncio.timeout(10):  # the first call once the key is loaded; then one more
            while len(statuses) < 2:
                async with session.post(
                    f"{ingress}/v1/chat/completions",
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {secret}"},
                ) as response:
                    if response.status != 401:
                        statuses.append(response.status)
                    else:
                        await asyncio.sleep(0.1)
        async with session.get(f"{ingress}/metrics") as response:
            text = await response.text()
    assert statuses == [200, 429]

    def grew(name: str, **labels: str) -> float:
        return sample(text, name, **labels) - sample(before, name, **labels)

    assert grew("llmtap_rejections_total", reason="rate_limited") == 1
    assert grew("llmtap_request_duration_seconds_count") == 1  # the call answered only


async def test_readyz_follows_the_providers(ingress: str, upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(20):  # ready once the producer has connected
            while True:
                async with session.get(f"{ingress}/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.1)
        await upstream.stop()
        try:
            async with session.get(f"{ingress}/readyz") as response:
                assert response.status == 503
                body = await response.json()
        finally:
            await upstream.start()
    assert body["ready"] is False
    assert body["providers"]["openai"] is False
    assert body["broker"] == "connected"


async def test_a_provider_whose_key_is_unset_is_said_at_start_and_by_readyz(
    ingress_settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its calls with llmtap keys are each refused (500, no_provider_key): before, the
    first such call was the first sign, while /readyz said nothing of it."""
    monkeypatch.delenv("LLMTAP_TEST_UNSET_KEY", raising=False)
    keyless = ingress_settings.model_copy(
        update={
            "providers": {
                "groq": ProviderConfig(
                    base_url=ingress_settings.openai_base_url, api_key_env="LLMTAP_TEST_UNSET_KEY"
                ),
                "local": ProviderConfig(base_url=ingress_settings.openai_base_url),  # none taken
            }
        }
    )
    with caplog.at_level(logging.WARNING, logger="ingress.app"):
        server = await serve_ingress(keyless)
    try:
        status, body = await readiness(str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()
    assert status == 200 and body["ready"] is True  # the other providers' calls go on
    assert body["provider_keys_unset"]["groq"] == "LLMTAP_TEST_UNSET_KEY"
    assert "local" not in body["provider_keys_unset"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("groq" in m and "LLMTAP_TEST_UNSET_KEY is unset" in m for m in warned), warned


async def readiness(base: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/readyz") as response:
        return response.status, await response.json()


async def test_what_every_replica_suffers_alike_does_not_make_one_unready(
    ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """One provider down (here: Anthropic on a port nothing listens on), or the broker
    down while the spool has room: still ready, and the JSON says what is down. Pulling
    every replica would stop the calls that work, and the spool exists for the broker's
    outages. With the spool full too, nowhere for events: not ready."""
    # A port bound and never listened on: connections to it are refused, and no server
    # a test starts meanwhile can be given it (a port merely free once could be).
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    try:
        await _every_replica_alike(ingress_settings, f"http://127.0.0.1:{held.getsockname()[1]}")
    finally:
        held.close()


async def _every_replica_alike(ingress_settings: Settings, closed: str) -> None:
    one_down = ingress_settings.model_copy(update={"anthropic_base_url": closed})
    server = await serve_ingress(one_down)
    try:
        status, body = await readiness(str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()
    assert status == 200 and body["ready"] is True
    assert body["providers"] == {"openai": True, "anthropic": False}

    no_broker = ingress_settings.model_copy(update={"kafka_bootstrap": closed[7:]})
    for spool_max_bytes, ready in ((64 * 1024 * 1024, True), (0, False)):
        app = create_app(no_broker.model_copy(update={"spool_max_bytes": spool_max_bytes}))
        async with TestServer(app, host="127.0.0.1") as offline, asyncio.timeout(20):
            while True:  # the spool opens once the publisher has started
                status, body = await readiness(str(offline.make_url("")).rstrip("/"))
                if body["spool_room"] or not ready:
                    break
                await asyncio.sleep(0.05)
        assert (status, body["ready"]) == ((200, True) if ready else (503, False))
        assert (body["broker"], body["spool_room"]) == ("unreachable", ready)


@pytest.mark.parametrize("asks_usage", [False, True])
async def test_a_client_hanging_up_mid_stream_is_still_recorded(
    ingress: str,
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    asks_usage: bool,
) -> None:
    """The client reads three words of five and hangs up: the provider's usage (last)
    never comes, and the event holds llmtap's count of what was streamed
    (tests/test_counted_output.py). Asking for usage itself, the client gets the stream
    read by read, and the reads are counted once the call is over."""
    secret = await make_key(ingress, ingress_settings.key_file)
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [], "stream": True}
    if asks_usage:
        body["stream_options"] = {"include_usage": True}
    upstream.provider.chunk_delay_s = 0.2
    seen = ""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{ingress}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {secret}"},
            ) as response,
        ):
            request_id = response.headers["x-request-id"]
            async for line in response.content:
                if line.startswith(b"data: {"):
                    seen += orjson.loads(line[6:])["choices"][0]["delta"].get("content", "")
                if seen == "Hello from the":
                    break
            response.close()  # hang up
        event = await response_event(broker.bootstrap, request_id)
    finally:
        upstream.provider.chunk_delay_s = 0.0
    assert uuid.UUID(request_id) == event.request_id
    assert event.status == "client_disconnected"
    # The provider's usage comes last; it never arrived: the input is unknown, not zero...
    assert event.usage.usage_missing
    # ...and the output is llmtap's count of what it streamed (a word or so may have
    # been read from the provider after the client's last).
    assert event.usage.output_tokens_counted
    everything = "".join(upstream.provider.words)
    assert tokens.count(seen) <= event.usage.output_tokens <= tokens.count(everything)


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_a_client_hanging_up_while_it_sends_its_request_is_recorded_quietly(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    handler_cancellation: bool,
) -> None:
    """Half a body, then the connection closed: nothing reaches the provider, the call is
    recorded as broken off by its client, and no error is logged. Served as in
    production, it escaped as an unrecorded ConnectionResetError, which aiohttp logged
    with its traceback; on a server that cancels handlers, it went unrecorded."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    server = await serve_ingress(ingress_settings, handler_cancellation)
    try:
        await _hang_up_while_sending(server, ingress_settings, upstream, broker, caplog)
    finally:
        await server.close()


async def _hang_up_while_sending(
    server: TestServer,
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ingress = str(server.make_url("")).rstrip("/")
    secret = await make_key(ingress, ingress_settings.key_file)
    feature = f"cut-upload-{uuid.uuid4().hex}"
    url = URL(ingress)
    before = len(upstream.provider.received)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmtap\r\n"
        b"Authorization: Bearer %s\r\nx-llmtap-feature: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
        b"Expect: 100-continue\r\n\r\n" % (secret.encode(), feature.encode())
    )
    # aiohttp says to go on right before the handler runs: the call is being handled
    assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
    writer.write(b'{"model": "gpt-4o", "messages": [')
    await writer.drain()
    writer.close()
    event = await response_event_where(broker.bootstrap, lambda e: e.attribution.feature == feature)
    assert (event.status, event.error_class, event.http_status) == (
        "client_disconnected",
        "client_disconnected",
        499,
    )
    assert event.attribution.tenant == "acme"
    assert event.usage == Usage()  # nothing was sent: nothing spent
    assert len(upstream.provider.received) == before
    # (the fake provider's own errors, from calls of earlier tests, are not llmtap's)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and _in_ingress(r)]


def _in_ingress(record: logging.LogRecord) -> bool:
    """Whether ``record`` is the ingress's, or of an exception raised through it."""
    stack = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
    return record.name.startswith("ingress") or any("/ingress/" in f.filename for f in stack)


async def test_unknown_routes_and_oversized_bodies_are_refused_and_recorded(
    ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    settings = ingress_settings.model_copy(update={"max_body_bytes": 4096, "auth": "passthrough"})
    server = await serve_ingress(settings)
    base = str(server.make_url("")).rstrip("/")
    before = len(upstream.provider.received)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v1/nope") as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "unknown_url"
                unknown = response.headers["x-request-id"]
            # Anthropic's paths, and its SDK's calls, are refused in Anthropic's shape.
            async with session.get(f"{base}/v1/messages") as response:
                assert response.status == 405 and "POST" in response.headers["Allow"]
                refused = await response.json()
                # Anthropic's type for a client's error, not api_error (its server's).
                assert refused["error"] == {
                    "type": "invalid_request_error",
                    "message": "Method GET not allowed on /v1/messages",
                }
            async with session.post(f"{base}/v1/messages/batches", json={}) as response:
                assert response.status == 404
                assert (await response.json())["error"]["type"] == "not_found_error"
            async with session.get(
                f"{base}/v1/nope", headers={"anthropic-version": "2023-06-01"}
            ) as response:
                assert (await response.json())["type"] == "error"
            async with session.post(
                f"{base}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 8000}]},
                headers={"Authorization": "Bearer anything"},
            ) as response:
                assert response.status == 413
                assert response.headers["x-request-id"]
            # A compressed body is refused before it is inflated (a gzip bomb would be).
            bomb = gzip.compress(b"\0" * 50_000_000)
            async with session.post(
                f"{base}/v1/chat/completions",
                data=bomb,
                headers={
                    "Authorization": "Bearer anything",
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                },
            ) as response:
                assert response.status == 415
                error = (await response.json())["error"]
                assert (
                    error["code"] == "unsupported_encoding" and "uncompressed" in error["message"]
                )
                compressed = response.headers["x-request-id"]
            for path in ("/v1/messages", "/v1/messages/count_tokens"):  # metered, free
                async with session.post(
                    f"{base}{path}",
                    data=gzip.compress(b"{}"),
                    headers={
                        "x-api-key": "anything",
                        "Content-Type": "application/json",
                        "Content-Encoding": "gzip",
                    },
                ) as response:
                    assert response.status == 415, path
                    refused = await response.json()
                    assert refused["type"] == "error", path
                    assert refused["error"]["type"] == "invalid_request_error", path
    finally:
        await server.close()
    assert len(upstream.provider.received) == before
    event = await response_event(broker.bootstrap, unknown)
    assert (event.status, event.http_status, event.error_class) == (
        "bad_request",
        404,
        "unknown_url",
    )
    event = await response_event(broker.bootstrap, compressed)
    assert (event.status, event.http_status) == ("bad_request", 415)


async def test_a_body_of_more_json_values_than_any_context_is_refused_before_parsing(
    ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """Parsing runs on the event loop: a 32 MB body of empty objects held it 0.64 s and
    took 1 GB, from any key (security probe). One of more values than
    ``max_body_values`` is refused unparsed, in the route's shape, and recorded."""
    settings = ingress_settings.model_copy(update={"max_body_values": 1000, "auth": "passthrough"})
    server = await serve_ingress(settings)
    base = str(server.make_url("")).rstrip("/")
    before = len(upstream.provider.received)

    def body(values: int) -> bytes:
        call = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        return orjson.dumps({**call, "pad": [{}] * values})

    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/v1/chat/completions",
                data=body(1500),
                headers={"Authorization": "Bearer anything", "Content-Type": "application/json"},
            ) as response:
                assert response.status == 413
                error = (await response.json())["error"]
                assert "holds 1,000 commas or more (max_body_values" in error["message"], error
                dense = response.headers["x-request-id"]
            async with session.post(
                f"{base}/v1/messages/count_tokens",
                data=body(1500),
                headers={"x-api-key": "anything", "Content-Type": "application/json"},
            ) as response:
                assert response.status == 413
                refused = await response.json()
                assert refused["error"]["type"] == "request_too_large", refused
            async with session.post(  # refused for a bad claim: its model read unparsed
                f"{base}/v1/chat/completions",
                data=body(1500),
                headers={
                    "Authorization": "Bearer anything",
                    "Content-Type": "application/json",
                    "x-llmtap-property-!!": "x",
                },
            ) as response:
                assert response.status == 400
                claimed = response.headers["x-request-id"]
            assert len(upstream.provider.received) == before  # none reached it
            async with session.post(  # fewer values than that: forwarded as ever
                f"{base}/v1/chat/completions",
                data=body(900),
                headers={"Authorization": "Bearer anything", "Content-Type": "application/json"},
            ) as response:
                assert response.status == 200, await response.text()
    finally:
        await server.close()
    assert len(upstream.provider.received) == before + 1
    event = await response_event(broker.bootstrap, dense)
    assert (event.status, event.http_status, event.error_class) == (
        "bad_request",
        413,
        "body_too_large",
    )
    # Its body held more values than are parsed: no model read from it.
    assert (await response_event(broker.bootstrap, claimed)).model_requested == ""


async def raw_post(
    server: TestServer, path: str, key: str, length: int, sent: bytes, within: float
) -> tuple[str, dict[str, str], Any]:
    """A POST of ``sent`` declaring ``length`` bytes, written by hand (a client would
    send what it declares): the answer's status line, headers (lower-cased) and JSON,
    read within ``within`` seconds."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: llmtap\r\n{key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()
        + sent
    )
    await writer.drain()
    try:
        async with asyncio.timeout(within):
            status, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            head = dict(line.lower().split(": ", 1) for line in lines if line)
            body = orjson.loads(await reader.readexactly(int(head["content-length"])))
    finally:
        writer.close()
    return status, head, body


async def test_a_body_that_stalls_mid_way_gets_a_408_at_the_read_deadline(
    ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """A client that sends part of a body and stalls held the connection, and up to
    max_body_bytes of memory, for as long as it liked: ten held 430 MB past 100 s
    (security probe). The read now has a deadline: a 408 in the route's shape, the
    call recorded, nothing forwarded."""
    settings = ingress_settings.model_copy(
        update={"body_read_timeout_s": 0.5, "auth": "passthrough"}
    )
    server = await serve_ingress(settings)
    before = len(upstream.provider.received)
    answers = []
    try:
        for path, key in (
            ("/v1/chat/completions", "Authorization: Bearer x"),
            ("/v1/messages/count_tokens", "x-api-key: x"),
        ):
            # answered without the rest of the body
            answers.append(await raw_post(server, path, key, 1000, b'{"model": "gpt-4o", ', 10))
    finally:
        await server.close()
    (openai_status, openai_head, openai_body), (anthropic_status, _, anthropic_body) = answers
    assert openai_status.startswith("HTTP/1.1 408"), openai_status
    assert "did not arrive whole within 0.5s" in openai_body["error"]["message"]
    assert anthropic_status.startswith("HTTP/1.1 408"), anthropic_status
    assert anthropic_body["type"] == "error"
    assert len(upstream.provider.received) == before
    event = await response_event(broker.bootstrap, openai_head["x-request-id"])
    assert (event.status, event.http_status, event.error_class) == (
        "bad_request",
        408,
        "body_timeout",
    )


async def test_a_body_declared_too_large_is_refused_before_it_is_read(
    ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """A Content-Length past max_body_bytes is a 413 at once, in the route's shape and
    recorded: the read waited for bytes that would be refused anyway, up to its
    deadline when fewer came (a fuzzing pass: 60 s for a 23-byte body)."""
    settings = ingress_settings.model_copy(update={"auth": "passthrough"})
    server = await serve_ingress(settings)
    before = len(upstream.provider.received)
    try:
        status, head, body = await raw_post(  # within 5 s: the read's deadline is 60 s
            server, "/v1/chat/completions", "Authorization: Bearer x", 10**11,
            b'{"model": "gpt-4o"}', 5,
        )  # fmt: skip
    finally:
        await server.close()
    assert status.startswith("HTTP/1.1 413"), status
    assert body["error"]["type"] == "invalid_request_error", body  # OpenAI's, for a 413
    assert "max_body_bytes" in body["error"]["message"]
    assert len(upstream.provider.received) == before
    event = await response_event(broker.bootstrap, head["x-request-id"])
    assert (event.status, event.http_status, event.error_class) == (
        "bad_request",
        413,
        "body_too_large",
    )


async def test_a_chunked_body_too_large_is_refused_naming_max_body_bytes(
    ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """A body past max_body_bytes sent chunked (no Content-Length: it is known too large
    only as it is read): a 413 in the route's shape, recorded, as one declared too
    large; its message was aiohttp's ("Maximum request body size 2048 exceeded."),
    naming neither the setting nor that nothing was forwarded."""
    settings = ingress_settings.model_copy(update={"auth": "passthrough", "max_body_bytes": 2048})
    server = await serve_ingress(settings)
    before = len(upstream.provider.received)
    big = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 9000}]})

    async def chunked() -> AsyncIterator[bytes]:
        for at in range(0, len(big), 1000):
            yield big[at : at + 1000]

    answers = {}
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/v1/chat/completions", "/v1/messages"):
                async with session.post(
                    server.make_url(path),
                    data=chunked(),
                    headers={"Authorization": "Bearer x", "x-api-key": "x"},
                ) as response:
                    assert "Content-Length" not in response.request_info.headers
                    answers[path] = (response.status, await response.json(), response.headers)
    finally:
        await server.close()
    (chat_status, chat, chat_head) = answers["/v1/chat/completions"]
    (messages_status, messages, _) = answers["/v1/messages"]
    assert (chat_status, messages_status) == (413, 413)
    assert messages["error"]["type"] == "request_too_large"
    for said in (chat["error"]["message"], messages["error"]["message"]):
        assert "max_body_bytes (2048)" in said and "not forwarded" in said, said
    assert len(upstream.provider.received) == before
    event = await response_event(broker.bootstrap, chat_head["x-request-id"])
    assert (event.status, event.http_status, event.error_class) == (
        "bad_request",
        413,
        "body_too_large",
    )


async def test_trace_context_reaches_the_provider_and_its_request_id_the_client(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    secret = await make_key(ingress, ingress_settings.key_file)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for stream in (False, True):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{ingress}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [], "stream": stream},
                headers={"Authorization": f"Bearer {secret}", "traceparent": traceparent},
            ) as response,
        ):
            assert response.status == 200
            await response.read()
            # llmtap's id (the call's events'), and OpenAI's own, for its support
            assert uuid.UUID(response.headers["x-request-id"])
            assert response.headers["x-provider-request-id"] == PROVIDER_REQUEST_ID
        assert upstream.provider.received[-1].headers["traceparent"] == traceparent


async def test_without_the_provider_s_key_a_virtual_key_is_refused_never_forwarded(
    ingress: str,
    ingress_settings: Settings,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = await make_key(ingress, ingress_settings.key_file)
    monkeypatch.delenv("LLMTAP_TEST_OPENAI_KEY")  # llmtap holds no key for OpenAI now
    before = len(upstream.provider.received)
    headers = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(f"{ingress}/v1/chat/completions", json=chat) as response:
            assert response.status == 500
            assert "holds no API key" in (await response.json())["error"]["message"]
        async with session.get(f"{ingress}/v1/models") as response:
            assert response.status == 500
            assert "holds no API key" in (await response.json())["error"]["message"]
    assert len(upstream.provider.received) == before  # the virtual key went nowhere


async def test_a_missing_provider_key_is_not_retried_by_the_sdks(
    ingress: str, ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llmtap holding no key for a provider is its configuration: no retry mends it.
    The SDKs retry a 500 twice by default (~1.5 s of backoff, each attempt another call
    refused and recorded): the answer says x-should-retry: false, which both obey, and
    names its code, no_provider_key, on a metered route as on a free one."""
    secret = await make_key(ingress, ingress_settings.key_file)
    monkeypatch.delenv("LLMTAP_TEST_OPENAI_KEY")
    monkeypatch.delenv("LLMTAP_TEST_ANTHROPIC_KEY")
    sent: list[object] = []

    async def count(request: object) -> None:
        sent.append(request)

    hooks = {"request": [count]}
    async with AsyncOpenAI(
        base_url=f"{ingress}/v1",
        api_key=secret,
        http_client=DefaultAsyncHttpxClient(event_hooks=hooks),
    ) as sdk:
        with pytest.raises(InternalServerError) as refused:
            await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.code == "no_provider_key"
        with pytest.raises(InternalServerError) as listed:
            await sdk.models.list()
        assert listed.value.code == "no_provider_key"
    async with AsyncAnthropic(
        base_url=ingress, api_key=secret, http_client=AnthropicHttpxClient(event_hooks=hooks)
    ) as claude:
        with pytest.raises(AnthropicServerError):
            await claude.messages.create(
                model="claude-3-5-haiku", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
    assert len(sent) == 3  # one attempt each: none retried


async def test_a_provider_that_takes_no_key_gets_none_never_the_virtual_key(
    ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """A provider configured with no api_key_env (the README's local Ollama) takes no
    key: a call with a virtual key goes to it with no credential at all (it was refused
    with a 500, "llmtap holds no API key"); the virtual key never reaches it."""
    local = ProviderConfig(base_url=upstream.base_url)  # no api_key_env
    server, base, settings = await serve_with_provider(ingress_settings, "local", local, "llama-*")
    try:
        secret = await make_key(base, settings.key_file)
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as sdk:
            answer = await sdk.chat.completions.create(
                model="llama-3.2", messages=[{"role": "user", "content": "hi"}]
            )
        assert answer.choices
    finally:
        await server.close()
    sent = {name.lower(): value for name, value in upstream.provider.received[-1].headers.items()}
    assert "authorization" not in sent and "x-api-key" not in sent
    assert not any(secret in value for value in sent.values())


async def test_a_stream_that_fails_after_its_200_is_recorded_as_the_provider_s_error(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """Anthropic, overloaded mid-answer, ends the stream with an error event: the client
    gets it as sent, and the call is an upstream error (not ok), with what was used."""
    secret = await make_key(ingress, ingress_settings.key_file)
    upstream.provider.overloaded_mid_stream = True
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{ingress}/v1/messages",
                json={
                    "model": "claude-3-5-haiku",
                    "max_tokens": 64,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                headers={"x-api-key": secret, "anthropic-version": "2023-06-01"},
            ) as response,
        ):
            assert response.status == 200
            body = await response.read()
            request_id = response.headers["x-request-id"]
    finally:
        upstream.provider.overloaded_mid_stream = False
    assert body.rstrip().endswith(b'"message":"Overloaded"}}')  # forwarded as sent
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == (
        "upstream_error",
        200,
        "overloaded_error",
    )
    assert event.usage.input_tokens > 0  # message_start's count is kept


async def test_the_speed_that_served_an_anthropic_call_is_in_its_response_event(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """A call Anthropic served in fast mode (billed at its premium) says so in its usage,
    answered whole or streamed (message_start's usage tells it); the response event
    carries it. One that asked for fast mode and was served at standard speed (Opus 4.6
    does so) is standard, and so is one that did not ask."""
    secret = await make_key(ingress, ingress_settings.key_file)
    fake = upstream.provider
    ask: Any = {
        "model": "claude-opus-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
        "speed": "fast",
        "betas": ["fast-mode-2026-02-01"],
    }
    speeds: dict[str, str] = {}
    async with AsyncAnthropic(base_url=ingress, api_key=secret, max_retries=0) as sdk:
        raw = await sdk.beta.messages.with_raw_response.create(**ask)
        assert (await raw.parse()).usage.speed == "fast"  # reached the client as sent
        speeds[raw.headers["x-request-id"]] = "fast"
        async with sdk.beta.messages.stream(**ask) as stream:
            assert (await stream.get_final_message()).usage.speed == "fast"
        speeds[stream.response.headers["x-request-id"]] = "fast"
        fake.served_speed = "standard"
        try:
            raw = await sdk.beta.messages.with_raw_response.create(**ask)
            speeds[raw.headers["x-request-id"]] = "standard"
            async with sdk.beta.messages.stream(**ask) as stream:
                await stream.get_final_message()
            speeds[stream.response.headers["x-request-id"]] = "standard"
        finally:
            fake.served_speed = None
        plain: Any = {k: v for k, v in ask.items() if k not in ("speed", "betas")}
        raw = await sdk.messages.with_raw_response.create(**plain)
        speeds[raw.headers["x-request-id"]] = "standard"
    for request_id, speed in speeds.items():
        event = await response_event(broker.bootstrap, request_id)
        assert (event.status, event.usage.speed) == ("ok", speed)
        assert event.usage.output_tokens == fake.completion_tokens


async def test_where_an_anthropic_call_s_inference_ran_is_in_its_response_event(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """A call Anthropic ran in US-only infrastructure (billed at 1.1x) says so in its
    usage's inference_geo, answered whole or streamed (message_start's usage tells
    it); the response event carries it. One asking for none is served where its
    workspace's default says (here "us"), and one served anywhere is "global", as is
    one whose answer says "not_available" or nothing."""
    secret = await make_key(ingress, ingress_settings.key_file)
    fake = upstream.provider
    ask: Any = {
        "model": "claude-opus-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
        "inference_geo": "us",
    }
    plain: Any = {k: v for k, v in ask.items() if k != "inference_geo"}
    geos: dict[str, str] = {}
    async with AsyncAnthropic(base_url=ingress, api_key=secret, max_retries=0) as sdk:
        raw = await sdk.messages.with_raw_response.create(**ask)
        assert (await raw.parse()).usage.inference_geo == "us"  # reached the client as sent
        geos[raw.headers["x-request-id"]] = "us"
        async with sdk.messages.stream(**ask) as stream:
            assert (await stream.get_final_message()).usage.inference_geo == "us"
        geos[stream.response.headers["x-request-id"]] = "us"
        for served, seen in (("us", "us"), ("not_available", "global")):
            fake.served_geo = served  # the workspace's default, or no geography told
            try:
                raw = await sdk.messages.with_raw_response.create(**plain)
                geos[raw.headers["x-request-id"]] = seen
                async with sdk.messages.stream(**plain) as stream:
                    await stream.get_final_message()
                geos[stream.response.headers["x-request-id"]] = seen
            finally:
                fake.served_geo = None
        raw = await sdk.messages.with_raw_response.create(**{**ask, "inference_geo": "global"})
        geos[raw.headers["x-request-id"]] = "global"
        raw = await sdk.messages.with_raw_response.create(**plain)
        geos[raw.headers["x-request-id"]] = "global"
    for request_id, geo in geos.items():
        event = await response_event(broker.bootstrap, request_id)
        assert (event.status, event.usage.inference_geo) == ("ok", geo)


async def test_the_service_tier_that_served_an_openai_call_is_in_its_response_event(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """OpenAI's answer says the tier that served the call (chat completions: the body's
    service_tier, every chunk's; the Responses API: its response's, response.completed's
    when streamed); the response event carries it. A priority request served at the
    default tier is standard, and so is one that asked for nothing."""
    secret = await make_key(ingress, ingress_settings.key_file)
    fake = upstream.provider
    chat: Any = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
    tiers: dict[str, str] = {}
    async with AsyncOpenAI(base_url=f"{ingress}/v1", api_key=secret, max_retries=0) as sdk:
        for asked in ("flex", "priority"):
            raw = await sdk.chat.completions.with_raw_response.create(**chat, service_tier=asked)
            assert raw.parse().service_tier == asked  # reached the client as sent
            tiers[raw.headers["x-request-id"]] = asked
            # Streamed without asking for usage: the usage chunk llmtap strips says it too.
            raw = await sdk.chat.completions.with_raw_response.create(
                **chat, service_tier=asked, stream=True
            )
            chunks = [chunk async for chunk in raw.parse()]
            assert {c.service_tier for c in chunks} == {asked} and not chunks[-1].usage
            tiers[raw.headers["x-request-id"]] = asked
            raw = await sdk.responses.with_raw_response.create(
                model="gpt-5", input="hi", service_tier=asked
            )
            tiers[raw.headers["x-request-id"]] = asked
            raw = await sdk.responses.with_raw_response.create(
                model="gpt-5", input="hi", service_tier=asked, stream=True
            )
            events = [event async for event in raw.parse()]
            assert events[-1].type == "response.completed"
            tiers[raw.headers["x-request-id"]] = asked
        fake.served_tier = "default"  # no priority capacity left: served at default
        try:
            raw = await sdk.chat.completions.with_raw_response.create(
                **chat, service_tier="priority", stream=True
            )
            _ = [chunk async for chunk in raw.parse()]
            tiers[raw.headers["x-request-id"]] = "standard"
        finally:
            fake.served_tier = None
        raw = await sdk.chat.completions.with_raw_response.create(**chat)
        tiers[raw.headers["x-request-id"]] = "standard"
    for request_id, tier in tiers.items():
        event = await response_event(broker.bootstrap, request_id)
        assert (event.status, event.usage.service_tier) == ("ok", tier), request_id
        assert event.usage.output_tokens == fake.completion_tokens


async def test_another_provider_s_tier_of_the_same_name_is_not_openai_s(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OpenAI-compatible provider answering service_tier "flex" (Groq's flex, priced
    as its on-demand tier) is served at the standard rates: its call is not OpenAI's
    flex, which its catalog entry has no rates for (it was recorded unpriced, and a hard
    cap held its worst case to the period's end). service_tiers: true on a provider
    takes its answers' tiers as OpenAI's (one fronting OpenAI's API elsewhere)."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    seen: dict[bool, str] = {}
    for tiers in (False, True):
        groq = ProviderConfig(
            base_url=upstream.base_url,
            api_key_env="LLMTAP_TEST_OPENAI_KEY",
            service_tiers=True if tiers else None,
        )
        server, base, settings = await serve_with_provider(
            ingress_settings, "groq", groq, "llama-*"
        )
        upstream.provider.served_tier = "flex"
        try:
            secret = await make_key(base, settings.key_file)
            async with AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as sdk:
                raw = await sdk.chat.completions.with_raw_response.create(
                    model="llama-3.3-70b-versatile",
                    messages=[{"role": "user", "content": "hi"}],
                    service_tier="flex",
                )
                assert raw.parse().service_tier == "flex"  # the answer reached the client as sent
        finally:
            upstream.provider.served_tier = None
            await server.close()
        event = await response_event(broker.bootstrap, raw.headers["x-request-id"])
        assert event.provider == "groq"
        seen[tiers] = event.usage.service_tier
    assert seen == {False: "standard", True: "flex"}


async def test_a_call_to_an_openai_data_residency_endpoint_is_recorded_in_its_region(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider on eu.api.openai.com (named otherwise than openai) is OpenAI's API in
    its EU region: its calls are carried as run in "eu" (priced with the 10% uplift of
    OpenAI's data-residency endpoints on models released from 2026-03-05) and its
    answers' tiers are OpenAI's. Its calls were "global" and its tiers priced as the
    standard one. (The name resolves to the fake provider on this machine.)"""
    regional = "eu.api.openai.com"
    resolve = socket.getaddrinfo

    def to_the_fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        return resolve("127.0.0.1" if host == regional else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", to_the_fake)
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    eu = ProviderConfig(
        base_url=f"http://{regional}:{upstream.port}/v1", api_key_env="LLMTAP_TEST_OPENAI_KEY"
    )
    server, base, settings = await serve_with_provider(ingress_settings, "openai-eu", eu, "gpt-6*")
    upstream.provider.served_tier = "priority"
    try:
        secret = await make_key(base, settings.key_file)
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as sdk:
            raw = await sdk.chat.completions.with_raw_response.create(
                model="gpt-6.2-sol", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        upstream.provider.served_tier = None
        await server.close()
    event = await response_event(broker.bootstrap, raw.headers["x-request-id"])
    assert (event.provider, event.status) == ("openai-eu", "ok")
    assert (event.usage.inference_geo, event.usage.service_tier) == ("eu", "priority")


async def test_a_body_with_a_byte_order_mark_is_the_provider_s_to_judge(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON body led by a UTF-8 byte order mark (some Windows tools write one): a JSON
    parser may pass it over (RFC 8259, and Python's does), so llmtap reads it and
    forwards it byte for byte, leaving the provider to accept it or not (llmtap answered
    400 invalid_json, its parser refusing it)."""
    got: list[bytes] = []

    async def provider(request: web.Request) -> web.StreamResponse:
        got.append(await request.read())
        return web.json_response(
            {
                "id": "chatcmpl-bom",
                "object": "chat.completion",
                "model": "gpt-4o-2024-08-06",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    body = b"\xef\xbb\xbf" + orjson.dumps({"model": "gpt-4o", "messages": []})
    async with (
        ingress_before(provider, ingress_settings, monkeypatch) as server,
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            data=body,
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        ) as response,
    ):
        assert response.status == 200
        request_id = response.headers["x-request-id"]
    assert got == [body]
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.model_requested, event.usage.input_tokens) == ("ok", "gpt-4o", 3)


async def test_a_large_embeddings_answer_is_metered_without_holding_the_event_loop(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embeddings answer of float vectors (2,048 of 3,072 dimensions, as a client
    not asking for the SDKs' base64 gets them: 6.3M values) was parsed whole for its
    usage on the event loop, holding every tenant's calls ~0.5 s after each such call.
    Its usage and model are read from its end; the client gets it byte for byte."""
    vector = [0.5] * 3072  # short floats: the most values a byte (real ones are longer)
    answer = orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(2048)],
            "model": "text-embedding-3-large",
            "usage": {"prompt_tokens": 100_000, "total_tokens": 100_000},
        }
    )
    piece = 1024 * 1024

    async def embeddings(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(answer)
        await response.prepare(request)
        for at in range(0, len(answer), piece):  # no copy of it all at once here
            await response.write(answer[at : at + piece])
        await response.write_eof()
        return response

    lag = 0.0

    async def ticking() -> None:  # how late the event loop runs a 10 ms timer, at worst
        nonlocal lag
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            lag = max(lag, loop.time() - before - 0.01)

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    call = {"model": "text-embedding-3-large", "input": ["hi"] * 2048, "encoding_format": "float"}
    got = hashlib.sha256()
    async with (
        ingress_before(
            embeddings, ingress_settings, monkeypatch, ("POST", "/v1/embeddings")
        ) as server,
        aiohttp.ClientSession() as session,
    ):
        ticker = asyncio.create_task(ticking())
        try:
            async with session.post(
                server.make_url("/v1/embeddings"),
                json=call,
                headers={"Authorization": f"Bearer {secret}"},
            ) as response:
                assert response.status == 200
                async for data in response.content.iter_chunked(piece):
                    got.update(data)
                request_id = response.headers["x-request-id"]
            # Its usage is read once the client has it, then its event published.
            event = await response_event(broker.bootstrap, request_id)
        finally:
            ticker.cancel()
    assert got.digest() == hashlib.sha256(answer).digest()
    assert (event.status, event.model_served) == ("ok", "text-embedding-3-large")
    assert (event.usage.input_tokens, event.usage.output_tokens) == (100_000, 0)
    assert lag < 0.25, f"the event loop was held {lag:.2f}s"


async def test_a_provider_resetting_its_connection_mid_stream_is_its_error(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider resets its connection (TCP RST) once the 200 and a chunk went out.
    aiohttp raises a reset of a connection it reads from as ClientPayloadError, never as
    the ConnectionResetError a write to a client gone away raises (aiohttp 3.10+'s
    ClientConnectionResetError is both): the call is the provider's error, not a client
    that left, and the client sees the stream broken, as the provider left it."""
    first_read = asyncio.Event()

    async def resetting(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {
            "id": "chatcmpl-reset",
            "object": "chat.completion.chunk",
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await first_read.wait()
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        request.transport.abort()  # closed without lingering: a reset, not an end
        return response

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    try:
        async with (
            ingress_before(resetting, ingress_settings, monkeypatch) as server,
            aiohttp.ClientSession() as session,
            session.post(
                server.make_url("/v1/chat/completions"),
                json={"model": "gpt-4o", "messages": [], "stream": True},
                headers={"Authorization": f"Bearer {secret}"},
            ) as response,
        ):
            assert response.status == 200
            assert b'"Hello"' in await response.content.readline()
            first_read.set()
            with pytest.raises(aiohttp.ClientPayloadError):  # no end of the stream
                await response.read()
            request_id = response.headers["x-request-id"]
    finally:
        first_read.set()  # the provider's handler ends, whatever failed
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == (
        "upstream_error",
        200,
        "ClientPayloadError",
    )


async def test_a_streamed_call_answered_by_an_error_has_no_time_to_first_token(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream asked for and refused (a 429's JSON): no token ever came, yet its TTFT
    was the error's latency, averaged into the analytics' time to first token."""

    async def refusing(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(SERVER_ERROR, status=429)

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before(refusing, ingress_settings, monkeypatch) as server,
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            json={"model": "gpt-4o", "messages": [], "stream": True},
            headers={"Authorization": f"Bearer {secret}"},
        ) as response,
    ):
        assert response.status == 429
        request_id = response.headers["x-request-id"]
    event = await response_event(broker.bootstrap, request_id)
    assert (event.stream, event.status, event.http_status) == (True, "upstream_error", 429)
    assert event.ttft_ms is None


@contextlib.asynccontextmanager
async def another_origin() -> AsyncIterator[tuple[TestServer, list[web.Request]]]:
    """A server on another origin, and every request it gets, whatever its path."""
    elsewhere: list[web.Request] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(request)
        return web.json_response({})

    other = web.Application()
    other.router.add_route("*", "/{anything:.*}", record)
    target = TestServer(other, host="127.0.0.1")
    await target.start_server()
    try:
        yield target, elsewhere
    finally:
        await target.close()


async def test_a_provider_redirect_is_answered_not_followed_nor_passed_on(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider (or a misconfigured base URL) answering a redirect to another origin:
    following it sent the prompt there, with llmtap's provider key in any header aiohttp
    does not strip across origins (Anthropic's x-api-key), and a 302 or 303 turned the
    call into a GET whose answer passed for the provider's. The client gets the redirect
    as sent, recorded as the provider's error, and the other origin gets nothing."""

    async def redirecting(request: web.Request) -> web.StreamResponse:
        await request.read()
        raise web.HTTPTemporaryRedirect(str(target.make_url("/v1/chat/completions")))

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with another_origin() as (target, elsewhere):
        async with (
            ingress_before(redirecting, ingress_settings, monkeypatch) as server,
            aiohttp.ClientSession() as session,
            session.post(
                server.make_url("/v1/chat/completions"),
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "secret"}]},
                headers={"Authorization": f"Bearer {secret}", "x-api-key": secret},
                allow_redirects=False,
            ) as response,
        ):
            assert response.status == 307
            assert "location" not in response.headers  # an SDK would follow it (httpx)
            error = (await response.json())["error"]
            assert error["code"] == "upstream_redirect"
            assert str(target.make_url("/v1/chat/completions")) in error["message"]
            request_id = response.headers["x-request-id"]
    assert elsewhere == []
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == (
        "upstream_error",
        307,
        "http_307",
    )
    assert not event.usage.usage_missing and event.usage.input_tokens == 0


async def test_an_sdk_does_not_follow_a_provider_redirect_around_llmtap(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official SDKs follow redirects (httpx's follow_redirects=True): a provider's
    redirect passed on as sent (its Location kept) took the call to its target all the
    same, prompt and all, around llmtap, and the SDK took the target's answer for the
    call's while llmtap recorded a 307 with no tokens. The SDKs get an error naming the
    redirect instead, and the other origin nothing."""

    async def redirecting(request: web.Request) -> web.StreamResponse:
        await request.read()
        raise web.HTTPTemporaryRedirect(str(target.make_url(request.path)))

    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", redirecting)
    provider.router.add_post("/v1/messages", redirecting)
    redirector = TestServer(provider, host="127.0.0.1")
    await redirector.start_server()
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    monkeypatch.setenv("LLMTAP_TEST_ANTHROPIC_KEY", INGRESS_PROVIDER_KEY)
    root = str(redirector.make_url("")).rstrip("/")
    settings = ingress_settings.model_copy(
        update={"openai_base_url": f"{root}/v1", "anthropic_base_url": root}
    )
    secret, _ = create_key(settings.key_file, tenant="acme")  # read as it starts
    prompt: Any = [{"role": "user", "content": "secret"}]
    async with another_origin() as (target, elsewhere):
        server = await serve_ingress(settings)
        base = str(server.make_url("")).rstrip("/")
        try:
            async with AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as sdk:
                with pytest.raises(APIStatusError) as refused:
                    await sdk.chat.completions.create(model="gpt-4o", messages=prompt)
            assert refused.value.status_code == 307
            assert refused.value.code == "upstream_redirect"
            assert str(target.make_url("/v1/chat/completions")) in refused.value.message
            async with AsyncAnthropic(base_url=base, api_key=secret, max_retries=0) as claude:
                with pytest.raises(AnthropicStatusError) as raised:
                    await claude.messages.create(
                        model="claude-3-5-haiku", max_tokens=10, messages=prompt
                    )
            assert raised.value.status_code == 307
        finally:
            await server.close()
            await redirector.close()
    assert [(r.method, r.path) for r in elsewhere] == []
    event = await response_event(broker.bootstrap, refused.value.response.headers["x-request-id"])
    assert (event.status, event.http_status, event.error_class) == (
        "upstream_error",
        307,
        "http_307",
    )


async def test_a_provider_redirect_on_an_unmetered_route_is_answered_not_passed_on(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a metered call's: /v1/models answered with a redirect to another origin goes to
    the client as sent, and the other origin gets nothing."""

    async def redirecting(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(target.make_url("/v1/models")))

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    models = ("GET", "/v1/models")
    async with another_origin() as (target, elsewhere):
        async with (
            ingress_before(redirecting, ingress_settings, monkeypatch, models) as server,
            aiohttp.ClientSession() as session,
            session.get(
                server.make_url("/v1/models"),
                headers={"Authorization": f"Bearer {secret}"},
                allow_redirects=False,
            ) as response,
        ):
            assert response.status == 302
            assert "location" not in response.headers
            assert (await response.json())["error"]["code"] == "upstream_redirect"
    assert elsewhere == []


async def streamed_through(
    provider: Callable[[web.Request], Awaitable[web.StreamResponse]],
    settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    call: dict[str, Any] | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, ResponseEvent]:
    """A streamed chat call (``call``, else a bare one; or a call to another ``path``)
    through an ingress whose provider answers with ``provider``: the status the client
    got, read to its end, and the call's response event."""
    secret, _ = create_key(settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before(provider, settings, monkeypatch, ("POST", path)) as server,
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url(path),
            json=call or {"model": "gpt-4o", "messages": [], "stream": True},
            headers={"Authorization": f"Bearer {secret}"},
        ) as response,
    ):
        await response.read()
        status, request_id = response.status, response.headers["x-request-id"]
    return status, await response_event(broker.bootstrap, request_id)


def sse_data(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def test_an_error_answered_as_a_stream_is_not_billed(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider answering an error with an event stream (a 500 whose body is an SSE
    error event) and no usage: recorded with no tokens, as an error's JSON is, not as
    usage unknown (which a hard cap holds at its worst case until its period ends)."""

    async def failing(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=500, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_data(SERVER_ERROR))
        await response.write_eof()
        return response

    status, event = await streamed_through(failing, ingress_settings, broker, monkeypatch)
    assert status == 500
    assert (event.status, event.http_status) == ("upstream_error", 500)
    # Its type, as the same error's JSON is recorded (not http_500: one error, two classes).
    assert event.error_class == "server_error"
    assert not event.usage.usage_missing
    assert (event.usage.input_tokens, event.usage.output_tokens) == (0, 0)


@pytest.mark.parametrize("role_first", [False, True])
async def test_a_stream_failing_before_any_token_is_not_billed(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    role_first: bool,
) -> None:
    """A 200 stream whose first event, or first after a role chunk with no text, is an
    error (a provider overloaded: Anthropic's overloaded_error, OpenAI's server_error):
    nothing was generated, and it is recorded with no tokens. It was usage unknown, which
    a hard cap holds at its worst case until the period ends: a burst of such errors
    could lock a budget out for the day."""

    async def failing(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if role_first:
            role = {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            await response.write(sse_data(role))
        await response.write(sse_data(SERVER_ERROR))
        await response.write_eof()
        return response

    status, event = await streamed_through(failing, ingress_settings, broker, monkeypatch)
    assert status == 200
    assert (event.status, event.error_class) == ("upstream_error", "server_error")
    assert not event.usage.usage_missing and not event.usage.output_tokens_counted
    assert (event.usage.input_tokens, event.usage.output_tokens) == (0, 0)


CHUNK = {
    "id": "chatcmpl-left",
    "object": "chat.completion.chunk",
    "model": "gpt-4o",
    "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
}
SERVER_ERROR = {"error": {"message": "boom", "type": "server_error", "code": None}}


@contextlib.asynccontextmanager
async def ingress_of_both(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[TestServer]:
    """An ingress whose OpenAI provider answers chat completions, and whose Anthropic
    provider answers messages, with ``answer``."""
    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", answer)
    provider.router.add_post("/v1/messages", answer)
    async with ingress_at(provider, settings, monkeypatch, anthropic=True) as server:
        yield server


# A streamed call of each API: its path and body.
STREAMED: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"model": "gpt-4o", "messages": [], "stream": True}),
    "messages": (
        "/v1/messages",
        {"model": "claude-3-5-haiku", "max_tokens": 10, "messages": [], "stream": True},
    ),
}


def _sse(events: list[dict[str, Any] | bytes]) -> list[bytes]:
    """Each event as its SSE bytes: ``data: <json>``, or a line given as bytes."""
    return [
        b"data: " + (event if isinstance(event, bytes) else orjson.dumps(event)) + b"\n\n"
        for event in events
    ]


_CHAT_STREAM = _sse(
    [
        {**CHUNK, "usage": None},
        {"id": "chatcmpl-left", "object": "chat.completion.chunk", "model": "gpt-4o",
         "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5}},
        b"[DONE]",
    ]
)  # fmt: skip
_MESSAGES_STREAM = _sse(
    [
        {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-3-5-haiku-20241022", "stop_reason": None,
            "usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    ]
)  # fmt: skip


async def _broken_off(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    api: str,
    stream: list[bytes],
    last: bytes,
    reset: bool = True,
) -> tuple[str, bytes, bool]:
    """A streamed call (``api``) whose provider writes ``stream``, waits until the client
    has read up to ``last`` (what llmtap forwards of it ends so), then breaks off: resets
    the connection, or closes it (a FIN, but no chunked body's end before it). The call's
    request id, what the client read, and whether its stream broke (a ClientPayloadError:
    no end of the stream came)."""
    client_read = asyncio.Event()

    async def breaking(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(stream))
        await client_read.wait()
        assert request.transport is not None
        if reset:
            sock = request.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()  # closed without lingering: a reset
        else:
            request.transport.close()
        return response

    secret, _ = create_key(settings.key_file, tenant="acme")  # read as it starts
    path, body = STREAMED[api]
    try:
        async with (
            ingress_of_both(breaking, settings, monkeypatch) as server,
            aiohttp.ClientSession() as session,
            session.post(
                server.make_url(path), json=body, headers={"Authorization": f"Bearer {secret}"}
            ) as response,
        ):
            assert response.status == 200
            request_id = response.headers["x-request-id"]
            got = b""
            async with asyncio.timeout(10):
                while not got.endswith(last):
                    got += await response.content.readany()
            client_read.set()
            try:
                got += await response.read()  # the stream's end came
            except aiohttp.ClientPayloadError:  # no end of the stream: broken
                return request_id, got, True
    finally:
        client_read.set()  # the provider's handler ends, whatever failed
    return request_id, got, False


@pytest.mark.parametrize("api", ["chat", "messages"])
@pytest.mark.parametrize(
    "cut", ["reset after its last event", "closed after its last event", "reset before it"]
)
async def test_a_stream_broken_off_after_its_last_event_is_whole(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    api: str,
    cut: str,
) -> None:
    """The provider sends its whole stream, its last event (OpenAI's ``data: [DONE]``,
    Anthropic's ``message_stop``) too, then resets the connection or closes it without
    the body's end (chunked: no last chunk): the client had the whole answer and the
    usage was whole, yet the call was recorded upstream_error and the client's stream
    broken. It ends cleanly and is recorded ok, with its usage. Broken off before its
    last event (Anthropic's after its final usage, message_delta), it stays the
    provider's error, the client's stream broken."""
    ended = "after" in cut
    stream = _CHAT_STREAM if api == "chat" else _MESSAGES_STREAM
    if not ended:
        stream = stream[:-1]
    # What the client gets: the chat's usage chunk, and its "usage": null, are llmtap's.
    seen = stream if api == "messages" else _sse([CHUNK, b"[DONE]"])[: len(stream) - 1]
    reset = cut.startswith("reset")
    request_id, got, broken = await _broken_off(
        ingress_settings, monkeypatch, api, stream, seen[-1], reset
    )
    assert broken is not ended
    if ended:
        assert got == b"".join(seen)  # no error: the stream's end came
    event = await response_event(broker.bootstrap, request_id)
    if ended:
        assert (event.status, event.http_status, event.error_class) == ("ok", 200, "")
        usage = event.usage
        assert (usage.input_tokens, usage.output_tokens, usage.usage_missing) == (12, 5, False)
    else:
        assert (event.status, event.http_status, event.error_class) == (
            "upstream_error",
            200,
            "ClientPayloadError",
        )


@pytest.mark.parametrize("done", [b"[DONE] ", b"[DONE]\t"])
async def test_a_stream_whose_done_has_whitespace_after_it_ended_there(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch, done: bytes
) -> None:
    """Some servers write whitespace after [DONE] (the openai SDK ends the stream at it
    all the same): broken off after it, the stream was whole, as after a bare [DONE]."""
    stream = [*_CHAT_STREAM[:-1], *_sse([done])]
    request_id, got, broken = await _broken_off(
        ingress_settings, monkeypatch, "chat", stream, stream[-1]
    )
    assert not broken
    assert got == b"".join(_sse([CHUNK, done]))
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == ("ok", 200, "")
    assert (event.usage.input_tokens, event.usage.output_tokens) == (12, 5)


@pytest.mark.parametrize(
    ("api", "error", "kind"),
    [
        ("chat", SERVER_ERROR, "server_error"),
        ("messages", {"type": "error", "error": {"type": "overloaded_error",
                                                 "message": "Overloaded"}}, "overloaded_error"),
    ],
)  # fmt: skip
async def test_a_stream_broken_off_after_its_error_event_keeps_the_provider_s_error(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    api: str,
    error: dict[str, Any],
    kind: str,
) -> None:
    """The provider streams some of its answer, then an error event (Anthropic's
    overloaded_error, OpenAI's error chunk), then resets the connection: the call is the
    provider's error as its event says, as when the stream ends cleanly after it, not
    the connection's (it was recorded ClientPayloadError)."""
    stream = (_CHAT_STREAM[:1] if api == "chat" else _MESSAGES_STREAM[:3]) + _sse([error])
    request_id, _, broken = await _broken_off(
        ingress_settings, monkeypatch, api, stream, stream[-1]
    )
    assert broken  # the client's stream broken, as the provider's was
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == ("upstream_error", 200, kind)


@pytest.mark.parametrize("answer", ["a 500", "an error event in a stream", "one, usage asked"])
async def test_a_provider_error_whose_client_left_before_it_came_stays_the_provider_s(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """The provider answers an error after the client hung up (a 500, or an error event
    in a stream that had begun, as Anthropic's overloaded_error): the call is the
    provider's error (what an error rate counts and an operator looks for), not a
    client that left, which writing the error to the gone client had made it."""
    asked, client_gone = asyncio.Event(), asyncio.Event()

    async def failing(request: web.Request) -> web.StreamResponse:
        await request.read()
        if answer == "a 500":
            asked.set()
            await client_gone.wait()
            return web.json_response(SERVER_ERROR, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + orjson.dumps(CHUNK) + b"\n\n")
        asked.set()
        await client_gone.wait()
        await response.write(b"data: " + orjson.dumps(SERVER_ERROR) + b"\n\n")
        return response

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    feature = f"left-{uuid.uuid4().hex}"
    call: dict[str, Any] = {"model": "gpt-4o", "messages": []}
    if answer != "a 500":
        call["stream"] = True
    if answer == "one, usage asked":  # passed on read by read, read after
        call["stream_options"] = {"include_usage": True}
    body = orjson.dumps(call)
    try:
        async with ingress_before(failing, ingress_settings, monkeypatch) as server:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: llmtap\r\n"
                b"Authorization: Bearer %s\r\nx-llmtap-feature: %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (secret.encode(), feature.encode(), len(body), body)
            )
            await writer.drain()
            async with asyncio.timeout(10):
                await asked.wait()
                if answer != "a 500":  # the stream has begun: its first chunk came
                    await reader.readuntil(b'"Hi"')
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # a reset: the ingress learns of it at once
                assert server.runner is not None and server.runner.server is not None
                [connection] = server.runner.server.connections  # kept while it runs
                while connection.transport is not None:  # until the ingress saw it go
                    await asyncio.sleep(0.01)
            client_gone.set()
            event = await response_event_where(
                broker.bootstrap, lambda e: e.attribution.feature == feature
            )
    finally:
        client_gone.set()
    assert (event.status, event.error_class) == ("upstream_error", "server_error")
    assert event.http_status == (500 if answer == "a 500" else 200)
    if answer == "a 500":
        assert event.usage == Usage()  # an error is not billed


def test_a_provider_on_mistral_s_api_is_not_asked_for_stream_usage_unless_set() -> None:
    """Mistral's API refuses stream_options (a 422, "extra_forbidden", for every stream)
    and sends a stream's usage unasked: a provider on it is not asked, unless set to be.
    Any other is asked, unless set not to be."""
    mistral = ProviderConfig(base_url="https://api.mistral.ai/v1", api_key_env="MISTRAL_API_KEY")
    assert not asks_stream_usage(mistral)
    assert asks_stream_usage(mistral.model_copy(update={"stream_usage": True}))
    groq = ProviderConfig(base_url="https://api.groq.com/openai/v1")
    assert asks_stream_usage(groq)
    assert not asks_stream_usage(groq.model_copy(update={"stream_usage": False}))


async def test_a_provider_set_not_to_be_asked_for_stream_usage_is_not(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For a provider that refuses fields it does not know: the body goes as the client
    sent it, and the stream's output is counted from its text."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    plain = ProviderConfig(
        base_url=upstream.base_url, api_key_env="LLMTAP_TEST_OPENAI_KEY", stream_usage=False
    )
    server, base, settings = await serve_with_provider(ingress_settings, "plain", plain, "plain-*")
    try:
        secret = await make_key(base, settings.key_file)
        sent = {
            "model": "plain-model",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{base}/v1/chat/completions",
                json=sent,
                headers={"Authorization": f"Bearer {secret}"},
            ) as response,
        ):
            assert response.status == 200
            body = await response.read()
            request_id = response.headers["x-request-id"]
    finally:
        await server.close()
    assert upstream.provider.received[-1].body == sent  # no stream_options added
    assert b'"usage"' not in body
    event = await response_event(broker.bootstrap, request_id)
    assert event.status == "ok"
    assert event.usage.output_tokens_counted and event.usage.output_tokens > 0


@pytest.mark.parametrize("choices", [{"choices": None}, {}])
async def test_a_usage_chunk_without_choices_is_llmtap_s_not_the_client_s(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    choices: dict[str, Any],
) -> None:
    """A provider sends the usage chunk llmtap asked for with "choices" null or absent
    (some OpenAI-compatible servers do), not []: a client that did not ask never sees it
    (the openai SDK's chunk.choices[0] failed on it), and the call's usage is its."""

    async def answer(request: web.Request) -> web.StreamResponse:
        asked = await request.json()
        assert asked["stream_options"] == {"include_usage": True}
        usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in _sse([
            {**CHUNK, "usage": None},
            {"id": "chatcmpl-left", "object": "chat.completion.chunk", "created": 0,
             "model": "gpt-4o", **choices, "usage": usage},
            b"[DONE]",
        ]):  # fmt: skip
            await response.write(event)
        await response.write_eof()
        return response

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before(answer, ingress_settings, monkeypatch) as server,
        AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=secret, max_retries=0) as sdk,
    ):
        streamed = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in streamed.parse()]
    assert [chunk.choices[0].delta.content for chunk in chunks] == ["Hi"]
    assert all(chunk.usage is None for chunk in chunks)
    event = await response_event(broker.bootstrap, streamed.headers["x-request-id"])
    assert event.status == "ok"
    assert (event.usage.input_tokens, event.usage.output_tokens) == (12, 5)


async def test_a_key_refused_for_a_false_claim_is_recorded_under_its_own_tenant(
    ingress: str, ingress_settings: Settings, broker: Broker
) -> None:
    """A valid key claiming another team is refused (403), and the refusal is recorded
    under the key's tenant and team, not the claim, nor no one: its tenant sees it, with
    the model the call asked for."""
    secret = await make_key(ingress, ingress_settings.key_file, team="search")
    [key] = [k for k in read_keys(ingress_settings.key_file).keys if k.team == "search"]
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{ingress}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": []},
            headers={"Authorization": f"Bearer {secret}", "x-llmtap-team": "billing"},
        ) as response:
            assert response.status == 403
            refused = response.headers["x-request-id"]
        # A compressed body is not inflated to find its model (a gzip bomb would be).
        async with session.post(
            f"{ingress}/v1/chat/completions",
            data=gzip.compress(orjson.dumps({"model": "gpt-4o", "messages": []})),
            headers={
                "Authorization": f"Bearer {secret}",
                "x-llmtap-team": "billing",
                "Content-Encoding": "gzip",
            },
        ) as response:
            assert response.status == 403
            compressed = response.headers["x-request-id"]
    event = await response_event(broker.bootstrap, refused)
    assert (event.status, event.error_class) == ("refused", "attribution_conflict")
    assert event.model_requested == "gpt-4o"
    who = event.attribution
    assert (who.tenant, who.team, who.key_id) == ("acme", "search", key.id)
    event = await response_event(broker.bootstrap, compressed)
    assert (event.error_class, event.model_requested) == ("attribution_conflict", "")


async def test_models_passes_one_model_on_and_no_other_path(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """GET /v1/models/<model> goes out with llmtap's provider key: a model name that
    decodes to more of a path ("x/../../files") must not take that key to any other
    endpoint of the provider (its files, stored responses...)."""
    secret = await make_key(ingress, ingress_settings.key_file)
    before = len(upstream.provider.received)
    headers = {"Authorization": f"Bearer {secret}"}
    said: list[str] = []
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{ingress}/v1/models/ft:gpt-4o-mini:acme::x1") as response:
            assert response.status == 200
        for sneaky in (
            "x%2F..%2F..%2Ffiles",
            "..%2Ffiles",
            "%2E%2E",
            "x%2F..%2F..%2Fchat%2Fcompletions%3Flimit%3D100",
            "x/../../files",
        ):
            url = URL(f"{ingress}/v1/models/{sneaky}", encoded=True)
            async with session.get(url) as response:
                assert response.status == 404, sneaky
                error = (await response.json())["error"]  # the provider's shape
                said.append(error["message"].split(":")[0])
    asked = [received.path for received in upstream.provider.received[before:]]
    assert asked == ["/v1/models/ft:gpt-4o-mini:acme::x1"]
    # A name the route takes is refused saying why; one it does not is an unknown route.
    assert said == ["llmtap looks one model up by a name without '/' or '..'"] * 4 + [
        "Unknown route"
    ]


async def test_head_on_the_models_list_keeps_the_provider_s_content_length(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """HEAD /v1/models (aiohttp answers HEAD on a GET route) went to the provider as HEAD,
    whose Content-Length, of the list it did not send, was dropped with the hop-by-hop
    headers: the client was told 0. It keeps the provider's length, of the list as a GET
    gets it (asked unencoded: a compressed length is not what llmtap sends)."""
    secret = await make_key(ingress, ingress_settings.key_file)
    headers = {"Authorization": f"Bearer {secret}"}
    before = len(upstream.provider.received)
    async with aiohttp.ClientSession(headers=headers) as session:
        for path in ("/v1/models", "/v1/models/gpt-4o"):
            async with session.get(f"{ingress}{path}") as response:
                assert response.status == 200
                listed = await response.read()
            async with session.head(f"{ingress}{path}") as response:
                assert response.status == 200, path
                assert response.headers["Content-Length"] == str(len(listed)), path
                assert response.headers["Content-Type"].startswith("application/json")
                assert response.headers["x-request-id"]
                assert await response.read() == b""
    asked = upstream.provider.received[before:]
    assert [r.path for r in asked] == ["/v1/models"] * 2 + ["/v1/models/gpt-4o"] * 2
    assert asked[1].headers.get("Accept-Encoding") == "identity"
    assert asked[1].headers["Authorization"] == f"Bearer {INGRESS_PROVIDER_KEY}"


async def test_a_refused_route_is_recorded_under_its_key_never_under_a_claim(
    ingress: str, ingress_settings: Settings, broker: Broker
) -> None:
    """Claims come with a key: without one, anyone could file errors under any tenant."""
    secret = await make_key(ingress, ingress_settings.key_file, team="search")
    claims = {"x-llmtap-tenant": "globex", "x-llmtap-team": "billing"}
    sent = {
        "no key": claims,
        "unknown key": {**claims, "Authorization": "Bearer sk-llmtap-nobody"},
        "false claim": {**claims, "Authorization": f"Bearer {secret}"},
        "valid key": {"Authorization": f"Bearer {secret}", "x-llmtap-feature": "export"},
    }
    ids = {}
    async with aiohttp.ClientSession() as session:
        for name, headers in sent.items():
            async with session.get(f"{ingress}/v1/nope", headers=headers) as response:
                assert response.status == 404
                ids[name] = response.headers["x-request-id"]
    recorded = {}
    for name, request_id in ids.items():
        event = await response_event(broker.bootstrap, request_id)
        a = event.attribution
        recorded[name] = (a.tenant, a.team, a.feature, event.error_class)
    assert recorded == {
        "no key": ("", "", "", "unknown_url"),
        "unknown key": ("", "", "", "unknown_url"),
        "false claim": ("acme", "search", "", "unknown_url"),
        "valid key": ("acme", "search", "export", "unknown_url"),
    }


async def test_a_query_string_reaches_the_provider_as_the_client_sent_it(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """Still encoded, on a metered route and a free one: decoded, a %23 ended it (the
    rest was a fragment), and a %00 made the free route fail with a bare 500."""
    secret = await make_key(ingress, ingress_settings.key_file)
    query = "api-version=1&x=%23a%20b&y=%00&z=%C3%A9"
    bodies = {
        "/v1/chat/completions": {"model": "gpt-4o", "messages": []},
        "/v1/moderations": {"input": "hi"},
    }
    async with aiohttp.ClientSession() as session:
        for path, body in bodies.items():
            async with session.post(
                URL(f"{ingress}{path}?{query}", encoded=True),
                json=body,
                headers={"Authorization": f"Bearer {secret}"},
            ) as response:
                assert response.status == 200, await response.text()
            seen = upstream.provider.received[-1]
            assert (seen.path, seen.query) == (path, query)


async def test_a_key_of_some_models_names_one_on_a_free_route(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """A moderation names its model or the provider picks one: a key that may use only
    gpt-4o models must name one it may use (400 without, 403 for another), the
    provider not asked; naming one, it goes."""
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", allowed_models=("gpt-4o*",))
    asked = len(upstream.provider.received)
    headers = {"Authorization": f"Bearer {secret}"}
    answers = []
    async with aiohttp.ClientSession() as session, asyncio.timeout(10):
        for body in ({"input": "hi"}, {"input": "hi", "model": None}):
            while True:  # until the ingress has read the new key
                async with session.post(
                    f"{ingress}/v1/moderations", json=body, headers=headers
                ) as response:
                    if response.status != 401:
                        answers.append((response.status, (await response.json())["error"]))
                        break
                await asyncio.sleep(0.1)
        async with session.post(
            f"{ingress}/v1/moderations",
            json={"input": "hi", "model": "omni-moderation-latest"},
            headers=headers,
        ) as response:
            answers.append((response.status, (await response.json())["error"]))
        assert len(upstream.provider.received) == asked
        async with session.post(
            f"{ingress}/v1/moderations", json={"input": "hi", "model": "gpt-4o"}, headers=headers
        ) as response:
            assert response.status == 200
    assert [(status, error["param"]) for status, error in answers] == [
        (400, "model"),
        (400, "model"),
        (403, "model"),
    ]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (415, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),  # a provider that did not answer in time
        (529, "overloaded_error"),
    ],
)
def test_each_status_llmtap_answers_has_anthropic_s_type_for_it(status: int, kind: str) -> None:
    """Anthropic's documented types (docs.anthropic.com/en/api/errors): a client's error
    is never api_error, Anthropic's type for its own failures."""
    body = orjson.loads(anthropic_error(status, "m").body)  # type: ignore[arg-type]
    assert body == {"type": "error", "error": {"type": kind, "message": "m"}}
    # An OpenAI type (a 429's "insufficient_quota") is OpenAI's alone.
    typed = anthropic_error(status, "m", openai_type="insufficient_quota")
    assert orjson.loads(typed.body) == body  # type: ignore[arg-type]
    assert orjson.loads(openai_error(status, "m").body)["error"]["type"] == (  # type: ignore[arg-type]
        "invalid_request_error" if status < 500 else "api_error"
    )


async def test_every_content_encoding_is_refused_in_the_route_s_shape_and_recorded(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever the encoding, and whether or not the body is valid in it, the route
    answers its 415 and records it; nothing is logged as an error. aiohttp's parser
    inflated bodies before: br (no Brotli installed) was its own plain-text 400 with no
    x-request-id, before any route, unrecorded; an invalid gzip or deflate body got its
    415, then an "Unhandled exception" traceback as aiohttp read the rest."""
    server = await serve_ingress(ingress_settings.model_copy(update={"auth": "passthrough"}))
    base = str(server.make_url("")).rstrip("/")
    before = len(upstream.provider.received)
    bodies = {
        "br": b"\x1b\x01\x00\xf8\xa5@\x02{}",
        "zstd": b"not zstd",
        "gzip": b"not gzip",
        "deflate": b"not deflate",
        "x-llmtap-unknown": b"{}",
    }
    refused: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for encoding, body in bodies.items():
                for path in ("/v1/chat/completions", "/v1/messages"):
                    async with session.post(
                        f"{base}{path}",
                        data=body,
                        headers={
                            "Authorization": "Bearer anything",
                            "x-api-key": "anything",
                            "Content-Type": "application/json",
                            "Content-Encoding": encoding,
                        },
                    ) as response:
                        assert response.status == 415, (encoding, path)
                        answer = await response.json()
                        if path == "/v1/messages":
                            assert answer["error"]["type"] == "invalid_request_error"
                        else:
                            assert answer["error"]["code"] == "unsupported_encoding"
                        assert "uncompressed" in answer["error"]["message"]
                        refused[f"{encoding} {path}"] = response.headers["x-request-id"]
        for request_id in refused.values():
            event = await response_event(broker.bootstrap, request_id)
            assert (event.status, event.http_status, event.error_class) == (
                "bad_request",
                415,
                "unsupported_encoding",
            )
    finally:
        await server.close()
    assert len(upstream.provider.received) == before
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and (_in_ingress(r) or "content-encoding" in str(r.exc_info and r.exc_info[1]))
    ]


def test_the_model_label_is_bounded_and_a_served_model_cut_to_its_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model label and the served model come from clients and providers: past
    MAX_MODEL_LABELS distinct models, calls count under OTHER_MODEL (a client naming a
    new model in every call must not grow /metrics and the process without end), and a
    provider's model name goes into the response event cut to what a request's may be
    (an event Kafka refuses would lose the call)."""
    publisher = EventPublisher(
        Settings(data_dir=tmp_path).kafka,
        queue_size=10,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=1 << 20,
    )  # not started: nothing is published here
    metrics = IngressMetrics(publisher)
    ended = Call(provider="openai", endpoint="chat.completions")

    def observe(model: str, status: Status = "ok") -> None:
        metrics.observe(
            ended.response_event(status=status, http_status=200, usage=Usage(), model_served=model)
        )

    with caplog.at_level(logging.WARNING, logger="ingress.metrics"):
        for n in range(1000):  # made-up names the provider refused take no label
            observe(f"refused-{n}", "upstream_error")
        for n in range(MAX_MODEL_LABELS + 50):
            observe(f"made-up-{n}")
        observe("made-up-0")  # one labelled before the bound keeps its label
    text = metrics.render().decode()
    models = {
        line.split('model="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("llmtap_requests_total{")
    }
    assert len(models) == MAX_MODEL_LABELS + 1
    assert sample(text, "llmtap_requests_total", model=OTHER_MODEL, status="ok") == 50
    assert sample(text, "llmtap_requests_total", model=OTHER_MODEL, status="upstream_error") == 1000
    assert sample(text, "llmtap_requests_total", model="made-up-0") == 2
    assert caplog.text.count("model=" + OTHER_MODEL) == 1

    long = "m" * 2_000_000
    event = ended.response_event(status="ok", http_status=200, usage=Usage(), model_served=long)
    assert event.model_served == long[:MAX_MODEL_CHARS]


async def test_time_to_first_token_is_a_streamed_call_s(
    ingress: str, ingress_settings: Settings, broker: Broker
) -> None:
    """A whole answer's first byte comes once it is all generated: its TTFT was its
    latency, averaged into the analytics' and the spikes' time to first token with the
    streams'. Only a streamed call has one."""
    secret = await make_key(ingress, ingress_settings.key_file)
    ask: Any = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with AsyncOpenAI(base_url=f"{ingress}/v1", api_key=secret, max_retries=0) as client:
        whole = await client.chat.completions.with_raw_response.create(**ask)
        async with client.chat.completions.with_streaming_response.create(
            **ask, stream=True
        ) as streamed:
            async for _ in streamed.iter_lines():
                pass
    answered = await response_event(broker.bootstrap, whole.headers["x-request-id"])
    assert (answered.stream, answered.status, answered.ttft_ms) == (False, "ok", None)
    event = await response_event(broker.bootstrap, streamed.headers["x-request-id"])
    assert (event.stream, event.status) == (True, "ok")
    assert event.ttft_ms is not None and 0 < event.ttft_ms <= event.latency_ms


@pytest.mark.parametrize("asks_usage", [False, True])
async def test_time_to_first_token_waits_for_the_stream_s_first_event(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch, asks_usage: bool
) -> None:
    """A provider that sends its stream's headers (and a comment) at once and its first
    event once the prompt is read (vLLM's Starlette sends the head before the generator
    yields; OpenRouter comments while it waits): the time to first token is the first
    event's, not the head's."""

    async def slow_first_token(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # the head goes out now
        await response.write(b": PROCESSING\n\n")  # a comment, as OpenRouter's, no event
        await asyncio.sleep(0.5)  # prefill: no token yet
        await response.write(sse_data(CHUNK))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    call: dict[str, Any] = {"model": "gpt-4o", "messages": [], "stream": True}
    if asks_usage:
        call["stream_options"] = {"include_usage": True}
    status, event = await streamed_through(
        slow_first_token, ingress_settings, broker, monkeypatch, call
    )
    assert status == 200
    assert event.ttft_ms is not None and 500 <= event.ttft_ms <= event.latency_ms


RESPONSE_STARTED: dict[str, Any] = {
    "id": "resp_1",
    "status": "in_progress",
    "output": [],
    "usage": None,
}


async def created_then_in_progress(response: web.StreamResponse) -> None:
    """OpenAI's: response.created and response.in_progress, their type opening the data."""
    for kind in ("response.created", "response.in_progress"):
        await response.write(sse_data({"type": kind, "response": RESPONSE_STARTED}))


async def created_cut_in_its_type(response: web.StreamResponse) -> None:
    """response.created in two reads (TCP splits where it likes), cut inside its type."""
    created = {"type": "response.created", "response": RESPONSE_STARTED}
    event = b"event: response.created\n" + sse_data(created)
    cut = event.index(b'"type"') + 4  # data: {"typ | e":"response.created",...
    await response.write(event[:cut])
    await asyncio.sleep(0.1)  # the first half read alone
    await response.write(event[cut:])


async def created_as_the_sdk_dumps_it(response: web.StreamResponse) -> None:
    """A server writing the openai SDK's own event models (vLLM's Responses API: an
    ``event:`` line, then the model's JSON): ``type`` last, after the response object
    and its nested types ("text")."""
    from openai.types.responses import Response, ResponseCreatedEvent

    started = Response.model_validate(
        {
            **RESPONSE_STARTED,
            "created_at": 0,
            "model": "gpt-4o",
            "object": "response",
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
        }
    )
    created = ResponseCreatedEvent(response=started, sequence_number=0, type="response.created")
    data = created.model_dump_json().encode()
    await response.write(b"event: response.created\ndata: " + data + b"\n\n")


async def created_long(response: web.StreamResponse) -> None:
    """response.created echoing long instructions, no ``event:`` line: a data line longer
    than a read, its type at its start."""
    started = {**RESPONSE_STARTED, "instructions": "Be brief. " * 20_000}
    await response.write(sse_data({"type": "response.created", "response": started}))


@pytest.mark.parametrize(
    "preamble",
    [created_then_in_progress, created_cut_in_its_type, created_as_the_sdk_dumps_it, created_long],
)
async def test_a_responses_stream_s_first_token_is_not_its_response_created(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    preamble: Callable[[web.StreamResponse], Awaitable[None]],
) -> None:
    """The Responses API sends response.created (and response.in_progress) as it takes
    the call, before the model generates anything: the time to first token is its first
    event after those (here the text's first delta), not ~0 for every model; however
    the reads cut it, wherever its type is."""

    await first_token_after_half_a_second(
        preamble, _FIRST_OUTPUT["text"], ingress_settings, broker, monkeypatch
    )


async def first_token_after_half_a_second(
    preamble: Callable[[web.StreamResponse], Awaitable[None]],
    first: dict[str, Any],
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Responses stream through the ingress: ``preamble`` at once, ``first`` half a
    second later, then its end; its time to first token is that half second's end."""

    async def slow_first_token(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await preamble(response)  # at once
        await asyncio.sleep(0.5)  # prefill: no token yet
        await response.write(sse_data(first))
        usage = {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}
        done = {**RESPONSE_STARTED, "status": "completed", "usage": usage, "model": "gpt-4o"}
        await response.write(sse_data({"type": "response.completed", "response": done}))
        await response.write_eof()
        return response

    call = {"model": "gpt-4o", "input": "hi", "stream": True}
    status, event = await streamed_through(
        slow_first_token, ingress_settings, broker, monkeypatch, call, "/v1/responses"
    )
    assert (status, event.status, event.usage.output_tokens) == (200, "ok", 1)
    assert event.ttft_ms is not None and 500 <= event.ttft_ms <= event.latency_ms


# The Responses API's first output of each kind: text, a function call's arguments, a
# reasoning summary, a refusal (the events the openai SDK's types name).
_FIRST_OUTPUT: dict[str, dict[str, Any]] = {
    "text": {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hi"},
    "arguments": {
        "type": "response.function_call_arguments.delta",
        "item_id": "fc_1",
        "delta": "{",
    },
    "reasoning": {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "delta": "I"},
    "refusal": {"type": "response.refusal.delta", "item_id": "msg_1", "delta": "No"},
}


@pytest.mark.parametrize("output", list(_FIRST_OUTPUT))
async def test_a_responses_stream_s_first_token_is_its_first_output(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """After response.created the Responses API opens the output item (and its content
    part, or its reasoning summary's part) before the model generates any of it: those
    carry no output. The time to first token is the first delta's, not the item's."""
    item = {"id": "msg_1", "type": "message", "status": "in_progress", "content": []}
    opened: list[dict[str, Any]] = [
        {"type": "response.created", "response": RESPONSE_STARTED},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {
            "type": "response.content_part.added",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []},
        },
        {
            "type": "response.reasoning_summary_part.added",
            "item_id": "rs_1",
            "output_index": 0,
            "summary_index": 0,
            "part": {"type": "summary_text", "text": ""},
        },
    ]

    async def preamble(response: web.StreamResponse) -> None:
        for event in opened:
            kind = event["type"].encode()
            await response.write(b"event: " + kind + b"\n" + sse_data(event))

    await first_token_after_half_a_second(
        preamble, _FIRST_OUTPUT[output], ingress_settings, broker, monkeypatch
    )


@pytest.mark.parametrize("api", ["chat", "messages"])
async def test_a_client_that_leaves_at_the_last_event_had_the_whole_answer(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    """The openai SDK closes its connection once it reads data: [DONE] (httpx's close
    of a body not read to its end), as a client may at message_stop: the provider's end
    of the body, coming after, found the client gone, and the call, its whole answer
    given, was recorded client_disconnected. It is ok, with its usage."""
    client_left = asyncio.Event()

    async def ending_late(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        stream = _CHAT_STREAM if api == "chat" else _MESSAGES_STREAM
        await response.write(b"".join(stream))
        await client_left.wait()
        await response.write_eof()  # the body's end, once the client has left
        return response

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    path, body = STREAMED[api]
    last = b"data: [DONE]\n\n" if api == "chat" else _MESSAGES_STREAM[-1]
    try:
        async with (
            ingress_of_both(ending_late, ingress_settings, monkeypatch) as server,
            aiohttp.ClientSession() as session,
        ):
            async with session.post(
                server.make_url(path), json=body, headers={"Authorization": f"Bearer {secret}"}
            ) as response:
                request_id = response.headers["x-request-id"]
                got = b""
                async with asyncio.timeout(10):
                    while not got.endswith(last):
                        got += await response.content.readany()
                response.close()  # as the SDK does: the connection closed
            client_left.set()
            event = await response_event(broker.bootstrap, request_id)
    finally:
        client_left.set()
    assert (event.status, event.http_status, event.error_class) == ("ok", 200, "")
    usage = event.usage
    assert (usage.input_tokens, usage.output_tokens, usage.usage_missing) == (12, 5, False)


ROLE_CHUNK = {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}


@pytest.mark.parametrize("api", ["chat", "messages"])
async def test_time_to_first_token_waits_for_the_first_event_with_output(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    """Azure OpenAI sends its prompt filter's results (no choices), and every chat stream
    its role (no text), Anthropic its message_start and a ping, as the call is taken,
    before the model generates anything: the time to first token is the first event
    with output's (a delta's text, Anthropic's first content block), not ~0."""
    if api == "chat":
        before = _sse([AZURE_FIRST_CHUNK, ROLE_CHUNK])
        after = _sse([CHUNK, b"[DONE]"])
    else:
        before = [
            b"event: message_start\n" + _MESSAGES_STREAM[0],
            b'event: ping\ndata: {"type": "ping"}\n\n',
        ]
        after = _MESSAGES_STREAM[1:]

    async def slow_first_token(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(before))  # at once
        await asyncio.sleep(0.5)  # prefill: no token yet
        for event in after:
            await response.write(event)
        await response.write_eof()
        return response

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    path, body = STREAMED[api]
    async with (
        ingress_of_both(slow_first_token, ingress_settings, monkeypatch) as server,
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url(path), json=body, headers={"Authorization": f"Bearer {secret}"}
        ) as response,
    ):
        assert response.status == 200
        await response.read()
        request_id = response.headers["x-request-id"]
    event = await response_event(broker.bootstrap, request_id)
    assert event.status == "ok"
    assert event.ttft_ms is not None and 500 <= event.ttft_ms <= event.latency_ms


async def test_counting_a_stream_s_output_is_not_the_call_s_latency_nor_overhead(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream that ends without the provider's usage has its output counted by llmtap
    once the client has the whole answer (in a thread: the encoding's first load takes
    ~0.2 s, a long answer's tokenizing more, on a busy executor longer). The client saw
    the call end at its last byte: that is its latency (and the event's end), and the
    count, which no client waits for, is not proxy overhead either."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    real_count = tokens.count

    def slow_count(text: str) -> int:
        import time

        time.sleep(1.0)
        return real_count(text)

    monkeypatch.setattr(tokens, "count", slow_count)
    plain = ProviderConfig(
        base_url=upstream.base_url, api_key_env="LLMTAP_TEST_OPENAI_KEY", stream_usage=False
    )
    server, base, settings = await serve_with_provider(ingress_settings, "plain", plain, "plain-*")
    try:
        secret = await make_key(base, settings.key_file)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{base}/v1/chat/completions",
                json={"model": "plain-model", "stream": True, "messages": []},
                headers={"Authorization": f"Bearer {secret}"},
            ) as response,
        ):
            assert response.status == 200
            await response.read()
            request_id = response.headers["x-request-id"]
    finally:
        await server.close()
    event = await response_event(broker.bootstrap, request_id)
    assert event.usage.output_tokens_counted and event.usage.output_tokens > 0
    assert event.latency_ms < 1000, event.latency_ms
    assert event.proxy_overhead_ms < 1000, event.proxy_overhead_ms


CHAT_ANSWER = {
    "id": "chatcmpl-w",
    "object": "chat.completion",
    "model": "gpt-4o-2024-08-06",
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


async def test_a_provider_s_cookie_never_reaches_another_call(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider setting a cookie (Cloudflare's __cf_bm in front of OpenAI, a load
    balancer's sticky session in front of a vLLM) sets it for the client that made the
    call, which may send it back or not. The ingress's one upstream session kept it in
    its own cookie jar and sent it with every later call, of every tenant: tenant B's
    call carried what the provider told tenant A, a header B never sent."""
    cookies: list[list[str]] = []

    async def provider(request: web.Request) -> web.StreamResponse:
        await request.read()
        cookies.append(request.headers.getall("Cookie", []))
        answer = web.json_response(CHAT_ANSWER)
        answer.set_cookie("sticky", f"backend-of-call-{len(cookies)}")
        return answer

    app = web.Application()
    app.router.add_post("/v1/chat/completions", provider)
    acme, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    globex, _ = create_key(ingress_settings.key_file, tenant="globex")
    async with ingress_at(app, ingress_settings, monkeypatch, host="localhost") as server:
        for key in (acme, globex):
            async with (
                aiohttp.ClientSession() as session,  # a client of its own, each
                session.post(
                    server.make_url("/v1/chat/completions"),
                    json={"model": "gpt-4o", "messages": []},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response,
            ):
                assert response.status == 200
                # The client gets the provider's cookie, as it would without llmtap.
                assert response.cookies["sticky"].value == f"backend-of-call-{len(cookies)}"
    assert cookies == [[], []]  # neither call sent one


async def test_a_client_s_expect_100_continue_is_not_passed_to_the_provider(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """curl sends ``Expect: 100-continue`` with a large body. aiohttp's server answers
    the client's 100 itself and the ingress reads the body whole; passed on, the
    expectation made aiohttp's client wait for the provider's 100 before sending the
    body. A server may read a body without a 100 (one of HTTP/1.0 does, and RFC 9110
    lets a client go on without it): the provider waited for the body, the ingress for
    the 100, and the call hung (no read timeout runs before the body is sent)."""
    expectations: list[str | None] = []

    async def without_interim_answer(request: web.Request) -> None:
        return None  # no 100 (Continue): the handler just reads the body

    async def provider(request: web.Request) -> web.StreamResponse:
        expectations.append(request.headers.get("Expect"))
        await request.read()
        return web.json_response(CHAT_ANSWER)

    app = web.Application()
    app.router.add_route(
        "POST", "/v1/chat/completions", provider, expect_handler=without_interim_answer
    )
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]})
    async with ingress_at(app, ingress_settings, monkeypatch) as server:
        base = str(server.make_url("")).rstrip("/")
        async with asyncio.timeout(10):
            answer = await raw_request(
                base,
                "POST",
                "/v1/chat/completions",
                [
                    ("Authorization", f"Bearer {secret}".encode()),
                    ("Content-Type", b"application/json"),
                    ("Expect", b"100-continue"),
                ],
                body,
            )
    assert answer.status == 200, answer.body
    assert answer.json() == CHAT_ANSWER
    assert expectations == [None]
    event = await response_event(broker.bootstrap, answer.headers["x-request-id"])
    assert (event.status, event.usage.input_tokens) == ("ok", 3)


async def test_a_base_url_s_query_goes_with_every_call_after_its_path(
    ingress_settings: Settings, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Azure-style gateway wants its api-version on every call: a base URL that holds
    it (accepted by the config) had the endpoint's path appended after its query, so
    each call went to the base path with the path inside its query value. The client's
    own query joins the base URL's."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    settings = ingress_settings.model_copy(
        update={"openai_base_url": f"{upstream.base_url}?api-version=2024-06-01"}
    )
    secret, _ = create_key(settings.key_file, tenant="acme")  # read as it starts
    server = await serve_ingress(settings)
    try:
        async with aiohttp.ClientSession() as session:
            for path, body in (
                ("/v1/chat/completions", {"model": "gpt-4o", "messages": []}),
                ("/v1/moderations", {"input": "hi"}),
            ):
                async with session.post(
                    URL(f"{server.make_url(path)}?x=%23a", encoded=True),
                    json=body,
                    headers={"Authorization": f"Bearer {secret}"},
                ) as response:
                    assert response.status == 200, await response.text()
                seen = upstream.provider.received[-1]
                assert (seen.path, seen.query) == (path, "api-version=2024-06-01&x=%23a")
    finally:
        await server.close()
