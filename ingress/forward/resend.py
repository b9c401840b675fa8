"""The keep-alive race: a provider closing an idle kept-alive connection just as llmtap
sends the next call on it.

llmtap keeps idle connections to a provider 15 s (aiohttp's default); uvicorn-style
servers (vLLM, LiteLLM, llama.cpp's) and Node close theirs after 5 s. A call sent on a
connection the provider is closing at that moment gets no answer: the provider closed
(or reset) it without taking the call. Such a call is sent once more, on a fresh
connection (its body is bytes in memory): only when the connection was a reused one
(:func:`tracing` says so, per call), no byte of an answer came, and the close came as
the call was sent (within RACE_S). Any other failure (a fresh connection, a timeout, a
head already received, a close after the provider had the call a while: a restart, a
load balancer's idle timeout under a long answer) is not retried: the provider may be
working on the call, and bill it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import RawResponseMessage
from multidict import CIMultiDict
from yarl import URL

from ingress.keys import METRICS, UPSTREAM, UPSTREAM_FRESH

log = logging.getLogger(__name__)

# A connection the provider closed or reset under a call sent on it.
_CLOSED_UNDER = (errno.ECONNRESET, errno.EPIPE)
# How soon after a call went on a reused connection its close is the keep-alive race's
# (the provider's close or reset was on its way: a round trip, and the call's upload).
RACE_S = 2.0


class Sent:
    """What aiohttp's tracing told of one send (its ``trace_request_ctx``)."""

    __slots__ = ("at", "reused")

    def __init__(self) -> None:
        self.reused = False  # on a kept-alive connection, not a new one
        self.at = 0.0  # when it went on it (the loop's time)


async def _on_reuse(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceConnectionReuseconnParams,
) -> None:
    sent = context.trace_request_ctx
    if isinstance(sent, Sent):
        sent.reused, sent.at = True, asyncio.get_running_loop().time()


def tracing() -> aiohttp.TraceConfig:
    """The upstream session's tracing: which calls went on a reused connection."""
    config = aiohttp.TraceConfig()
    config.on_connection_reuseconn.append(_on_reuse)
    config.freeze()
    return config


def closed_before_answer(sent: Sent, exc: BaseException) -> bool:
    """Whether a send that raised ``exc`` (before the answer's head was read) lost the
    keep-alive race: on a reused connection, closed without a byte of an answer (a
    ServerDisconnectedError holds the head's part that came, if any) or reset, as the
    call was sent (within RACE_S)."""
    if not sent.reused or asyncio.get_running_loop().time() - sent.at > RACE_S:
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return not isinstance(exc.message, RawResponseMessage)
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in _CLOSED_UNDER


def fresh_session(**settings: Any) -> aiohttp.ClientSession:
    """A session whose every call has a connection of its own (none is kept): the one
    resend of a call that lost the keep-alive race, which another idle connection of
    the pool could lose again (a provider restarting closes them all)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    return aiohttp.ClientSession(connector=connector, **settings)


async def request(
    app: web.Application,
    provider: str,
    method: str,
    url: str | URL,
    body: bytes | None,
    headers: CIMultiDict[str],
) -> aiohttp.ClientResponse:
    """Send a call to ``provider`` through the app's upstream session: the answer's head
    read (its body not yet), or the error. A send that lost the keep-alive race goes once
    more through the session that keeps no connection, counted and logged. A redirect is
    not followed (see the proxy)."""
    sent = Sent()
    try:
        return await app[UPSTREAM].request(
            method, url, data=body, headers=headers, allow_redirects=False, trace_request_ctx=sent
        )
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        if not closed_before_answer(sent, exc):
            raise
        app[METRICS].resent(provider)
        log.info(
            "provider %s closed a kept-alive connection as a call was sent on it (%s): "
            "sent once more on a fresh one",
            provider,
            type(exc).__name__,
        )
    return await app[UPSTREAM_FRESH].request(
        method, url, data=body, headers=headers, allow_redirects=False
    )
