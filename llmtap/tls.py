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
    def __init__(self, role: FileRole, error: ssl.SSLError | str) -> None:
        reason = error if isinstance(error, str) else error.reason or str(error)
        super().__init__(reason)
        self.role = role


def _holds_certificate(path: Path) -> bool:
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        return False
    return True


def _load_chain(context: ssl.SSLContext, certfile: Path, keyfile: Path | None) -> None:
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        if exc.reason is not None:  # KEY_VALUES_MISMATCH and the like: OpenSSL's says it
            raise UnusableFile("keyfile" if keyfile else "certfile", exc) from exc
        # OpenSSL's bare "PEM lib" says neither which file nor what it missed.
        if not _holds_certificate(certfile):
            raise UnusableFile("certfile", "no PEM certificate in it") from exc
        if keyfile:
            raise UnusableFile("keyfile", "no PEM private key in it") from exc
        raise UnusableFile(
            "certfile",
            "a certificate without its PEM private key (a key in a file of its own: "
            "name that file in the keyfile setting)",
        ) from exc


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
