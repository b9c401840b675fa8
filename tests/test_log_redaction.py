"""No key in the logs, even from a request aiohttp itself refuses.

aiohttp answers a request with a malformed header line (a control character in it, a
bare LF) with a 400 and logs an ERROR whose traceback quotes that line as it came. When
that line is the credential (a key read from a file with a stray byte at its end), the
key was written to the process's log, in clear: a virtual key on the proxy, an admin
key on the analytics API.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp import web

from llmtap import logs

VIRTUAL = "ltk_9w4X1J8Ed3zTDKtADaAZn6Ixc0-lC4ryzB0ICh2_A9A"
ADMIN = "lta_cA3Pt0NAkZKGT1sRs8iiYQDLOSz8No6GZCH-eVWTp9g"
PROVIDER = "sk-proj-Zq8mR2vLx7NcT4pWb9YsK1"  # passthrough: a client's own provider key


async def _malformed(port: int, header: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


@contextlib.asynccontextmanager
async def logged_server(
    method: str,
    path: str,
    handle: Callable[[web.Request], Awaitable[web.Response]],
    *filters: logging.Filter,
) -> AsyncIterator[tuple[int, io.StringIO]]:
    """An aiohttp server on 127.0.0.1 with one route, and what aiohttp's server logger
    writes meanwhile, as llmtap formats it (through ``filters``): (its port, the log)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter("ingress"))
    for kept in filters:
        handler.addFilter(kept)
    server_log = logging.getLogger("aiohttp.server")
    server_log.addHandler(handler)
    app = web.Application()
    app.router.add_route(method, path, handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], out
    finally:
        server_log.removeHandler(handler)
        await runner.cleanup()


async def test_a_key_in_a_header_line_aiohttp_refuses_is_not_logged() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    headers = [
        b"Authorization: Bearer " + VIRTUAL.encode() + b"\x00",
        b"x-api-key: " + VIRTUAL.encode() + b" \x01",
        b"authorization: bearer " + ADMIN.encode() + b"\x7f",
        b"Authorization: Bearer " + PROVIDER.encode() + b"\x00",
        b"api-key: " + PROVIDER.encode() + b"\x00",
    ]
    async with logged_server("GET", "/v1/models", ok) as (port, out):
        for header in headers:
            assert (await _malformed(port, header)).startswith(b"HTTP/1.0 400")
        await asyncio.sleep(0.1)

    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len(headers)  # each refusal is still logged...
    text = out.getvalue()
    for secret in (VIRTUAL, ADMIN, PROVIDER):
        assert secret not in text  # ...without the key
        assert secret[:12] not in text
    assert all(": 400 (its message" in line["exception"] for line in lines)


async def test_requests_aiohttp_cannot_parse_are_warnings_and_few() -> None:
    """The client's fault, a 400 anyone can cause: logged by aiohttp as an ERROR, one
    line a request (a fuzzing pass wrote 65). A WARNING, one a while, the rest counted;
    the server's own errors stay ERRORs."""
    now = [0.0]

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    faults = logs.ClientFaults(interval=10.0, clock=lambda: now[0])
    async with logged_server("GET", "/v1/models", ok, faults) as (port, out):
        for header in (b"x-llmtap-team: a\x01b", b"x-llmtap-team: a\x1bb", b"x: \x7f"):
            assert (await _malformed(port, header)).startswith(b"HTTP/1.0 400")
        now[0] = 11.0
        assert (await _malformed(port, b"x: \x00")).startswith(b"HTTP/1.0 400")
        await asyncio.sleep(0.1)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["level"], line.get("suppressed", 0)) for line in lines] == [
        ("WARNING", 0),
        ("WARNING", 2),
    ]
    try:
        raise RuntimeError("the server's own")
    except RuntimeError:
        own = sys.exc_info()
    server_error = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "x", (), own)
    assert faults.filter(server_error) and server_error.levelname == "ERROR"


async def test_a_body_aiohttp_refuses_is_not_quoted_in_the_log() -> None:
    """A chunked body whose chunk-size line is not one (a client or proxy that got a
    length wrong): aiohttp answers 400 and logs an ERROR whose exception quoted the
    bytes it could not parse, ~500 of them, a prompt's. The log keeps what failed."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    prompt = b"MY SECRET PROMPT patient SSN 123-45-6789 " * 10
    async with logged_server("POST", "/v1/chat/completions", echo) as (port, out):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n" + prompt + b"\r\n\r\n"
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer
    (line,) = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert "SECRET" not in out.getvalue() and "123-45" not in out.getvalue()
    assert "BadHttpMessage" in line["exception"] or "TransferEncodingError" in line["exception"]


def test_keys_are_redacted_from_messages_and_tracebacks() -> None:
    formatter = logs.JsonFormatter("store")
    try:
        raise ValueError(f"bad header b'Authorization: Bearer {VIRTUAL}\\x00'")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "refused %s", (ADMIN,), sys.exc_info()
        )
    line = formatter.format(record)
    assert VIRTUAL not in line and ADMIN not in line
    entry = orjson.loads(line)
    assert entry["message"].startswith("refused lta_")
    assert "[redacted]" in entry["exception"]
    # Words that only look like the prefixes are left alone.
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "saltk_ and delta_x", (), None)
    assert orjson.loads(formatter.format(plain))["message"] == "saltk_ and delta_x"


@pytest.mark.parametrize(
    ("said", "written"),
    [
        # A tab after the colon (valid HTTP), in the repr of the line's bytes.
        (f"b'x-api-key:\\t{VIRTUAL}\\x00'", "b'x-api-key: [redacted]\\x00'"),
        # aiohttp's pure-Python parser quotes the value alone.
        (f"Invalid HTTP header: b'Bearer {PROVIDER}\\nX: y'", "b'Bearer [redacted]\\nX: y'"),
        (f"b'\\r\\nAuthorization: Bearer {ADMIN}'", "b'\\r\\nAuthorization: Bearer [redacted]'"),
        (f"{{'Authorization': 'Basic {PROVIDER}'}}", "{'Authorization': 'Basic [redacted]'}"),
        # A key after a repr's "\n": no word boundary there.
        (f"b'X\\n{VIRTUAL}'", "b'X\\nltk_[redacted]'"),
        (f"proxy-authorization:{ADMIN}", "proxy-authorization: [redacted]"),
        ("api-key: abc123secret", "api-key: [redacted]"),
        ("nothing to hide, bearer", "nothing to hide, bearer"),
    ],
)
def test_every_way_a_credential_is_quoted_is_redacted(said: str, written: str) -> None:
    redacted = logs.redact(said)
    assert written in redacted, redacted
    for secret in (VIRTUAL.removeprefix("ltk_"), ADMIN.removeprefix("lta_"), PROVIDER[3:]):
        assert secret not in redacted
