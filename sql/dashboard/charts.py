"""Charts as inline SVG, drawn on the server: pure functions from numbers to markup.

No JavaScript and no charting library: every chart is an ``<svg class="chart">`` with
``data-chart`` (its name) and ``data-points`` (how many bars carry a value above zero),
each bar with a ``<title>`` (the browser's own tooltip). A chart with nothing to draw
is a ``<p class="empty">`` saying so instead, never an empty frame. Styling is by CSS
class only (no ``style`` attributes: the page's Content-Security-Policy allows the
shipped stylesheet and nothing inline).

Values are Decimal (money stays exact in every label); only pixel positions are floats.
Every label is escaped here, so the markup can be placed in an HTML page as it is (it
is inline SVG in HTML: no XML namespace, and no URL of any kind).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from html import escape

Format = Callable[[Decimal], str]

NO_DATA = "No data in this range."


@dataclass(frozen=True)
class Point:
    """One bar: its label (a bucket, a model, a team...) and value; None: unknown
    (e.g. the cost of calls none of which could be priced)."""

    label: str
    value: Decimal | None


@dataclass(frozen=True)
class Series:
    """One named series of a column chart; ``kind`` names its CSS class (``bar-<kind>``)."""

    name: str
    kind: str
    points: Sequence[Point]


@dataclass(frozen=True)
class Chart:
    """A rendered chart: ``html`` is safe to place in a page as it is."""

    name: str
    points: int  # bars with a value above zero
    html: str


# -- formatting -------------------------------------------------------------------------


def usd(value: Decimal | None) -> str:
    """Money for people: cents above $1, up to 6 places below (exact, trailing zeros cut)."""
    if value is None:
        return "unknown"
    if value < 0:
        return "-" + usd(-value)
    if value >= 1:
        return f"${value:,.2f}"
    text = f"{value:.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def count(value: Decimal | int | None) -> str:
    if value is None:
        return "unknown"
    value = Decimal(value)
    return f"{value:,.0f}" if value == value.to_integral_value() else f"{value:,.1f}"


def millis(value: Decimal | None) -> str:
    if value is None:
        return "unknown"
    if value >= 1000:
        return f"{value / 1000:,.2f} s"
    return f"{value:,.0f} ms"


def nice_ceiling(value: Decimal) -> Decimal:
    """The axis top: the smallest 1, 2, 2.5 or 5 times a power of ten that is >= value."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()  # value = d.ddd x 10^exponent
    for step in (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5), Decimal(10)):
        top = step.scaleb(exponent)
        if top >= value:
            return top
    raise AssertionError("unreachable: 10 x 10^exponent exceeds any value of that exponent")


def _fraction(value: Decimal, top: Decimal) -> float:
    return float(value / top) if top > 0 else 0.0


