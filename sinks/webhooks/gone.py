"""An endpoint whose receiver answered 410 Gone: disabled, its deliveries closed out.

Standard Webhooks reads a 410 as the receiver asking to be sent nothing more. The
delivery that got it is recorded ``gone`` (deliver.py); its worker then sends nothing
more to the endpoint: every delivery it holds or is given (queued, resumed from
ClickHouse, or new) is recorded ``gone`` too, unsent, saying why. That lasts until the
store process restarts or `llmtap alerts redeliver` names the endpoint (redeliver.py),
which enables it again and makes those deliveries due again.

With several store processes (each sends its own partitions' deliveries), a worker
reads the endpoint's latest 410 from ClickHouse before each delivery
(``webhook_gone``): one recorded, by any process, since this worker started or was
last enabled disables it the same way, so that delivery is recorded ``gone`` unsent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from llmtap.events import utcnow
from sinks.webhooks.records import Attempt, Job

log = logging.getLogger(__name__)


def disabled(endpoint: str, alert_id: uuid.UUID) -> str:
    """Why ``endpoint`` sends nothing more (kept in each closed-out row); said once, as
    an ERROR, when it is disabled."""
    why = f"endpoint {endpoint} disabled: its receiver answered 410 Gone to alert {alert_id}"
    log.error(
        "webhook %s: %s; nothing more is sent to it until the store process restarts "
        "or `llmtap alerts redeliver --endpoint %s` runs",
        endpoint,
        why,
        endpoint,
    )
    return why


def closed_out(endpoint: str, why: str, jobs: Iterable[Job]) -> list[Attempt]:
    """A final ``gone`` row for each delivery a disabled endpoint holds: nothing sent."""
    now = utcnow()
    return [
        Attempt(
            job.alert.event_id,
            endpoint,
            job.attempts,
            now,
            None,
            f"not sent: {why}",
            "gone",
            job.partition,
            redelivery=job.redelivery,
        )
        for job in jobs
    ]
