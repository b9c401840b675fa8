"""Latency and time-to-first-token distributions: a mergeable quantile sketch.

A thin wrapper over DataDog's DDSketch (PyPI ``ddsketch``). A DDSketch answers every
quantile with a *relative* error bound: with ``relative_accuracy=0.01`` the p99 it
reports is within 1% of the true p99, whatever the distribution. It is also exactly
mergeable: merging the sketches of two windows (or two partitions) gives the very
sketch that adding every value to one would have given, so per-partition minute
sketches roll up into hours, or across workers, with no extra error.

Values are durations in milliseconds, so negative values are refused; zero is kept
(in its own counter, as DDSketch does).

Serialisation (``to_dict`` / ``from_dict``) is a small JSON-ready dict rather than the
library's protobuf (which needs ``protobuf`` and drops min, max and sum)::

    {
      "v": 1,                    # format version
      "relative_accuracy": 0.01, # the sketch's alpha; only equal ones merge
      "zero_count": 0,           # values that were 0 (or below the smallest indexable)
      "keys": [412, 415, 430],   # the non-empty bins of the (positive) store, ascending
      "counts": [3, 1, 7],       # their counts, same order
      "count": 11,               # all values, zeros included
      "sum": 1234.5,             # float; order of additions may change its last bits
      "min": 80.1, "max": 512.0  # null when empty
    }

A bin's key is DDSketch's logarithmic index (``ceil(log_gamma(value))`` with
``gamma = (1 + alpha) / (1 - alpha)``), so the dict is the sketch itself, not an
approximation of it: ``from_dict(to_dict(s))`` answers every quantile exactly as ``s``.

:class:`Tally` is the same sketch while it is being counted, for the stream's windows: a
call counts in seven windows (one per dimension), so its duration is binned once
(:func:`bin_of`) and each window only increments that bin's count. A tally's
``to_dict`` is exactly the dict the sketch of the same values gives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import DenseStore

FORMAT_VERSION = 1
DEFAULT_RELATIVE_ACCURACY = 0.01
DEFAULT_QUANTILES = (0.5, 0.95, 0.99)
# The most bins from a sketch's lowest key to its highest that one read may hold: its
# store is a list spanning them (8 bytes a bin). A sketch at 1% spans at most ~71,000,
# every finite value; keys further apart (a message made elsewhere, or corrupted) would
# have a read allocate gigabytes.
MAX_KEY_SPAN = 1 << 20


@functools.lru_cache(maxsize=16)  # one accuracy in practice; any a message names
def _key_range(relative_accuracy: float) -> tuple[int, int]:
    """The lowest and highest keys of values a float holds, at ``relative_accuracy``."""
    mapping = LogarithmicMapping(relative_accuracy)
    return int(mapping.key(mapping.min_possible)), int(mapping.key(mapping.max_possible))


def _duration(ms: float) -> float:
    value = float(ms)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a duration must be a finite number >= 0, got {ms!r}")
    return value


class LatencySketch:
    """A distribution of durations (ms), answering quantiles within ``relative_accuracy``."""

    __slots__ = ("_largest", "_max", "_min", "_sketch", "_store", "_sum", "relative_accuracy")

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        self.relative_accuracy = relative_accuracy
        self._store = DenseStore()
        mapping = LogarithmicMapping(relative_accuracy)
        # A duration past the largest value the mapping maps (~1.8e308) counts in its
        # top bin: in a bin past it, no quantile could be read, nor the sketch read back.
        self._largest = mapping.max_possible
        self._sketch = BaseDDSketch(
            mapping=mapping,
            store=self._store,
            negative_store=DenseStore(),
            zero_count=0.0,
        )
        # Tracked here rather than read from the library's private fields, so that a
        # sketch rebuilt by from_dict keeps them.
        self._min = math.inf
        self._max = -math.inf
        self._sum = 0.0

    @classmethod
    def of(
        cls, values: Iterable[float], relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY
    ) -> LatencySketch:
        sketch = cls(relative_accuracy)
        for value in values:
            sketch.add(value)
        return sketch

    # -- adding and merging ------------------------------------------------------

    def add(self, ms: float) -> None:
        value = _duration(ms)
        self._sketch.add(min(value, self._largest))
        self._sum += value
        self._min = min(self._min, value)
        self._max = max(self._max, value)

    def merge(self, other: LatencySketch) -> None:
        """Add every value of ``other`` to this sketch (``other`` is left unchanged)."""
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError(
                "cannot merge sketches of different accuracy: "
                f"{self.relative_accuracy} and {other.relative_accuracy}"
            )
        if other.count == 0:
            return
        self._sketch.merge(other._sketch)
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def copy(self) -> LatencySketch:
        return LatencySketch.from_dict(self.to_dict())

    # -- reading -----------------------------------------------------------------

    @property
    def count(self) -> int:
        return round(float(self._sketch.count))

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def min(self) -> float | None:
        return self._min if self.count else None

    @property
    def max(self) -> float | None:
        return self._max if self.count else None

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` (0..1), or None when the sketch is empty.

        Clamped to the exact min and max seen, which only moves it closer to the truth;
        quantiles 0 and 1 are the exact min and max.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"a quantile must be in [0, 1], got {q!r}")
        if self.count == 0:
            return None
        if q == 0:
            return self._min
        if q == 1:
            return self._max
        raw = self._sketch.get_quantile_value(q)
        value = 0.0 if raw is None else float(raw)
        return min(max(value, self._min), self._max)

    def quantiles(self, *qs: float) -> tuple[float | None, ...]:
        """The values at each of ``qs`` (default p50, p95, p99), None when empty."""
        return tuple(self.quantile(q) for q in (qs or DEFAULT_QUANTILES))

    # -- serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        keys: list[int] = []
        counts: list[int] = []
        if self._store.count:
            bins: list[float] = self._store.bins
            offset = int(self._store.offset)
            for index, bin_count in enumerate(bins):
                if bin_count:
                    keys.append(index + offset)
                    counts.append(round(bin_count))
        count = self.count
        return {
            "v": FORMAT_VERSION,
            "relative_accuracy": self.relative_accuracy,
            "zero_count": count - sum(counts),
            "keys": keys,
            "counts": counts,
            "count": count,
            "sum": self._sum,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencySketch:
        if data.get("v") != FORMAT_VERSION:
            raise ValueError(f"unknown sketch format version {data.get('v')!r}")
        keys, counts = data["keys"], data["counts"]
        if len(keys) != len(counts):
            raise ValueError("a sketch's keys and counts must have the same length")
        zero_count = int(data["zero_count"])
        if zero_count < 0 or any(int(c) <= 0 for c in counts):
            raise ValueError("a sketch's counts must be positive")
        if zero_count + sum(int(c) for c in counts) != int(data["count"]):
            raise ValueError("a sketch's bin counts do not add up to its count")
        sketch = cls(float(data["relative_accuracy"]))
        if keys:
            # Keys of values a float holds (past them, a quantile overflows), and not so
            # far apart that the store could not hold them (MAX_KEY_SPAN).
            lowest, highest = min(keys), max(keys)
            least, most = _key_range(sketch.relative_accuracy)
            if lowest < least or highest > most:
                raise ValueError("a sketch's keys must be of finite values at its accuracy")
            if highest - lowest >= MAX_KEY_SPAN:
                raise ValueError(f"a sketch's keys must be less than {MAX_KEY_SPAN} apart")
        for key, bin_count in zip(keys, counts, strict=True):
            sketch._store.add(int(key), float(bin_count))
        sketch._sketch = BaseDDSketch(
            mapping=LogarithmicMapping(sketch.relative_accuracy),
            store=sketch._store,
            negative_store=DenseStore(),
            zero_count=float(zero_count),
        )
        if sketch.count:
            sketch._sum = float(data["sum"])
            sketch._min = float(data["min"])
            sketch._max = float(data["max"])
        return sketch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencySketch):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        p50, p95, p99 = self.quantiles()
        return f"LatencySketch(count={self.count}, p50={p50}, p95={p95}, p99={p99})"


_MAPPING = LogarithmicMapping(DEFAULT_RELATIVE_ACCURACY)
_SMALLEST = _MAPPING.min_possible
_LARGEST = _MAPPING.max_possible
ZERO_BIN: int | None = None  # the bin of 0 (and of values too small to tell from it)


def bin_of(ms: float) -> int | None:
    """The bin a duration counts in, at the default accuracy (ZERO_BIN for zero).
    Refuses what :meth:`LatencySketch.add` refuses."""
    value = _duration(ms)
    return _MAPPING.key(min(value, _LARGEST)) if value > _SMALLEST else ZERO_BIN


class Tally:
    """Durations counted into their DDSketch bins (default accuracy), not yet a sketch.

    ``add`` takes the duration with its bin (:func:`bin_of`), so a duration counted in
    several tallies is binned once. ``to_dict`` gives what ``LatencySketch.to_dict``
    gives for the same values added in the same order.
    """

    __slots__ = ("bins", "count", "max", "min", "sum", "zero_count")

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}
        self.zero_count = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, ms: float, key: int | None) -> None:
        if key is None:
            self.zero_count += 1
        else:
            bins = self.bins
            bins[key] = bins.get(key, 0) + 1
        self.count += 1
        self.sum += ms
        if ms < self.min:
            self.min = ms
        if ms > self.max:
            self.max = ms

    def merge(self, other: Tally) -> None:
        bins = self.bins
        for key, n in other.bins.items():
            bins[key] = bins.get(key, 0) + n
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def to_dict(self) -> dict[str, Any]:
        keys = sorted(self.bins)
        return {
            "v": FORMAT_VERSION,
            "relative_accuracy": DEFAULT_RELATIVE_ACCURACY,
            "zero_count": self.zero_count,
            "keys": keys,
            "counts": [self.bins[key] for key in keys],
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tally:
        """A tally of a sketch's dict (checked as :meth:`LatencySketch.from_dict` checks it)."""
        sketch = LatencySketch.from_dict(data)
        if sketch.relative_accuracy != DEFAULT_RELATIVE_ACCURACY:
            raise ValueError(f"a tally is at accuracy {DEFAULT_RELATIVE_ACCURACY} only")
        tally = cls()
        tally.bins = dict(zip(data["keys"], data["counts"], strict=True))
        tally.zero_count = int(data["zero_count"])
        tally.count = sketch.count
        if tally.count:
            tally.sum, tally.min, tally.max = sketch.sum, float(data["min"]), float(data["max"])
        return tally
