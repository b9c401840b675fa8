"""What llmtap calls its topics, consumer groups and clients in Kafka.

Every name starts with the deployment's namespace (setting ``kafka_namespace``,
``llmtap`` by default), so two deployments (staging and production, two regions) can
share one Kafka cluster without reading each other's events, and a cluster's ACLs can
grant a deployment everything under its prefix:

| name                          | what                                              |
|-------------------------------|---------------------------------------------------|
| ``<ns>.requests`` ...         | the topics (llmtap/topics.py has the table)       |
| ``<ns>-stream``, ``-spikes``  | the worker's consumer groups (cost, spikes stage) |
| ``<ns>-sink``, ``-webhooks``  | the store's consumer groups (writer, alerts)      |
| ``<ns>-worker``               | the worker's Faust app id                         |
| ``<ns>-<client>``             | each client's ``client.id`` (Kafka.client_options) |

The default namespace gives the names llmtap has always used: upgrading keeps every
topic and committed offset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Kafka allows [a-zA-Z0-9._-] in topic names, up to 249 characters; the longest
# suffix here is ".reservations" (13).
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


@dataclass(frozen=True)
class Names:
    namespace: str = "llmtap"
    requests: str = field(init=False)
    responses: str = field(init=False)
    costed: str = field(init=False)
    windows: str = field(init=False)  # closed windows, keyed by series (size|dimension|value)
    alerts: str = field(init=False)
    budgets: str = field(init=False)  # compacted: the latest state of each budget
    reservations: str = field(init=False)  # compacted: what each ingress holds
    # Compacted: where the stream's counting of each partition of the responses topic
    # stands (its partition p holds responses partition p's; stream/checkpoints.py).
    checkpoints: str = field(init=False)
    stream_group: str = field(init=False)  # the worker's cost stage, on responses
    spikes_group: str = field(init=False)  # the worker's spikes stage, on windows
    sink_group: str = field(init=False)  # the store's writer, on costed and windows
    webhook_group: str = field(init=False)  # the store's alert delivery, on alerts
    worker_app: str = field(init=False)  # the worker's Faust app id (it joins no group)

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ValueError(
                "must be 1 to 200 letters, digits, '.', '_' or '-' (a Kafka topic name's)"
            )
        ns = self.namespace
        names = {
            **{topic: f"{ns}.{topic}" for topic in TOPICS},
            "stream_group": f"{ns}-stream",
            "spikes_group": f"{ns}-spikes",
            "sink_group": f"{ns}-sink",
            "webhook_group": f"{ns}-webhooks",
            "worker_app": f"{ns}-worker",
        }
        for name, value in names.items():
            object.__setattr__(self, name, value)

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(getattr(self, topic) for topic in TOPICS)

    @property
    def compacted(self) -> frozenset[str]:
        return frozenset({self.budgets, self.reservations, self.checkpoints})

    def current(self, topic: str) -> str:
        """This namespace's topic of ``topic``'s kind (``old.responses`` ->
        ``<namespace>.responses``); a topic of no kind of llmtap's is left as it is."""
        of_kind = kind(topic)
        return getattr(self, of_kind) if of_kind in TOPICS else topic

    def client_id(self, client: str) -> str:
        """The ``client.id`` a client of this deployment gives the brokers: what their
        logs, metrics and quotas know it by."""
        return f"{self.namespace}-{client}"


def kind(topic: str) -> str:
    """Which of llmtap's topics ``topic`` is (``windows``, ``costed``...), whatever the
    namespace: a topic is named ``<namespace>.<kind>``, and no kind holds a dot."""
    return topic.rpartition(".")[2]


TOPICS = (
    "requests",
    "responses",
    "costed",
    "windows",
    "alerts",
    "budgets",
    "reservations",
    "checkpoints",
)
