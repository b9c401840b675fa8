"""The provider's connection under a call: closed as the call is sent on it (the
keep-alive race), or cut mid-answer. The provider is a raw socket server, so each of its
connections does exactly what a test plans, at the moment it plans it (no sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import orjson
import pytest

from ingress.guards.keys import create_key
from llmtap.config import Settings
from tests.conftest import INGRESS_PROVIDER_KEY, Broker, serve_ingress
from tests.prometheus import sample
from tests.test_ingress_ops import response_event

# What the provider does with a call: answer it (keep-alive), close its connection once
# it has read it (no byte of an answer), reset it (RST), send part of an answer's head
# then close, or send the head and half the body then close; or, chunked, send the
# whole JSON, or half of it, then close before the body's end (its last, empty chunk).
Act = Literal[
    "answer",
    "close",
    "reset",
    "part_head",
    "cut_body",
    "work_close",
    "chunked_whole",
    "chunked_half",
    "chunked_error",
]

# How long a "work_close" call is worked on before its connection is closed.
WORK_S = 0.3

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
CHUNKED = b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
LIMITED = orjson.dumps(
    {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit"}}
)


@dataclass
class RawProvider:
    """Calls answered by ``plan(connection, call)``: the provider's connections and
    each one's calls numbered from 0, in the order they came."""

    plan: Callable[[int, int], Act]
    calls: list[tuple[int, int]] = field(default_factory=list)
    _connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection, self._connections = self._connections, self._connections + 1
        try:
            for number in range(100):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # llmtap closed it
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)  # all of it: a close is then no reset
                self.calls.append((connection, number))
                act = self.plan(connection, number)
                if act == "answer":
                    writer.write(HEAD % len(ANSWER) + ANSWER)
                    await writer.drain()
                    continue
                if act == "work_close":  # took the call, worked on it, then went away
                    await asyncio.sleep(WORK_S)
                    return
                if act == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if act == "part_head":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Ty")
                elif act == "cut_body":
                    writer.write(HEAD % len(ANSWER) + ANSWER[: len(ANSWER) // 2])
                elif act in ("chunked_whole", "chunked_half", "chunked_error"):
                    sent = ANSWER if act == "chunked_whole" else ANSWER[: len(ANSWER) // 2]
                    sent = LIMITED if act == "chunked_error" else sent
                    status = 429 if act == "chunked_error" else 200
                    writer.write(CHUNKED % status + b"%x\r\n%s\r\n" % (len(sent), sent))
                await writer.drain()
                return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def ingress_before_raw(
    provider: RawProvider, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """An ingress whose OpenAI provider is ``provider``; its base URL."""
    server = await asyncio.start_server(provider.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    settings = settings.model_copy(update={"openai_base_url": f"http://127.0.0.1:{port}/v1"})
    try:
        ingress = await serve_ingress(settings)
        try:
            yield str(ingress.make_url("")).rstrip("/")
        finally:
            await ingress.close()
    finally:
        server.close()
        await server.wait_closed()


async def chat(session: aiohttp.ClientSession, base: str, secret: str) -> tuple[int, bytes, str]:
    async with session.post(
        f"{base}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {secret}"},
    ) as response:
        return response.status, await response.read(), response.headers["x-request-id"]


@pytest.mark.parametrize("closing", ["close", "reset"])
async def test_a_call_sent_as_the_provider_closes_its_kept_alive_connection_is_sent_again(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    closing: Act,
) -> None:
    """The provider (uvicorn's 5 s keep-alive against llmtap's 15 s) closes, or resets,
    the idle connection just as llmtap sends the next call on it, before any byte of an
    answer: the call goes once more, on a fresh connection, and the client has its
    answer (it had a 502, its usage unknown). Counted, and said with the provider's name."""
    caplog.set_level(logging.INFO, logger="ingress.forward.resend")
    provider = RawProvider(lambda *call: closing if call == (0, 1) else "answer")
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before_raw(provider, ingress_settings, monkeypatch) as base,
        aiohttp.ClientSession() as session,
    ):
        first = await chat(session, base, secret)
        status, body, request_id = await chat(session, base, secret)
        async with session.get(f"{base}/metrics") as metrics:
            text = await metrics.text()
    assert first[0] == 200
    assert (status, orjson.loads(body)["choices"][0]["message"]["content"]) == (200, "Hi")
    assert provider.calls == [(0, 0), (0, 1), (1, 0)]  # the second call: on each connection
    assert sample(text, "llmtap_upstream_resends_total", provider="openai") == 1
    assert any(
        "provider openai closed a kept-alive connection" in r.getMessage() for r in caplog.records
    )
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.usage.input_tokens) == ("ok", 200, 5)


async def test_a_free_route_s_call_that_lost_the_keep_alive_race_is_sent_again(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A moderation (passed through, not metered) goes on the same kept-alive
    connections as the metered calls, and is sent once more the same way (it had a
    502)."""
    provider = RawProvider(lambda *call: "close" if call == (0, 1) else "answer")
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before_raw(provider, ingress_settings, monkeypatch) as base,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as session,
    ):
        statuses = []
        for _ in range(2):
            async with session.post(f"{base}/v1/moderations", json={"input": "hi"}) as answer:
                statuses.append(answer.status)
                assert orjson.loads(await answer.read())["id"] == "chatcmpl-raw"
        async with session.get(f"{base}/metrics") as metrics:
            text = await metrics.text()
    assert statuses == [200, 200]
    assert provider.calls == [(0, 0), (0, 1), (1, 0)]
    assert sample(text, "llmtap_upstream_resends_total", provider="openai") == 1


@pytest.mark.parametrize(
    ("plan", "calls"),
    [
        ({(0, 0): "close"}, [(0, 0)]),  # a fresh connection
        ({(0, 0): "reset"}, [(0, 0)]),
        ({(0, 1): "part_head"}, [(0, 0), (0, 1)]),  # reused, but an answer had begun
    ],
    ids=["fresh-closed", "fresh-reset", "reused-head-begun"],
)
async def test_a_call_whose_connection_failed_otherwise_is_not_sent_again(
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    plan: dict[tuple[int, int], Act],
    calls: list[tuple[int, int]],
) -> None:
    """Closed on a fresh connection (the provider took the call, and may bill it), or
    after an answer had begun: a 502 as before, the call sent once."""
    provider = RawProvider(lambda connection, call: plan.get((connection, call), "answer"))
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before_raw(provider, ingress_settings, monkeypatch) as base,
        aiohttp.ClientSession() as session,
    ):
        for _ in calls[:-1]:
            assert (await chat(session, base, secret))[0] == 200
        status, body, request_id = await chat(session, base, secret)
        async with session.get(f"{base}/metrics") as metrics:
            text = await metrics.text()
    assert status == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_unreachable"
    assert provider.calls == calls
    assert sample(text, "llmtap_upstream_resends_total") == 0
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.usage.usage_missing) == ("upstream_unreachable", True)


async def one_chat(
    provider: RawProvider, ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, bytes, str]:
    """One chat call of a new key through an ingress before ``provider``."""
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before_raw(provider, ingress_settings, monkeypatch) as base,
        aiohttp.ClientSession() as session,
    ):
        return await chat(session, base, secret)


async def test_an_answer_cut_mid_body_is_the_provider_s_error(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider sent a 200's head and half its body, then closed: it answered, then
    broke off (it may bill the call: usage unknown). The client gets a 502 in the API's
    shape saying the answer was cut off, not that the provider was unreachable."""
    provider = RawProvider(lambda connection, call: "cut_body")
    status, body, request_id = await one_chat(provider, ingress_settings, monkeypatch)
    error = orjson.loads(body)["error"]
    assert (status, error["code"]) == (502, "upstream_cut_off")
    assert "cut off" in error["message"] and error["type"] == "api_error"
    assert provider.calls == [(0, 0)]  # not sent again
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == (
        "upstream_error",
        502,  # what the client got, as for a provider out of reach
        "ClientPayloadError",
    )
    assert event.usage.usage_missing  # it may bill


async def test_a_whole_json_answer_whose_body_breaks_off_after_it_is_passed_on(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider sent a 200's chunked body, the whole JSON answer in it, then closed
    before the body's end: the client could have had the whole answer. It gets it, and
    the call is ok with its usage, as a stream broken off after its last event is."""
    provider = RawProvider(lambda connection, call: "chunked_whole")
    status, body, request_id = await one_chat(provider, ingress_settings, monkeypatch)
    assert (status, orjson.loads(body)) == (200, orjson.loads(ANSWER))
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == ("ok", 200, "")
    usage = event.usage
    assert (usage.input_tokens, usage.output_tokens, usage.usage_missing) == (5, 1, False)


async def test_a_whole_json_error_whose_body_breaks_off_after_it_is_passed_on(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 whose whole JSON came before its body broke off: the provider's own error,
    as it sent it (not llmtap's upstream_error_cut_off), recorded as that error."""
    provider = RawProvider(lambda connection, call: "chunked_error")
    status, body, request_id = await one_chat(provider, ingress_settings, monkeypatch)
    assert (status, orjson.loads(body)) == (429, orjson.loads(LIMITED))
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status, event.error_class) == (
        "upstream_error",
        429,
        "requests",
    )
    assert (event.usage.usage_missing, event.usage.input_tokens) == (False, 0)


async def test_a_free_route_s_whole_json_whose_body_breaks_off_after_it_is_passed_on(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /v1/models (a route passed through, not metered) whose whole JSON came before
    its chunked body broke off: the client gets it, not a 502 "unreachable"."""
    provider = RawProvider(lambda connection, call: "chunked_whole")
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before_raw(provider, ingress_settings, monkeypatch) as base,
        aiohttp.ClientSession() as session,
        session.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {secret}"}) as got,
    ):
        assert (got.status, await got.read()) == (200, ANSWER)


async def test_a_chunked_answer_cut_inside_its_json_is_the_provider_s_error(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked, broken off before its JSON's end: a 502, as one cut mid-Content-Length."""
    provider = RawProvider(lambda connection, call: "chunked_half")
    status, body, request_id = await one_chat(provider, ingress_settings, monkeypatch)
    assert (status, orjson.loads(body)["error"]["code"]) == (502, "upstream_cut_off")
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.http_status) == ("upstream_error", 502)
    assert event.usage.usage_missing


async def test_a_call_worked_on_then_closed_under_is_not_sent_again(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider took the call sent on a kept-alive connection, worked on it (a long
    non-streamed answer), then its connection was closed without an answer (it restarted;
    a load balancer's idle timeout): not the keep-alive race, whose close comes as the call
    arrives. The provider may bill it: a 502, sent once, not a second (billed) call."""
    monkeypatch.setattr("ingress.forward.resend.RACE_S", WORK_S / 3)
    provider = RawProvider(lambda *call: "work_close" if call == (0, 1) else "answer")
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")  # read as it starts
    async with (
        ingress_before_raw(provider, ingress_settings, monkeypatch) as base,
        aiohttp.ClientSession() as session,
    ):
        assert (await chat(session, base, secret))[0] == 200
        status, body, request_id = await chat(session, base, secret)
    assert (status, orjson.loads(body)["error"]["code"]) == (502, "upstream_unreachable")
    assert provider.calls == [(0, 0), (0, 1)]
    event = await response_event(broker.bootstrap, request_id)
    assert (event.status, event.usage.usage_missing) == ("upstream_unreachable", True)
