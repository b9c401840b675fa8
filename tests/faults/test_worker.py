"""The stream worker killed (SIGKILL) mid-load and started again: no call, spend or
alert counted twice or lost.

The worker is killed while calls go on; whatever it had read and not yet committed is
read again by the new worker. Costed events get the same id every time they are
computed (``derived_id``), so the ClickHouse writer drops the second copy; budget
spend is kept by the budgets step (stream/ledger.py), seeded at start from the
budgets topic, which already counts what the old worker had processed: it must not
count that again. The worker is killed twice: mid-load, and again just after its
restart, once it is seen counting the backlog (a worker that has just started has
counted and published more than it has committed).

One scenario, run once for this module; the tests below each check one part of it.

Windows (5 s, rolled up into a minute) are counted once too: the calls of the windows
open when the worker dies are read again by its successor from the partition's
checkpoint, and the minutes open then are made again from their published 5-second
windows (stream/checkpoints.py).

What this cannot show: a kill at a chosen instant relative to the stage's offset
commits (every second): the kill lands wherever the load is, which in practice always
leaves some events read but not committed and some windows open.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from llmtap import topics
from llmtap.events import BudgetState, CostedEvent
from llmtap.kafka import Kafka
from llmtap.names import Names
from stream.checkpoints import Checkpoint
from tests.faults.conftest import Upstream, faulty_upstream
from tests.faults.harness import Cluster, until
from tests.faults.load import Load, Sent, compare

pytestmark = pytest.mark.faults

FEATURE = "worker-kill"
WARM_UP = 30  # calls made, and counted by the budgets step, before the load below
DOWN_CALLS = 40  # calls answered before the kill, while the worker is down, and after
# What each kind of call costs at the fake provider's usage, from stream/pricing.yaml:
# gpt-4o-mini: 8 input at $0.15, 4 cached at $0.075, 5 output at $0.60 per million;
# claude-3-5-haiku: 12 input at $0.80, 4 cache reads at $0.08, 3 cache writes at $1.00,
# 5 output at $4.00 per million.
COST = {
    "openai": Decimal("0.0000045"),
    "openai-stream": Decimal("0.0000045"),
    "anthropic": Decimal("0.00003292"),
}
LIMIT = Decimal("0.01")
THRESHOLDS = tuple(range(5, 101, 5))
BUDGET = {
    "name": FEATURE,
    "scope": "feature",
    "value": FEATURE,
    "period": "month",
    "limit_usd": str(LIMIT),
    "thresholds": list(THRESHOLDS),
    "hard_cap": False,  # spend is what is measured here, not refusals
}
WINDOWS = {"LLMTAP_WINDOW_SIZES_S": "[5, 60]", "LLMTAP_WINDOW_GRACE_S": "2"}


@dataclass
class Outcome:
    sent: list[Sent]
    failures: list[str]
    stored: dict[str, dict[str, Any]]
    cost_by_kind: dict[str, set[Decimal]]
    budget: BudgetState | None
    alerts: list[dict[str, Any]]
    costed_copies: Counter[str] = field(default_factory=Counter)
    dead: list[str] = field(default_factory=list)
    windows: dict[int, dict[str, int]] = field(default_factory=dict)  # by length
    checkpoints: list[Checkpoint] = field(default_factory=list)


async def run_scenario(root: Path, upstream: Upstream) -> Outcome:
    cluster = Cluster(root, upstream.root_url, {"LLMTAP_BUDGETS": json.dumps([BUDGET]), **WINDOWS})
    load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
    try:
        await cluster.start_all()
        await load.run(WARM_UP)  # the budgets step is seen counting before the kill
        warm = spent(load.sent)
        await until(
            lambda: _budget_reached(cluster, warm),
            "the budget counting the warm-up calls",
            60,
            every=0.5,
        )
        # Paced load (~20 calls/s: the worker keeps up), the worker killed mid-load.
        await paced(load, DOWN_CALLS)
        killing = asyncio.create_task(paced(load, DOWN_CALLS))
        await until(lambda: _answered(load, WARM_UP + DOWN_CALLS + 5), "calls under load", 60)
        await cluster.kill("worker")
        await killing
        await paced(load, DOWN_CALLS)  # with the worker down
        before = await budget_states(cluster)
        await cluster.start("worker")
        # Killed again as soon as the new worker is seen counting the backlog the first
        # kill left: a worker just started has counted, published and not committed.
        await until(
            lambda: _budget_reached(cluster, before[-1].spent_usd + COST["anthropic"]),
            "the restarted worker counting",
            60,
            every=0.1,
        )
        await cluster.kill("worker")
        await cluster.start("worker")
        await paced(load, DOWN_CALLS)  # and after
        await cluster.quiet(90)
        total = spent(load.sent)
        await until(lambda: _budget_reached(cluster, total), "the budget counting every call", 60)
        await until(lambda: _budget_settled(cluster), "the budget state settled", 30)
        await cluster.quiet()  # the alerts it raised are stored
        stored = await cluster.calls_by_request(FEATURE)
        kinds = {s.request_id: s.kind for s in load.sent}
        cost_by_kind: dict[str, set[Decimal]] = {}
        for request_id, row in stored.items():
            cost_by_kind.setdefault(kinds.get(request_id, "?"), set()).add(Decimal(row["cost"]))
        mine = await budget_states(cluster)
        alerts = await cluster.sql(
            "SELECT toString(event_id) AS id, count() AS copies, "
            "toUInt8(any(threshold)) AS threshold FROM alerts "
            f"WHERE rule = '{FEATURE}' GROUP BY id"
        )
        # The last minute closes on the wall clock, up to a minute after the last call.
        windows = await until_windows(cluster, len(load.sent))
        copies = Counter(
            str(CostedEvent.model_validate_json(raw).event_id)
            for raw in await topics.read_all(Kafka(cluster.bootstrap), Names().costed)
        )
        return Outcome(
            sent=load.sent,
            failures=load.failures,
            stored=stored,
            cost_by_kind=cost_by_kind,
            budget=mine[-1] if mine else None,
            alerts=alerts,
            costed_copies=copies,
            dead=cluster.dead(),
            windows=windows,
            checkpoints=[
                Checkpoint.model_validate_json(raw)
                for raw in await topics.read_all(Kafka(cluster.bootstrap), Names().checkpoints)
            ],
        )
    except BaseException:
        print(cluster.tails(25))
        raise
    finally:
        await load.close()
        await cluster.close()


async def windows_by_length(cluster: Cluster) -> dict[int, dict[str, int]]:
    rows = await cluster.sql(
        "SELECT size_s, sum(requests) AS requests, sum(late_events) AS late, "
        "count() AS stored, uniqExact(event_id) AS distinct "
        f"FROM windows WHERE dimension = 'feature' AND value = '{FEATURE}' GROUP BY size_s"
    )
    return {
        int(row["size_s"]): {k: int(row[k]) for k in ("requests", "late", "stored", "distinct")}
        for row in rows
    }


async def until_windows(cluster: Cluster, calls: int) -> dict[int, dict[str, int]]:
    found: dict[int, dict[str, int]] = {}

    async def counted() -> bool:
        found.update(await windows_by_length(cluster))
        return len(found) == 2 and all(w["requests"] + w["late"] >= calls for w in found.values())

    await until(counted, "every call in the windows", 120, every=1.0, context=lambda: str(found))
    return found


async def budget_states(cluster: Cluster) -> list[BudgetState]:
    """The budget's states on the budgets topic, oldest first."""
    raws = await topics.read_all(Kafka(cluster.bootstrap), Names().budgets, idle_ms=300)
    states = [BudgetState.model_validate_json(raw) for raw in raws]
    return [s for s in states if s.budget == FEATURE]


