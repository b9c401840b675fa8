"""How a streamed answer leaves the ingress: in as few writes as it can without holding
anything back (each a syscall and a packet, bench/NOTES.md). llmtap's head leaves with
the body bytes that came with the provider's, and the read that ends a stream with its
end; but a head with nothing after it yet, or no whole event to pass on, goes at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from ingress.guards.keys import create_key
from llmtap.config import Settings
from tests.conftest import ingress_before


def chunk(delta: dict[str, object], usage: object = None, asked: bool = True) -> bytes:
    """An OpenAI chat chunk: with ``"usage": null`` when the call asked for usage."""
    event: dict[str, object] = {
        "id": "chatcmpl-writes",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}] if delta else [],
    }
    if asked:
        event["usage"] = usage
    return b"data: " + orjson.dumps(event) + b"\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
DELTAS: list[dict[str, object]] = [{"role": "assistant", "content": ""}, {"content": "Hi"}]
EVENTS = [chunk(delta) for delta in DELTAS]
STREAM = b"".join(EVENTS) + chunk({}, USAGE) + b"data: [DONE]\n\n"
UNASKED = b"".join(chunk(delta, asked=False) for delta in DELTAS) + b"data: [DONE]\n\n"


def stream_call(asks_usage: bool) -> dict[str, object]:
    """A chat call's body asking for a stream, and for its usage if ``asks_usage``."""
    body: dict[str, object] = {"model": "gpt-4o", "messages": [], "stream": True}
    if asks_usage:
        body["stream_options"] = {"include_usage": True}
    return body


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The local port of each socket write aiohttp's HTTP writers make in this process
    (the ingress's answers, its requests to the provider, the provider's answers)."""
    ports: list[int] = []
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def port(writer: StreamWriter) -> int:
        transport = writer.transport
        assert transport is not None
        return int(transport.get_extra_info("sockname")[1])

    def counted_write(self: StreamWriter, data: bytes) -> None:
        ports.append(port(self))
        write(self, data)

    def counted_writelines(self: StreamWriter, chunks: Iterable[bytes]) -> None:
        ports.append(port(self))
        writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", counted_write)
    monkeypatch.setattr(StreamWriter, "_writelines", counted_writelines)
    yield ports


@pytest.mark.parametrize("asks_usage", [True, False], ids=["passed-on", "usage-chunk-cut"])
async def test_a_stream_that_came_whole_leaves_in_one_write(
    asks_usage: bool,
    writes: list[int],
    ingress_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The provider's head, events and end came together: the client gets llmtap's head,
    the events and the stream's end in one write (aiohttp alone makes three: the head at
    prepare(), the body, the end), byte for byte what it would have got, less the usage
    chunk llmtap asked for itself."""

    async def provider(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=STREAM, content_type="text/event-stream")

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    body = stream_call(asks_usage)
    async with (
        ingress_before(provider, ingress_settings, monkeypatch) as server,
        aiohttp.ClientSession() as session,
    ):
        writes.clear()  # the ingress's start
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": f"Bearer {secret}"},
        ) as response:
            assert response.status == 200
            got = await response.read()
        answered = writes.count(int(server.port or 0))
    assert got == (STREAM if asks_usage else UNASKED)
    assert answered == 1


async def test_the_head_of_a_stream_does_not_wait_for_its_first_event(
    writes: list[int], ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider sent its head and nothing yet (a model thinking before its first
    token): the client has llmtap's head at once, as it would have the provider's, and
    then each event as it comes."""
    first, second = asyncio.Event(), asyncio.Event()

    async def provider(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await first.wait()
        await response.write(EVENTS[0])
        await second.wait()
        await response.write_eof(EVENTS[1] + b"data: [DONE]\n\n")  # one write
        return response

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    body = stream_call(asks_usage=True)
    async with (
        ingress_before(provider, ingress_settings, monkeypatch) as server,
        aiohttp.ClientSession() as session,
    ):
        writes.clear()  # the ingress's start
        async with (
            asyncio.timeout(30),
            session.post(
                server.make_url("/v1/chat/completions"),
                json=body,
                headers={"Authorization": f"Bearer {secret}"},
            ) as response,
        ):
            assert response.status == 200  # the head came while the provider still waits
            assert response.headers["Content-Type"] == "text/event-stream"
            first.set()
            seen = b""
            while EVENTS[0] not in seen:  # before the provider writes its second event
                seen += await response.content.readany()
            second.set()
            seen += await response.content.read()
        answered = writes.count(int(server.port or 0))
    assert seen == EVENTS[0] + EVENTS[1] + b"data: [DONE]\n\n"
    # llmtap's head, each event as it came, and the end with the read that ended it.
    assert answered == 3


class _Buffered(web.StreamResponse):
    _send_headers_immediately = False  # its head leaves with the first bytes written


@pytest.mark.parametrize("asks_usage", [True, False], ids=["passed-on", "usage-chunk-cut"])
async def test_a_head_that_came_with_part_of_an_event_does_not_wait_for_its_end(
    asks_usage: bool, ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider's head came with part of its first event, the rest not yet: the
    client has llmtap's head at once, though no whole event is there to go with it."""
    rest = asyncio.Event()

    async def provider(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = _Buffered(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(EVENTS[0][:10])  # its head and part of an event: one write
        await rest.wait()
        await response.write_eof(EVENTS[0][10:] + b"data: [DONE]\n\n")
        return response

    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    body = stream_call(asks_usage)
    async with (
        ingress_before(provider, ingress_settings, monkeypatch) as server,
        aiohttp.ClientSession() as session,
    ):
        post = session.post(
            server.make_url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": f"Bearer {secret}"},
        )
        head = asyncio.ensure_future(post.__aenter__())
        done, _ = await asyncio.wait([head], timeout=5)
        rest.set()  # the provider ends its answer either way
        response = await head
        async with response:
            got = await response.read()
    assert done, "the head waited for the end of the first event"
    first = EVENTS[0] if asks_usage else chunk(DELTAS[0], asked=False)  # "usage": null cut
    assert got == first + b"data: [DONE]\n\n"
