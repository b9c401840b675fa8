"""`llmtap alerts redeliver`: deliveries given up made due again, in the store process.

The CLI asks the running store process (POST /api/v1/webhooks/{endpoint}/redeliver, an
admin key's: sinks/app.py), which owns the store and the endpoint's worker. For each of
the endpoint's deliveries whose latest sending ended ``dead_lettered``, ``gone`` or
``refused`` (optionally of some alerts only, given up since a time), a ``pending`` row
of the next ``redelivery`` is recorded: the delivery is unfinished again, its attempts
counting from 0, and the endpoint's worker resumes it as it resumes any (in order, by the
owner of its alert's partition), with the same ``webhook-id``, the alert id. The
endpoint is enabled again if a 410 disabled it (gone.py).

Run twice at once, or while the worker works, a delivery is still sent once: the
worker sends what ClickHouse holds as unfinished, one delivery per alert, and here
requests are taken one at a time, so a second finds the first's rows pending, not
given up, and makes nothing due again.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from llmtap.events import utcnow
from sinks.webhooks.dispatcher import WebhookDispatcher
from sinks.webhooks.records import Attempt, Outcome, record
from sql.params import BadParameter
from sql.store import Store, render

# Refused too: the guard's answer changes with the configuration (webhook_allow_private)
# and with what a name resolves to, a template's with the configuration; a refused
# delivery had no other way to be sent.
GIVEN_UP: tuple[Outcome, ...] = ("dead_lettered", "gone", "refused")
NOTE = "redelivery requested"  # the error column of the pending row it records


class Request(BaseModel):
    """The route's JSON body: which of the endpoint's given-up deliveries (none: all)."""

    model_config = ConfigDict(extra="forbid")

    alert_ids: list[uuid.UUID] = []
    since: AwareDatetime | None = None  # given up at or after this


@dataclass(frozen=True)
class Selection:
    endpoint: str
    alert_ids: tuple[uuid.UUID, ...] = ()
    since: datetime | None = None


def parse(endpoint: str, body: bytes) -> Selection:
    """The selection a request asks for; :class:`BadParameter` naming what is wrong."""
    try:
        asked = Request.model_validate_json(body or b"{}")
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or "body"
        raise BadParameter(param, f"{param}: {error['msg']}") from None
    return Selection(endpoint, tuple(asked.alert_ids), asked.since)


def requeue(store: Store, selection: Selection) -> list[Attempt]:
    """Record a ``pending`` row of the next redelivery for each delivery selected."""
    sql = render(
        "webhook_given_up", alert_ids=bool(selection.alert_ids), since=bool(selection.since)
    )
    values: dict[str, object] = {"endpoint": selection.endpoint, "given_up": list(GIVEN_UP)}
    if selection.alert_ids:
        values["alert_ids"] = list(selection.alert_ids)
    if selection.since:
        values["since"] = selection.since
    now = utcnow()
    rows = [
        Attempt(
            r["alert_id"],
            selection.endpoint,
            0,
            now,
            None,
            NOTE,
            "pending",
            int(r["alert_partition"]),
            redelivery=int(r["next_redelivery"]),
        )
        for r in store.rows(sql, values)
    ]
    record(store, rows)
    return rows


class UnknownEndpoint(BadParameter):
    status = 404


async def redeliver(store: Store, dispatcher: WebhookDispatcher, selection: Selection) -> int:
    """Make the selected deliveries due again and enable their endpoint; how many."""
    worker = dispatcher.workers.get(selection.endpoint)
    if worker is None:
        known = ", ".join(dispatcher.workers) or "none configured"
        raise UnknownEndpoint(
            "endpoint", f"no webhook endpoint named {selection.endpoint!r} (endpoints: {known})"
        )
    async with dispatcher.redelivering:  # one at a time
        await worker.enable()  # a 410 or close-out being recorded is first: it is found
        rows = await asyncio.to_thread(requeue, store, selection)
    worker.redelivered()  # resumed by the worker, if its partitions hold them
    return len(rows)
