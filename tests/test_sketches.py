"""The latency sketch: accuracy against exact quantiles, merging, serialisation."""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable

import pytest

from stream.sketches import LatencySketch, Tally, bin_of

QS = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def exact_quantile(values: list[float], q: float) -> float:
    """The quantile DDSketch estimates: the sorted value at rank floor(q * (n - 1))."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def _uniform(rng: random.Random) -> float:
    return rng.uniform(1.0, 5_000.0)


def _lognormal(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(800.0), 1.0)


def _bimodal(rng: random.Random) -> float:
    # Fast cache hits and slow long generations.
    return rng.gauss(40.0, 5.0) if rng.random() < 0.7 else rng.lognormvariate(math.log(9000), 0.4)


DISTRIBUTIONS: dict[str, Callable[[random.Random], float]] = {
    "uniform": _uniform,
    "lognormal": _lognormal,
    "bimodal": _bimodal,
}


def sample(name: str, n: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    draw = DISTRIBUTIONS[name]
    return [max(0.0, draw(rng)) for _ in range(n)]


@pytest.mark.parametrize("accuracy", [0.01, 0.02])
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_quantiles_within_relative_accuracy(name: str, accuracy: float) -> None:
    values = sample(name, 20_000)
    sketch = LatencySketch.of(values, relative_accuracy=accuracy)
    assert sketch.count == len(values)
    for q in QS:
        got = sketch.quantile(q)
        want = exact_quantile(values, q)
        assert got is not None
        assert abs(got - want) <= accuracy * want + 1e-12, (name, q, got, want)


def test_quantiles_defaults_to_p50_p95_p99() -> None:
    values = sample("lognormal", 5_000)
    sketch = LatencySketch.of(values)
    p50, p95, p99 = sketch.quantiles()
    assert (p50, p95, p99) == sketch.quantiles(0.5, 0.95, 0.99)
    assert p50 is not None and p95 is not None and p99 is not None
    assert p50 < p95 < p99


def test_min_max_sum_and_extreme_quantiles_are_exact() -> None:
    values = [12.5, 80.0, 3.25, 400.0]
    sketch = LatencySketch.of(values)
    assert sketch.min == 3.25 and sketch.max == 400.0
    assert sketch.quantile(0) == 3.25 and sketch.quantile(1) == 400.0
    assert sketch.sum == sum(values)


def test_empty_sketch() -> None:
    sketch = LatencySketch()
    assert sketch.count == 0
    assert sketch.quantiles() == (None, None, None)
    assert sketch.min is None and sketch.max is None
    assert LatencySketch.from_dict(sketch.to_dict()) == sketch


def test_zero_durations_are_counted() -> None:
    sketch = LatencySketch.of([0.0, 0.0, 0.0, 10.0])
    assert sketch.count == 4
    assert sketch.quantile(0.5) == 0.0
    restored = LatencySketch.from_dict(sketch.to_dict())
    assert restored.to_dict()["zero_count"] == 3
    assert restored.quantiles(0.5, 1.0) == (0.0, 10.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_refuses_what_is_not_a_duration(bad: float) -> None:
    with pytest.raises(ValueError):
        LatencySketch().add(bad)


def test_merge_equals_one_sketch_of_everything() -> None:
    values = sample("bimodal", 9_000, seed=11)
    whole = LatencySketch.of(values)
    # Three "partitions", merged in an order unrelated to the values, plus an empty one.
    parts = [LatencySketch.of(values[i::3]) for i in range(3)]
    merged = LatencySketch()
    for part in (parts[2], LatencySketch(), parts[0], parts[1]):
        merged.merge(part)
    a, b = merged.to_dict(), whole.to_dict()
    assert a["sum"] == pytest.approx(b["sum"], rel=1e-12)
    a.pop("sum"), b.pop("sum")
    assert a == b  # the same bins: every quantile is identical
    for q in QS:
        assert merged.quantile(q) == whole.quantile(q)
    # The merged-in sketches are left unchanged.
    assert parts[0].count == len(values[0::3])


def test_merge_refuses_a_different_accuracy() -> None:
    with pytest.raises(ValueError, match="accuracy"):
        LatencySketch(0.01).merge(LatencySketch.of([1.0], relative_accuracy=0.02))


def test_round_trip_through_json_is_exact() -> None:
    sketch = LatencySketch.of([*sample("lognormal", 3_000, seed=3), 0.0])
    data = json.loads(json.dumps(sketch.to_dict()))
    restored = LatencySketch.from_dict(data)
    assert restored == sketch
    assert restored.to_dict() == sketch.to_dict()
    for q in QS:
        assert restored.quantile(q) == sketch.quantile(q)
    assert (restored.count, restored.sum, restored.min, restored.max) == (
        sketch.count,
        sketch.sum,
        sketch.min,
        sketch.max,
    )
    # A restored sketch keeps working: adding and merging after the round trip.
    more = sample("uniform", 500, seed=5)
    restored.add(more[0])
    sketch.add(more[0])
    restored.merge(LatencySketch.of(more[1:]))
    sketch.merge(LatencySketch.of(more[1:]))
    assert restored.quantiles() == sketch.quantiles()


def test_serialised_form_is_small_and_documented() -> None:
    sketch = LatencySketch.of([100.0, 100.0, 250.0])
    data = sketch.to_dict()
    assert set(data) == {
        "v",
        "relative_accuracy",
        "zero_count",
        "keys",
        "counts",
        "count",
        "sum",
        "min",
        "max",
    }
    assert data["counts"] == [2, 1] and len(data["keys"]) == 2
    assert data["keys"] == sorted(data["keys"])


def test_from_dict_refuses_inconsistent_data() -> None:
    data = LatencySketch.of([1.0, 2.0]).to_dict()
    with pytest.raises(ValueError):
        LatencySketch.from_dict({**data, "count": 5})
    with pytest.raises(ValueError):
        LatencySketch.from_dict({**data, "v": 99})
    with pytest.raises(ValueError):
        LatencySketch.from_dict({**data, "counts": [1]})


def test_from_dict_refuses_keys_no_float_holds_or_too_far_apart() -> None:
    """Read from a message: a key past what a float holds made every quantile
    overflow, and keys far apart had the read allocate a list spanning them."""
    data = LatencySketch.of([1.0, 2.0]).to_dict()
    with pytest.raises(ValueError, match="finite"):
        LatencySketch.from_dict({**data, "keys": [1, 1_000_000]})
    with pytest.raises(ValueError, match="finite"):
        LatencySketch.from_dict({**data, "keys": [-1_000_000, 1]})
    with pytest.raises(ValueError, match="apart"):
        LatencySketch.from_dict({**data, "relative_accuracy": 1e-7, "keys": [0, 10**9]})


def test_the_largest_durations_count_in_the_top_bin_and_are_read_back() -> None:
    """A duration past the largest the mapping maps is counted in its top bin, by a
    sketch and by bin_of alike, and its sketch reads back: sum, min and max exact."""
    largest = sys.float_info.max
    sketch = LatencySketch.of([1.0, largest])
    back = LatencySketch.from_dict(json.loads(json.dumps(sketch.to_dict())))
    assert back == sketch and back.max == largest and back.quantiles(1.0) == (largest,)
    assert sketch.to_dict()["keys"][-1] == bin_of(largest)
    tally = Tally()
    for value in (1.0, largest):
        tally.add(value, bin_of(value))
    assert tally.to_dict() == sketch.to_dict()


def test_a_tally_is_the_sketch_of_the_same_values() -> None:
    """The windows count durations into bins (Tally) and publish the sketch's dict:
    it must be the very dict the sketch of the same values gives, merges included."""
    values = [*sample("lognormal", 4_000, seed=5), 0.0, 0.0, 1e-320, 3.5]
    parts = [Tally() for _ in range(3)]
    for i, value in enumerate(values):
        parts[i % 3].add(value, bin_of(value))
    whole = Tally()
    for part in parts:
        whole.merge(part)
    ordered = LatencySketch.of(values[0::3])
    ordered.merge(LatencySketch.of(values[1::3]))
    ordered.merge(LatencySketch.of(values[2::3]))
    assert parts[0].to_dict() == LatencySketch.of(values[0::3]).to_dict()
    assert whole.to_dict() == ordered.to_dict()
    assert Tally.from_dict(whole.to_dict()).to_dict() == whole.to_dict()
    assert Tally().to_dict() == LatencySketch().to_dict()
    with pytest.raises(ValueError):
        bin_of(-1.0)
    with pytest.raises(ValueError):
        Tally.from_dict(LatencySketch.of([1.0], relative_accuracy=0.02).to_dict())
