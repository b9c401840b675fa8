"""Heartbeats of a consumer group member while its assignment callback runs.

aiokafka (0.14) stops a member's heartbeats for a whole join and starts them again only
once the assignment callback returned, so a callback longer than the session (a stream
stage reading an hour of windows back, the store's writer repeating inserts a crash cut
short) got the member expelled as it finished: its partitions went to another member
while it went on as their owner. Kafka's Java client heartbeats during its callbacks;
here the heartbeat task is started early, as it would be right after the callback
(aiokafka has no public switch for it: without that method a callback is as before,
and that is logged).
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer

log = logging.getLogger(__name__)


def heartbeat_meanwhile(consumer: AIOKafkaConsumer | None, group: str) -> None:
    """Keep ``consumer``'s heartbeats going from now on, in its assignment callback."""
    coordinator = getattr(consumer, "_coordinator", None)
    start = getattr(coordinator, "_start_heartbeat_task", None)
    if start is None:
        log.warning(
            "%s: no heartbeats in the assignment callback (this aiokafka has no "
            "_start_heartbeat_task): one longer than the session gets the member expelled "
            "from its group",
            group,
        )
        return
    start()
