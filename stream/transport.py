"""Faust's Kafka transport with a short fetch wait.

Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500``, fixed. A Kafka
broker answers a fetch as soon as ``fetch_min_bytes`` (1) are there, so the wait only
bounds an idle poll; the embedded Tansu broker answers a fetch only when the wait is
over, so every hop through it cost up to 1.5 s (measured: a median of 440 ms per message
at 1500, 2 ms at 50). The worker's consumer gets :data:`llmtap.topics.FETCH_MAX_WAIT_MS`
instead, like every other llmtap consumer. Nothing else changes.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver

from llmtap import topics


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by the fetcher that start() creates; the constructor took Faust's 1500.
        consumer._fetch_max_wait_ms = topics.FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(driver.Transport):
    Consumer = _Consumer


class StreamApp(faust.App):
    """A Faust app whose consumer waits at most FETCH_MAX_WAIT_MS per fetch."""

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)