def _num(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _plotted(points: Sequence[Point]) -> int:
    return sum(1 for p in points if p.value is not None and p.value > 0)


def empty(name: str, message: str = NO_DATA) -> Chart:
    return Chart(name, 0, f'<p class="empty" data-chart="{escape(name)}">{escape(message)}</p>')


# -- column chart (time series) ---------------------------------------------------------

WIDTH, HEIGHT = 640, 220  # about a half-page panel wide: text near its CSS size
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 26


def columns(
    name: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    fmt: Format,
    *,
    tick_every: int | None = None,
) -> Chart:
    """Vertical bars, one slot per axis label (a time bucket), series drawn over each
    other in order (so a subset, such as errors of requests, goes last and shows on top).
    A point's own label is its tooltip (e.g. the bucket's full date and time).

    ``fmt`` formats values (axis and tooltips); every ``tick_every``-th label is written
    under the axis (by default about 6 of them).
    """
    for s in series:
        if len(s.points) != len(labels):
            raise ValueError(f"series {s.name!r} has {len(s.points)} points for {len(labels)}")
    plotted = sum(_plotted(s.points) for s in series)
    if not labels or plotted == 0:
        return empty(name)
    values = [p.value for s in series for p in s.points if p.value is not None]
    top = nice_ceiling(max(values))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(labels)
    gap = min(2.0, slot * 0.2)
    out = [
        f'<svg class="chart columns" data-chart="{escape(name)}" data-points="{plotted}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in (Decimal(0), top / 2, top):  # grid lines and their values
        y = TOP + plot_h * (1 - _fraction(tick, top))
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{_num(y)}" y2="{_num(y)}"/>'
        )
        out.append(
            f'<text class="axis" x="{LEFT - 6}" y="{_num(y + 4)}" text-anchor="end">'
            f"{escape(fmt(tick))}</text>"
        )
    every = tick_every or max(1, round(len(labels) / 6))
    for i, label in enumerate(labels):
        if i % every == 0:
            x = LEFT + slot * (i + 0.5)
            out.append(
                f'<text class="axis" x="{_num(x)}" y="{HEIGHT - 8}" text-anchor="middle">'
                f"{escape(label)}</text>"
            )
    for s in series:
        for i, point in enumerate(s.points):
            if point.value is None or point.value <= 0:
                continue
            h = plot_h * _fraction(point.value, top)
            x = LEFT + slot * i + gap / 2
            out.append(
                f'<rect class="bar bar-{escape(s.kind)}" x="{_num(x)}" '
                f'y="{_num(TOP + plot_h - h)}" width="{_num(max(slot - gap, 1.0))}" '
                f'height="{_num(max(h, 1.0))}"><title>{escape(point.label)} · '
                f"{escape(s.name)}: {escape(fmt(point.value))}</title></rect>"
            )
    out.append("</svg>")
    if len(series) > 1:
        keys = "".join(
            f'<span class="key"><span class="swatch bar-{escape(s.kind)}"></span>'
            f"{escape(s.name)}</span>"
            for s in series
        )
        out.append(f'<p class="legend">{keys}</p>')
    return Chart(name, plotted, "".join(out))


# -- horizontal bars (rankings) ---------------------------------------------------------

ROW_H, LABEL_W, VALUE_W, BAR_W = 24, 210, 100, 330  # about a half-page panel wide
LABEL_CHARS = 30


def bars(name: str, title: str, points: Sequence[Point], fmt: Format, kind: str) -> Chart:
    """Horizontal bars, one row per point in the given order (a ranking): the label, the
    bar, and the formatted value; an unknown value is written as such, with no bar."""
    plotted = _plotted(points)
    if plotted == 0:
        return empty(name)
    known = [p.value for p in points if p.value is not None]
    top = max(known) if known else Decimal(0)
    width = LABEL_W + BAR_W + VALUE_W
    height = ROW_H * len(points) + 4
    out = [
        f'<svg class="chart bars" data-chart="{escape(name)}" data-points="{plotted}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for i, point in enumerate(points):
        y = ROW_H * i + 2
        label = point.label if len(point.label) <= LABEL_CHARS else point.label[:29] + "…"
        out.append(
            f'<text class="label" x="{LABEL_W - 8}" y="{y + 16}" text-anchor="end">'
            f"<title>{escape(point.label)}</title>{escape(label)}</text>"
        )
        if point.value is not None and point.value > 0:
            w = max(BAR_W * _fraction(point.value, top), 1.0)
            out.append(
                f'<rect class="bar bar-{escape(kind)}" x="{LABEL_W}" y="{y + 3}" '
                f'width="{_num(w)}" height="{ROW_H - 6}"><title>{escape(point.label)}: '
                f"{escape(fmt(point.value))}</title></rect>"
            )
        else:
            w = 0.0
        out.append(
            f'<text class="value" x="{_num(LABEL_W + w + 6)}" y="{y + 16}">'
            f"{escape(fmt(point.value) if point.value is not None else 'unknown')}</text>"
        )
    out.append("</svg>")
    return Chart(name, plotted, "".join(out))