async def _budget_reached(cluster: Cluster, spent: Decimal) -> bool:
    states = await budget_states(cluster)
    return bool(states) and states[-1].spent_usd >= spent


async def _budget_settled(cluster: Cluster) -> bool:
    """The budget's latest state is the same in two reads a moment apart."""
    first = await budget_states(cluster)
    await asyncio.sleep(1.0)
    return first[-1:] == (await budget_states(cluster))[-1:]


async def paced(load: Load, calls: int) -> None:
    """``calls`` calls on two lanes, 0.1 s apart on each (~20 calls/s here)."""
    stop = asyncio.Event()
    answered = len(load.sent) + len(load.failures)
    driving = asyncio.create_task(load.run_until(stop, lanes=2, pause_s=0.1))
    await until(lambda: _answered(load, answered + calls), f"{calls} paced calls", 60)
    stop.set()
    await driving


async def _answered(load: Load, count: int) -> bool:
    return len(load.sent) + len(load.failures) >= count


@pytest.fixture(scope="module")
async def outcome(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outcome]:
    async with faulty_upstream() as upstream:
        yield await run_scenario(tmp_path_factory.mktemp("worker-kill"), upstream)


def spent(sent: list[Sent]) -> Decimal:
    """What the calls the clients made cost, by the rates above."""
    return sum((COST[s.kind] for s in sent), Decimal(0))


