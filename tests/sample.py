"""Sample events for tests: one plain successful call, priced or not, with any field changed.

Each test module says what its calls have that matters to it (a team, a model, a
status, a cost) and takes the rest from here, so an event's shape is written once.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from llmtap.events import Cost, CostedEvent, ResponseEvent, Usage


def response(at: datetime | None = None, **fields: Any) -> ResponseEvent:
    """A non-streamed OpenAI chat call answered 200 that started and ended ``at`` (now
    by default); ``fields`` replace any of the event's fields (pydantic refuses a name
    the event does not have)."""
    at = at or datetime.now(UTC)
    plain: dict[str, Any] = {
        "request_id": uuid.uuid4(),
        "ts_start": at,
        "ts_end": at,
        "provider": "openai",
        "endpoint": "chat.completions",
        "model_requested": "gpt-4o",
        "stream": False,
        "status": "ok",
        "http_status": 200,
        "usage": Usage(input_tokens=10, output_tokens=5),
        "latency_ms": 12.5,
        "proxy_overhead_ms": 0.3,
    }
    return ResponseEvent(**(plain | fields))


def cost(
    input_usd: str | Decimal, output_usd: str | Decimal = "0", web_search: str | Decimal = "0"
) -> Cost:
    """A cost of its input and output parts (and a web search fee) only; the total is
    their sum."""
    spent_in, spent_out, zero = Decimal(input_usd), Decimal(output_usd), Decimal(0)
    return Cost(
        input=spent_in,
        cached_input=zero,
        cache_write=zero,
        output=spent_out,
        reasoning=zero,
        web_search=Decimal(web_search),
        total=spent_in + spent_out + Decimal(web_search),
    )


def costed(call: ResponseEvent, priced: Cost | None) -> CostedEvent:
    """``call`` as the stream's cost stage publishes it: unpriced when ``priced`` is None."""
    return CostedEvent(event_id=uuid.uuid4(), response=call, cost=priced, unpriced=priced is None)
