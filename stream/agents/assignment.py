"""How the cost stage's group shares ``llmtap.responses`` when budgets are configured:
every partition to one worker, the others standing by.

A budget's state is its whole spend, published as one message (stream/ledger.py): a
worker counting a share of the calls would publish its share as the whole. So with
budgets, one member of the group holds every partition, and a member joining later
stands by until the holder leaves or dies; then the group gives everything to one of
those left, which first takes up the budget states the holder published
(stream/agents/budgets.py). The cost stage's throughput is then one worker's; the spikes
stage, in its own group, still spreads over all of them.

The holder is sticky: each member says in its join metadata whether it holds the
partitions, and the group's leader keeps them with it, so a worker joining, or leaving
while standing by, moves nothing. A member that lost its membership while it lived (a
network cut, a paused process) may come back still saying so, beside the one given the
partitions meanwhile: either may get them, and the budgets step takes up what the
other counted (stream/agents/budgets.py). Members offer no other assignment: a worker
offering Kafka's round robin (one without budgets, or of an earlier llmtap, mid-upgrade)
is refused by the group at once ("inconsistent group protocol") rather than counting a
share of the calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

HOLDING = b"holding"
STANDING_BY = b""


class OneHolder(AbstractPartitionAssignor):  # type: ignore[misc]
    """Every partition of the group's topics to one member: the one that held them, if
    any, else the first by member id. aiokafka calls an assignor's class methods, so
    each consumer takes a class of its own (:func:`one_holder`) to remember, in
    ``holding``, whether it holds them."""

    name = "llmtap-one-holder"
    version = 0
    holding: ClassVar[bool] = False

    @classmethod
    def assign(
        cls,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        holders = sorted(m for m, meta in members.items() if meta.user_data == HOLDING)
        holder = holders[0] if holders else min(members)
        topics = sorted({topic for meta in members.values() for topic in meta.subscription})
        every = [(topic, sorted(cluster.partitions_for_topic(topic) or ())) for topic in topics]
        return {
            member: ConsumerProtocolMemberAssignment(
                cls.version, every if member == holder else [], b""
            )
            for member in members
        }

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            cls.version, list(topics), HOLDING if cls.holding else STANDING_BY
        )

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        cls.holding = bool(assignment.partitions())


def one_holder() -> type[OneHolder]:
    """A :class:`OneHolder` for one consumer, holding nothing yet."""
    return type("OneHolder", (OneHolder,), {"holding": False})