def test_every_call_is_in_clickhouse_once_with_its_cost(outcome: Outcome) -> None:
    assert outcome.failures == []
    assert len(outcome.sent) >= WARM_UP + 2 * DOWN_CALLS
    assert compare(outcome.sent, outcome.stored) == []
    assert outcome.cost_by_kind == {kind: {cost} for kind, cost in COST.items()}
    assert sum(Decimal(row["cost"]) for row in outcome.stored.values()) == spent(outcome.sent)
    assert outcome.dead == []


def test_the_killed_worker_left_work_that_was_done_again(outcome: Outcome) -> None:
    """The premise of the budget test: the new worker re-read responses the old one had
    already priced (the same costed event id is on the topic twice)."""
    replayed = [event_id for event_id, n in outcome.costed_copies.items() if n > 1]
    assert replayed, "no costed event was produced twice: the kill proved nothing"


def test_each_budget_alert_is_stored_once_and_none_is_lost(outcome: Outcome) -> None:
    assert [a for a in outcome.alerts if a["copies"] != 1] == []
    total = spent(outcome.sent)
    crossed = {t for t in THRESHOLDS if total * 100 >= LIMIT * t}
    assert crossed  # the load spends enough to cross some
    assert {a["threshold"] for a in outcome.alerts} >= crossed


def test_budget_spend_loses_nothing(outcome: Outcome) -> None:
    assert outcome.budget is not None
    assert outcome.budget.spent_usd >= spent(outcome.sent)


def test_budget_spend_counts_each_call_once(outcome: Outcome) -> None:
    """Each budget state carries the positions it counted up to, and a restarted worker
    skips what its seed state counted (stream/ledger.py)."""
    total = spent(outcome.sent)
    assert outcome.budget is not None
    assert outcome.budget.spent_usd == total
    crossed = {t for t in THRESHOLDS if total * 100 >= LIMIT * t}
    assert {a["threshold"] for a in outcome.alerts} == crossed  # none crossed too early


def test_every_call_is_counted_once_in_the_windows(outcome: Outcome) -> None:
    assert sorted(outcome.windows) == [5, 60]
    for size, counted in outcome.windows.items():
        assert (counted["requests"], counted["late"]) == (len(outcome.sent), 0), size
        assert counted["stored"] == counted["distinct"], size  # no window stored twice


def test_the_killed_worker_had_windows_open_and_its_successor_took_them_over(
    outcome: Outcome,
) -> None:
    """The premise of the windows test: more than one worker wrote checkpoints (the
    second may be killed before its first), and some checkpoint held calls behind its
    committed offset (windows open)."""
    assert len({c.writer for c in outcome.checkpoints}) >= 2
    assert any(c.hold < c.done for c in outcome.checkpoints)
