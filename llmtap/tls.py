"""TLS contexts made from PEM files: the one every Kafka client of a process uses
(llmtap/kafka.py), and the one the proxy and the analytics API serve HTTPS with.

A file that holds nothing TLS can use raises UnusableFile naming which file it was, so
settings refuse it at start, naming the setting (llmtap/config.py).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal

FileRole = Literal["cafile", "certfile", "keyfile"]


class UnusableFile(ValueError):
    def __init__(self, role: FileRole, error: ssl.SSLError) -> None:
        super().__init__(f"{error.reason or error}")
        self.role = role


def _load_chain(context: ssl.SSLContext, certfile: Path, keyfile: Path | None) -> None:
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        raise UnusableFile("keyfile" if keyfile else "certfile", exc) from exc


def client_context(
    cafile: Path | None, certfile: Path | None = None, keyfile: Path | None = None
) -> ssl.SSLContext:
    """Verifies the server's certificate (by ``cafile``, or the system's CAs) and host
    name; presents ``certfile`` (mutual TLS) when given."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError as exc:
        raise UnusableFile("cafile", exc) from exc
    if certfile:
        _load_chain(context, certfile, keyfile)
    return context


def server_context(certfile: Path, keyfile: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, certfile, keyfile)
    return context
