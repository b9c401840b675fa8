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

import asyncio
import functools
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

_KINDS = ("loopback", "link_local", "unspecified", "multicast", "reserved", "private")

# Not globally reachable per IANA's special-purpose address registries, listed here as
# well as asked of ``ipaddress``: its tables differ between Python patch releases
# (3.11.7 calls site-local fec0::/10, routable on Linux, and ::7f00:1 global).
_NOT_GLOBAL: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = {
    "private": tuple(
        ipaddress.ip_network(n)
        for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")
    ),
    "shared or special-purpose": tuple(
        ipaddress.ip_network(n)
        for n in (
            "0.0.0.0/8",
            "100.64.0.0/10",
            "192.0.0.0/24",
            "198.18.0.0/15",
            "::/96",  # IPv4-compatible (deprecated), the old spelling of ::ffff:a.b.c.d
            "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
            "100::/64",
            "2001::/23",
            "5f00::/16",
        )
    ),
    "documentation": tuple(
        ipaddress.ip_network(n)
        for n in (
            "192.0.2.0/24",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "2001:db8::/32",
            "3fff::/20",
        )
    ),
    "reserved": (ipaddress.ip_network("240.0.0.0/4"),),
}


class Refused(Exception):
    """The target is not allowed; nothing was sent."""


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What ``ip`` is, with its article: "a loopback", "an unspecified"."""
    kind = next((k.replace("_", "-") for k in _KINDS if getattr(ip, f"is_{k}")), None)
    kind = kind or _listed(ip) or "not globally routable"
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _listed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The kind ``_NOT_GLOBAL`` lists ``ip`` as, if any."""
    for kind, networks in _NOT_GLOBAL.items():
        if any(ip in network for network in networks):
            return kind
    return None


def _is_global(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and _listed(ip) is None


_NAT64 = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # RFC 6052's well-known prefix
    # RFC 8215's for local use, as DNS64 on IPv6-only networks gives every IPv4-only
    # receiver: the IPv4 in its last 32 bits (a /96 of it, as networks use it).
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: mapped, 6to4 (2002::/16) or NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in prefix for prefix in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def check_address(address: str, *, allow_private: bool) -> None:
    """Raise :class:`Refused` unless a request may be sent to ``address``."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_ipv4(ip)) is not None:
        ip = v4  # ::ffff:127.0.0.1 is 127.0.0.1; 6to4 and NAT64 reach the IPv4 inside
    if ip.is_multicast or ip.is_unspecified:
        raise Refused(f"{address} is {_kind(ip)} address")
    if not allow_private and not _is_global(ip):
        raise Refused(f"{address} is {_kind(ip)} address (set webhook_allow_private to allow)")


def _ip(host: str) -> str | None:
    """The IP address a host names, if it is one: in any form an IPv4 address may be
    written (``2130706433``, ``0177.0.0.1``, ``127.1``, ``0x7f.1``: what the C
    library's ``inet_aton`` reads, which a resolver may honour too)."""
    host = host.removesuffix(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or host.strip("0123456789abcdefABCDEFxX.") != "":
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse a URL that is not http(s), or whose host is a refused IP address. The
    host is read as the HTTP client reads it (yarl: 127.0.0.1 in full-width digits is 127.0.0.1,
    and an IP there is connected to without asking the resolver)."""
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise Refused(f"not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise Refused(f"scheme {parsed.scheme!r} is not http or https")
    if not parsed.raw_host:
        raise Refused("the URL has no host")
    literal = _ip(parsed.raw_host)
    if literal is not None:
        check_address(literal, allow_private=allow_private)


class GuardedResolver(AbstractResolver):
    """A host name's addresses, as aiohttp's threaded resolver finds them (the C
    library's ``getaddrinfo``), refusing any answer that holds a refused address. Looked
    up on a thread of its own, not the event loop's default executor: a receiver whose
    DNS hangs holds up only its own deliveries, never the store's writes (which run
    there)."""

    def __init__(self, *, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._threads = ThreadPoolExecutor(1, thread_name_prefix="webhook-dns")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        lookup = functools.partial(
            socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
        )
        infos = await asyncio.get_running_loop().run_in_executor(self._threads, lookup)
        answers: list[ResolveResult] = []
        for found, _, proto, _, address in infos:
            ip = str(address[0])
            if found == socket.AF_INET6:
                if len(address) != 4:
                    continue  # this Python has no IPv6
                if address[3]:
                    ip = f"{ip}%{address[3]}"  # a link-local address's scope
            try:
                check_address(ip, allow_private=self._allow_private)
            except Refused as exc:
                raise Refused(f"{host} -> {exc}") from None
            answers.append(
                ResolveResult(
                    hostname=host,
                    host=ip,
                    port=int(address[1]),
                    family=found,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        return answers

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
