"""The worker's Faust app runs no Kafka consumer.

The worker's stages read their topics with consumers of their own
(stream/agents/stage.py): Faust's per-event stream costs ~70 µs an event before any
work is done (bench/stream_floor.py). So the app runs only its producer and its timers
(the budgets step's). Faust's consumer is not started at all: with no topic to
subscribe to, it refuses to start.
"""

from __future__ import annotations

import faust
from faust.app.base import BootStrategy


class _ProducerAndTimers(BootStrategy):
    enable_kafka_consumer = False


class StreamApp(faust.App):
    """A Faust app without a consumer."""

    BootStrategy = _ProducerAndTimers
