"""What a call publishes: its request event once (:class:`Announcement`) and its
response event however it ended (:func:`record_outcome`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from ingress.forward.call import Call
from ingress.keys import GRACE_OVER, METRICS, PUBLISHER
from ingress.publisher import EventPublisher
from ingress.spool import Delivered
from llmtap import topics, wire
from llmtap.events import Status, Usage

log = logging.getLogger(__name__)

Settle = Callable[[datetime], Delivered | None]  # a call's end time -> who hears of its event


def record_outcome(
    app: web.Application,
    call: Call,
    status: Status,
    http_status: int,
    usage: Usage,
    model_served: str = "",
    error_class: str = "",
    settle: Settle | None = None,
) -> None:
    """Publish a call's response event and count it, however the call ended. ``settle``
    is called with the event's end time first, and may return who to tell where the
    event went (a cost held against a hard cap until a budget state counts it)."""
    event = call.response_event(
        status=status,
        http_status=http_status,
        usage=usage,
        model_served=model_served,
        error_class=error_class,
    )
    delivered = None
    if settle is not None:
        try:
            delivered = settle(event.ts_end)
        except Exception:  # a bug in budget code must not cost the call its event
            log.exception("settling the call's budgets failed")
    publish(app[PUBLISHER], app[PUBLISHER].names.responses, call, event, delivered)
    app[METRICS].observe(event)


def publish(
    publisher: EventPublisher,
    topic: str,
    call: Call,
    event: wire.Request | wire.Response,
    delivered: Delivered | None = None,
) -> None:
    """Queue a call's event. One that cannot be encoded (a bug: a value no JSON can
    carry) is counted as dropped and logged, never raised: the call has been answered,
    or is being refused, and an exception here would lose the event unseen (and turn a
    refusal into a bare 500)."""
    try:
        value = wire.encode(event)
    except Exception as exc:
        publisher.drop_unencodable(topic, exc)
        return
    publisher.publish(topic, topics.partition_key(call.request_id), value, delivered)


@dataclass
class Announcement:
    """A call's request event, published once: when its request has left for the
    provider, or before its response event if the call ends first."""

    publisher: EventPublisher
    call: Call
    request_bytes: int
    max_tokens: int | None
    done: bool = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        event = self.call.request_event(
            request_bytes=self.request_bytes, max_tokens=self.max_tokens
        )
        publish(self.publisher, self.publisher.names.requests, self.call, event)


def cut_by(request: web.Request) -> Status:
    """Who ended a call mid-answer: the proxy, stopping, or the client."""
    return "proxy_stopped" if request.app[GRACE_OVER].is_set() else "client_disconnected"
