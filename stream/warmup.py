"""Spike baselines that survive a worker restart.

The spikes stage learns each series' baseline from its recent closed windows and keeps
it in memory. A restarted worker would start blind: nothing judged until
``min_history`` windows of each series come by again (hours, for hourly windows), and
a cooldown forgotten. So before the worker starts, its detector is fed the windows the
spikes group has already consumed from the windows topic (below its committed offsets:
judged, their alerts published), back as far as any rule looks (its history, its
cooldown, and its days of hour-of-day profile). Alerts those windows raise again are
dropped: they were published when the windows were judged. Windows past the committed
offsets are left to the stage, which judges them and publishes their alerts.

What it cannot bring back: windows the broker no longer has (Kafka's retention; the
embedded broker keeps nothing over its own restart), and so nothing after a full
`llmtap up` restart on embedded defaults. Which spikes the receivers were told are
firing is read back too, from the alerts topic (where the store, at its start,
publishes again those ClickHouse holds open), and squared with the states rebuilt
(stream/reconcile.py): a spike fired before what is read back, or whose rule changed,
is resolved rather than left open for good. With several workers, each reads every
partition's windows, so it also knows series another worker judges (harmless: a
window it is not given is never judged twice, and a series of a partition it is not
given is not its to resolve).
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import msgspec
from aiokafka.errors import KafkaError

from llmtap import topics, wire
from llmtap.config import Settings
from llmtap.events import Alert, utcnow
from stream.detector import TICK_S, Detector
from stream.reconcile import open_alerts, reconciled
from stream.spikes import horizon

log = logging.getLogger(__name__)


def spike_settle(settings: Settings) -> timedelta:
    """How long a window's shares from several workers get to arrive: the windows'
    grace, plus a few of the spikes stage's ticks."""
    return timedelta(seconds=settings.window_grace_s + 3 * TICK_S)


def warmed(
    detector: Detector,
    windows: Iterable[tuple[int, bytes] | tuple[int, bytes, datetime]],
    now: datetime,
) -> int:
    """Feed a detector windows already judged (each with its partition, and when it was
    published if known), dropping the alerts they raise again; return how many it took.

    Replayed by their publish times: a window whose other shares came only after its
    settle was judged live on the shares it had (the later ones judged nothing), and
    is judged so again, not whole: judged whole, it fired here unseen (its alert dropped
    as raised before, which it never was), and the restarted worker took the series for
    firing (its next spike raised nothing). Windows still waiting at the end wait
    ``settle`` from ``now``."""
    taken = 0
    waiting: dict[int, deque[tuple[datetime, str]]] = defaultdict(deque)  # by partition
    for home, raw, *published in windows:
        try:
            window = wire.decode_window(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # the stage logged it when it skipped it
        at = published[0] if published else now
        queue = waiting[home]
        while queue and queue[0][0] + detector.settle <= at:
            detector.settled(queue.popleft()[1], at)
        try:
            detector.offer(window, at, home)
        except (ValueError, TypeError, ArithmeticError):
            continue  # the stage logged it when it skipped it (agents/spikes.py)
        queue.append((at, window.series))
        taken += 1
    detector.wait_from(now)
    return taken


async def warmed_detector(
    settings: Settings, partitions: set[int] | None = None, shares: int | None = None
) -> Detector:
    """A detector that knows the windows the spikes group has already judged: of every
    partition at start (and then its own to judge only once it judges them), or of
    ``partitions``, just given to this worker at a rebalance (its own from now).

    A window is whole with a share from each partition of the responses topic:
    ``shares`` of them, or as many as the broker says it has. Not the configured count,
    which a topic made earlier or grown differs from: with fewer partitions, no window
    read back was ever whole, and each was judged again as new once settled, its alerts
    raised again."""
    now = utcnow()
    since = now - horizon(settings.spike_rules)
    try:
        if shares is None:
            names = settings.kafka.names
            shares = await topics.partition_count(settings.kafka, names.responses)
    except KafkaError as exc:
        log.warning("the responses topic's partitions could not be counted (%r)", exc)
    detector = Detector(
        settings.spike_rules, shares or settings.topic_partitions, spike_settle(settings)
    )
    try:
        judged = (
            await topics.read_consumed(
                settings.kafka,
                settings.kafka.names.spikes_group,
                settings.kafka.names.windows,
                since_ms=int(since.timestamp() * 1000),
                partitions=partitions,
            )
            if settings.spike_rules
            else []  # none to judge: only the alerts of rules removed to resolve
        )
    except KafkaError as exc:  # the worker still starts; its baselines start empty
        log.warning("windows judged before could not be read back (%r)", exc)
        return detector
    published = [(home, raw, datetime.fromtimestamp(ms / 1000, UTC)) for home, raw, ms in judged]
    taken = warmed(detector, published, now)
    if partitions is None:
        await _reconcile(settings, detector, since)
        # Some may be another worker's: the first assignment says which are this one's
        # (Detector.keep_only), and until their backlog is read none is found quiet.
        detector.behind = None
    # A window read back still waiting for shares stays pending, its missing shares to
    # come (past the committed offsets): judged on the committed ones alone, a spike
    # split across a restart or a rebalance would never be raised.
    log.info("spike baselines warmed with %d windows judged before", taken)
    return detector


async def _reconcile(settings: Settings, detector: Detector, since: datetime) -> None:
    """Square the states rebuilt with the spike alerts open (stream/reconcile.py): read
    after the windows, so an alert of every window read back is there (the stage commits
    a window only once the broker has its alerts). The resolves it raises are the
    stage's to publish as it starts (:attr:`Detector.restart_alerts`)."""
    try:
        raw = await topics.read_all(settings.kafka, settings.kafka.names.alerts)
    except KafkaError as exc:  # nothing squared: as before, rather than not starting
        log.warning("the spike alerts open could not be read back (%r)", exc)
        return
    alerts = []
    for value in raw:
        try:
            alerts.append(Alert.model_validate_json(value))
        except ValueError:
            continue  # the store logs what it cannot take (sinks/webhooks)
    opened = open_alerts(alerts)
    changed, resolves = reconciled(settings.spike_rules, detector.states, opened, since)
    unfired = [key for key, state in changed.items() if detector.states[key].firing > state.firing]
    detector.states.update(changed)
    detector.restart_alerts = resolves
    log.info(
        "spike alerts open at start: %d; resolved as no longer judged: %d; series no "
        "longer taken for firing (no alert said so): %d",
        len(opened),
        len(resolves),
        len(unfired),
    )
