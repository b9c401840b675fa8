"""The ports `llmtap up` will listen on, checked before it starts anything.

Two settings naming one port, or a port another program holds (often a second
`llmtap up`), would otherwise show late and misleadingly: the second server cannot
bind and exits, restarted again and again, while the readiness check, asking
whatever answers on that port, may find the other program and call it ready.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmtap.config import Settings

# The address that binds every address of its family (asyncio binds an IPv6 socket for
# IPv6 alone, so "::" and "0.0.0.0" on one port do not clash).
_ANY: dict[int, str] = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


@dataclass(frozen=True)
class Listener:
    setting: str  # what names it, for the message
    host: str
    port: int
    host_setting: str = ""  # what names its host (the same as ``setting`` when empty)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host or "*"
        return f"{self.setting} {host}:{self.port}"


def listeners(settings: Settings) -> list[Listener]:
    """What `llmtap up` will bind, in the order it starts them (a port of 0 is the
    system's choice: nothing to check; a bootstrap address that names no port is the
    broker's to refuse)."""
    found: list[Listener] = []
    if settings.embedded_broker:
        bootstrap = urlsplit(f"//{settings.kafka_bootstrap.split(',')[0].strip()}")
        with contextlib.suppress(ValueError):  # a port out of range
            if bootstrap.port:
                found.append(Listener("kafka_bootstrap", bootstrap.hostname or "", bootstrap.port))
    found.append(Listener("api_port", settings.api_host, settings.api_port, "api_host"))
    found.append(
        Listener(
            "worker_metrics_port",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
            "worker_metrics_host",
        )
    )
    found.append(Listener("proxy_port", settings.proxy_host, settings.proxy_port, "proxy_host"))
    return [listener for listener in found if listener.port]


# What each command listens on (`up`: every one of `listeners`).
SERVED_BY = {"ingress": "proxy_port", "store": "api_port", "worker": "worker_metrics_port"}


def unresolved(settings: Settings, command: str) -> list[str]:
    """The hosts ``command`` would listen on that do not resolve, each with its setting
    and value: the server's bind failed on it with "[Errno -2] Name or service not
    known" and a traceback, naming neither. An IPv6 address in brackets (``[::1]``) is
    said to be written without them."""
    found = []
    for listener in listeners(settings):
        if command != "up" and SERVED_BY.get(command) != listener.setting:
            continue
        try:
            socket.getaddrinfo(
                listener.host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except (socket.gaierror, UnicodeError) as exc:
            found.append(
                f"{listener.host_setting or listener.setting} {listener.host!r} does not "
                f"resolve to an address to listen on ({exc})" + _bracketed(listener.host)
            )
    return found


def _bracketed(host: str) -> str:
    """What to write for an IPv6 address given in brackets, as a URL or kafka_bootstrap
    spells it: a host setting takes the address alone."""
    address = host.removeprefix("[").removesuffix("]")
    if address == host:
        return ""
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return ""
    return f": an IPv6 address is written without brackets here: {address!r}"


def _addresses(host: str) -> set[tuple[int, str]]:
    """What a server binds for ``host``: each address it resolves to, with its family
    (an empty host: every address of both). A name that does not resolve stands for
    itself (binding it will fail, and say why)."""
    try:
        infos = socket.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError):
        return {(0, host)}
    return {(int(family), str(address[0])) for family, _, _, _, address in infos}


def _overlap(a: Listener, b: Listener) -> bool:
    if a.port != b.port:
        return False
    if a.host == b.host:
        return True
    return any(
        fa == fb and (ip_a == ip_b or _ANY.get(fa) in (ip_a, ip_b))
        for fa, ip_a in _addresses(a.host)
        for fb, ip_b in _addresses(b.host)
    )


def clashes(found: list[Listener]) -> list[str]:
    """Pairs of settings that would bind the same port on the same address."""
    return [
        f"{a.setting} and {b.setting} both name port {a.port}"
        for i, a in enumerate(found)
        for b in found[i + 1 :]
        if _overlap(a, b)
    ]


def taken(listener: Listener) -> tuple[str, bool]:
    """Why ``listener`` cannot be bound now ("" when it can), and whether it is that
    something holds it. Every address its host resolves to is bound at once, as the
    servers bind (SO_REUSEADDR, so a port a stopped run left in TIME_WAIT is free; an
    IPv6 socket for IPv6 alone, as asyncio's), then let go."""
    try:
        infos = socket.getaddrinfo(
            listener.host or None, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        return f"{listener} (cannot resolve the host: {exc})", False
    with contextlib.ExitStack() as held:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                probe = held.enter_context(socket.socket(family, kind, proto))
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
            except OSError as exc:
                return f"{listener} ({exc.strerror or exc})", exc.errno == errno.EADDRINUSE
    return "", False


def problems(settings: Settings) -> list[str]:
    """Everything that stops `llmtap up` listening where its settings say."""
    found = listeners(settings)
    if clashing := clashes(found):
        return clashing
    refused = [taken(listener) for listener in found]
    if why := [reason for reason, _ in refused if reason]:
        hint = (
            ": is another llmtap up, or another program, using it?"
            if any(in_use for _, in_use in refused)
            else ""
        )
        return [f"cannot listen on {', '.join(why)}{hint}"]
    return []
