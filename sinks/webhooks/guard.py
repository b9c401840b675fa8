"""The SSRF guard: which URLs and addresses a webhook may target.

Only http(s) URLs. An address that is not globally routable (loopback, private,
link-local, shared, reserved...) is refused unless ``webhook_allow_private`` is set;
multicast and unspecified addresses are always refused. An IP in the URL is checked
before any request; a host name is checked where it is resolved, inside the HTTP
client's connector (:class:`GuardedResolver`), so the addresses checked are the
addresses connected to (a DNS answer that changes between a check and the connect —
DNS rebinding — cannot slip through).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

_KINDS = ("loopback", "link_local", "unspecified", "multicast", "reserved", "private")


class Refused(Exception):
    """The target is not allowed; nothing was sent."""


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for kind in _KINDS:
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return "not globally routable"


def check_address(address: str, *, allow_private: bool) -> None:
    """Raise :class:`Refused` unless a request may be sent to ``address``."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_multicast or ip.is_unspecified:
        raise Refused(f"{address} is a {_kind(ip)} address")
    if not allow_private and not ip.is_global:
        raise Refused(f"{address} is a {_kind(ip)} address (set webhook_allow_private to allow)")


def _ip(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse a URL that is not http(s), or whose host is a refused IP address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused(f"scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise Refused("the URL has no host")
    literal = _ip(parts.hostname)
    if literal is not None:
        check_address(literal, allow_private=allow_private)


class GuardedResolver(AbstractResolver):
    """aiohttp's default resolver, refusing any answer that holds a refused address."""

    def __init__(self, *, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            try:
                check_address(answer["host"], allow_private=self._allow_private)
            except Refused as exc:
                raise Refused(f"{host} -> {exc}") from None
        return answers

    async def close(self) -> None:
        await self._inner.close()
