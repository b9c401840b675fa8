"""Robust baselines for a series of closed-window values. Pure functions.

A baseline is a *center* (what the series usually is) and a *scale* (how much it
usually varies). Both are robust statistics, so outliers in the history (up to half of
it) do not move them:

* center = the median of the history;
* scale = Rousseeuw and Croux's Qn (see :func:`qn`), an estimate of the standard
  deviation that, like the MAD x 1.4826, ignores outliers, but is about twice as
  efficient: the MAD of 30 windows is off by 20% or more often enough to cause false
  alerts, Qn's error is about 15%. The scale is then widened for short histories by
  ``1 + SMALL_SAMPLE / n`` (60% with 5 windows, 10% with 30), because a scale learned
  from few windows is too small too often; and floored at ``min_relative_scale`` of
  the center and at ``EPSILON``, so a perfectly flat series does not call the first
  wiggle infinitely unusual.

A value's *robust z-score* is ``(value - center) / scale``.

A rate (an error rate: failed calls of a window's calls) is also judged against its
sampling noise (:func:`sampling_noise`): the scale is at least how much the window's
rate varies by chance at the baseline's rate, and at least one call's worth. Without
that, a series at 0 in most windows (a healthy model's error rate) had a Qn of 0, and
its first failed call was infinitely unusual.

With hour-of-day seasonality, each closed UTC hour of the recent history is
summarised as ``(day, median, scale)`` into that hour's profile (kept for the last
few days); the seasonal baseline for a window in hour ``h`` is then the median of
hour ``h``'s daily medians on previous days, with a scale covering both the typical
within-hour variation and the day-to-day variation of that hour.

Centers and values are exact Decimals; the scale's order statistic is taken in binary
floating point (deterministic, and an estimate, not an amount).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from decimal import ROUND_FLOOR, Context, Decimal

# 1 / Phi^-1(3/4): scales the MAD to a standard deviation under Gaussian noise.
MAD_TO_SIGMA = Decimal("1.4826")
# The smallest scale, whatever the history: keeps z-scores finite on an all-zero series.
EPSILON = Decimal("1e-9")
SMALL_SAMPLE = Decimal(3)
_SCALE_DIGITS = Context(prec=12)
# A rate's sampling noise rounded down: rounded up (1/11 to 0.0909090909091), a window of
# exactly ``sensitivity`` failed calls of 11 fell short of its own threshold.
_NOISE_DIGITS = Context(prec=12, rounding=ROUND_FLOOR)


@dataclass(frozen=True, slots=True)
class Baseline:
    center: Decimal
    scale: Decimal
    samples: int  # how many values (or, seasonal, how many days) it was learned from
    seasonal: bool = False

    def z(self, value: Decimal) -> Decimal:
        """The robust z-score of ``value`` against this baseline."""
        return (value - self.center) / self.scale

    def upper(self, sensitivity: Decimal) -> Decimal:
        """The value at which the z-score reaches ``sensitivity``."""
        return self.center + sensitivity * self.scale

    def at_least(self, scale: Decimal) -> Baseline:
        """This baseline with its scale raised to ``scale`` where it is smaller."""
        return self if self.scale >= scale else replace(self, scale=scale)


def median(values: Sequence[Decimal]) -> Decimal:
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def mad(values: Sequence[Decimal], center: Decimal | None = None) -> Decimal:
    """The median absolute deviation from ``center`` (default: the median)."""
    mid = median(values) if center is None else center
    return median([abs(v - mid) for v in values])


# Qn's consistency constant for Gaussian data, and its finite-sample corrections
# (Croux & Rousseeuw 1992): a table for n <= 9, then n / (n + 1.4) for odd n and
# n / (n + 3.8) for even n.
QN_TO_SIGMA = Decimal("2.2219")
_QN_SMALL = {
    2: Decimal("0.399"),
    3: Decimal("0.994"),
    4: Decimal("0.512"),
    5: Decimal("0.844"),
    6: Decimal("0.611"),
    7: Decimal("0.857"),
    8: Decimal("0.669"),
    9: Decimal("0.872"),
}


def qn(values: Sequence[Decimal]) -> Decimal:
    """Rousseeuw and Croux's Qn scale estimator, consistent for a Gaussian's sigma.

    The k-th smallest of the pairwise distances ``|x_i - x_j|`` (i < j), with
    ``k = h (h - 1) / 2`` and ``h = n // 2 + 1``: about their first quartile. Like the
    MAD it ignores up to half the values being outliers; unlike the MAD it needs no
    center and wastes far less of the data (82% Gaussian efficiency against 37%), so
    it varies much less from one short history to the next. O(n^2 log n) on the
    history, which is small (tens of values).
    """
    n = len(values)
    if n < 2:
        return Decimal(0)
    # In binary floating point: an order statistic of a statistic, not an amount, and
    # IEEE arithmetic is deterministic; ten times faster than Decimals here.
    xs = sorted(float(v) for v in values)
    distances = sorted([b - a for i, a in enumerate(xs) for b in xs[i + 1 :]])
    h = n // 2 + 1
    kth = Decimal(repr(distances[h * (h - 1) // 2 - 1]))
    if n in _QN_SMALL:
        correction = _QN_SMALL[n]
    else:
        correction = Decimal(n) / (Decimal(n) + (Decimal("1.4") if n % 2 else Decimal("3.8")))
    # Twelve significant digits are plenty for a scale, and keep the state short.
    return _SCALE_DIGITS.plus(kth * QN_TO_SIGMA * correction)


def floored_scale(raw: Decimal, center: Decimal, min_relative_scale: Decimal) -> Decimal:
    return max(raw, abs(center) * min_relative_scale, EPSILON)


def widen(scale: Decimal, n: int) -> Decimal:
    """``scale`` widened by ``1 + SMALL_SAMPLE / n`` for a history of ``n`` values."""
    return scale * (1 + SMALL_SAMPLE / n)


def robust(values: Sequence[Decimal], min_relative_scale: Decimal) -> Baseline:
    """The median/Qn baseline of ``values`` (at least one)."""
    center = median(values)
    scale = widen(qn(values), len(values))
    return Baseline(center, floored_scale(scale, center, min_relative_scale), len(values))


def sampling_noise(rate: Decimal, calls: int) -> Decimal:
    """How much a rate of ``calls`` calls varies by chance around ``rate``: the binomial
    standard deviation ``sqrt(rate (1 - rate) / calls)``, and at least one call's worth
    (``1 / calls``), as a rate cannot be told more finely than one call. So against a
    baseline at 0, a window's z-score is its count of failed calls."""
    if calls < 1:
        raise ValueError("a rate of no calls")
    share = min(max(rate, Decimal(0)), Decimal(1))
    variance = max(calls * share * (1 - share), Decimal(1))
    return _NOISE_DIGITS.divide(variance.sqrt(), Decimal(calls))


@dataclass(frozen=True, slots=True)
class HourSummary:
    """One closed UTC hour of one day: the median and the (unfloored) scale of its windows."""

    day: date
    median: Decimal
    scale: Decimal


def summarise_hour(day: date, values: Sequence[Decimal]) -> HourSummary:
    return HourSummary(day, median(values), qn(values))


def seasonal(
    summaries: Iterable[HourSummary], before: date, min_days: int, min_relative_scale: Decimal
) -> Baseline | None:
    """The baseline of one hour of the day from its summaries of days before ``before``;
    None when fewer than ``min_days`` days are known.

    center = median of the daily medians; scale = the larger of the typical within-hour
    scale (median of the daily scales) and the day-to-day scale (MAD of the daily
    medians times 1.4826: Qn needs more values than a week of days), floored like
    :func:`robust`.
    """
    days = [s for s in summaries if s.day < before]
    if len(days) < max(min_days, 1):
        return None
    medians = [s.median for s in days]
    center = median(medians)
    within = median([s.scale for s in days])
    between = mad(medians, center) * MAD_TO_SIGMA
    scale = floored_scale(max(within, between), center, min_relative_scale)
    return Baseline(center, scale, len(days), seasonal=True)
