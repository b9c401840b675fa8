"""The ports `llmtap up` will listen on, checked before it starts anything.

Two settings naming one port, or a port another program holds (often a second
`llmtap up`), would otherwise show late and misleadingly: the second server cannot
bind and exits, restarted again and again, while the readiness check, asking
whatever answers on that port, may find the other program and call it ready.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmtap.config import Settings

_ANY_HOST = frozenset({"", "0.0.0.0", "::", "*"})


@dataclass(frozen=True)
class Listener:
    setting: str  # what names it, for the message
    host: str
    port: int


def listeners(settings: Settings) -> list[Listener]:
    """What `llmtap up` will bind, in the order it starts them (a port of 0 is the
    system's choice: nothing to check)."""
    found: list[Listener] = []
    if settings.embedded_broker:
        bootstrap = urlsplit(f"//{settings.kafka_bootstrap.split(',')[0].strip()}")
        if bootstrap.port:
            found.append(Listener("kafka_bootstrap", bootstrap.hostname or "", bootstrap.port))
    found.append(Listener("api_port", settings.api_host, settings.api_port))
    found.append(
        Listener("worker_metrics_port", settings.worker_metrics_host, settings.worker_metrics_port)
    )
    found.append(Listener("proxy_port", settings.proxy_host, settings.proxy_port))
    return [listener for listener in found if listener.port]


def _overlap(a: Listener, b: Listener) -> bool:
    return a.port == b.port and (a.host == b.host or {a.host, b.host} & _ANY_HOST != set())


def clashes(found: list[Listener]) -> list[str]:
    """Pairs of settings that would bind the same port on the same address."""
    return [
        f"{a.setting} and {b.setting} both name port {a.port}"
        for i, a in enumerate(found)
        for b in found[i + 1 :]
        if _overlap(a, b)
    ]


def taken(listener: Listener) -> str:
    """Why ``listener`` cannot be bound now ("" when it can). Bound as the servers bind
    (SO_REUSEADDR, so a port a stopped run left in TIME_WAIT is free), then let go."""
    where = f"{listener.setting} {listener.host}:{listener.port}"
    try:
        infos = socket.getaddrinfo(
            listener.host or None, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"{where} (cannot resolve the host: {exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return f"{where} ({exc.strerror})"
    return ""


def problems(settings: Settings) -> list[str]:
    """Everything that stops `llmtap up` listening where its settings say."""
    found = listeners(settings)
    if clashing := clashes(found):
        return clashing
    if held := [why for listener in found if (why := taken(listener))]:
        return [
            f"cannot listen on {', '.join(held)}: is another llmtap up, or another "
            "program, using it?"
        ]
    return []
