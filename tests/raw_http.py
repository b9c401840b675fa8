"""HTTP/1.1 requests written byte for byte on a socket: headers no client library will
send (a value that is not UTF-8, which aiohttp's server reads with surrogateescape)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict
from yarl import URL


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_request(
    base: str,
    method: str,
    path: str,
    headers: list[tuple[str, bytes]],
    body: bytes = b"",
) -> RawAnswer:
    """Send one request to ``base`` (``http://host:port``) with ``headers`` as given (their
    values as raw bytes), and read the whole answer (the connection is closed after it)."""
    url = URL(base)
    assert url.host is not None and url.port is not None
    head = [f"{method} {path} HTTP/1.1".encode(), f"Host: {url.host}:{url.port}".encode()]
    head += [name.encode() + b": " + value for name, value in headers]
    head += [b"Connection: close", f"Content-Length: {len(body)}".encode()]
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(30):
            answer = await reader.read()
    finally:
        writer.close()
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    while head_bytes.split(b" ", 2)[1:2] == [b"100"]:  # an interim answer: the final follows
        head_bytes, _, rest = rest.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    if parsed.get("Transfer-Encoding", "").lower() == "chunked":
        rest = _unchunked(rest)
    return RawAnswer(int(status_line.split()[1]), parsed, rest)


def _unchunked(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
