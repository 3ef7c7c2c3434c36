"""Report charts as self-contained SVG strings (standard library only), and as PNG via resvg.

Every chart has an explicit size and viewBox, `role="img"` and a `<title>`; every text is
XML-escaped; a point that is null, NaN or infinite is left out, never written. Colours come
from the Okabe-Ito palette (safe for colour-blind readers) and series also differ by dash.
Tick labels carry `data-value` (the number they stand for), which tests read back.
"""

from __future__ import annotations

import html
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.stats import finite

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000")
DASHES = ("", "8 4", "2 3", "10 3 2 3")
WIDTH = 720
PLOT_HEIGHT = 240
ROW = 20  # legend row height
DOT = "#222222"  # marks that are no series (break-even points)
PNG_MISSING = "PNG charts need the `charts` extra: pip install 'turnout[charts]'"

Point = tuple[float, float]
Bar = tuple[str, float | None, float | None, float | None]


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _n(value: float) -> str:
    """A coordinate; callers only pass finite numbers (checked here, never written as nan)."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite coordinate: {value}")
    return f"{value:.1f}".removesuffix(".0")


def _style(i: int) -> tuple[str, str]:
    """Colour and dash of the i-th series."""
    return PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE) + i) % len(DASHES)]


def _text_width(text: str, size: float = 12) -> float:
    return 0.62 * size * len(text)


def _fit(text: str, width: float, size: float = 12) -> str:
    """`text` cut with an ellipsis to about `width` pixels."""
    room = max(int(width / (0.62 * size)), 4)
    return text if len(text) <= room else text[: room - 1] + "…"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of 10 apart) over [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    low, high = min(low, high), max(low, high)
    if high - low < 1e-12 * max(abs(low), abs(high), 1e-300):
        high = low + (abs(low) if low else 1.0)
    raw = (high - low) / count
    exponent = math.floor(math.log10(raw))
    fraction = raw / 10**exponent
    step = next(n for n in (1, 2, 5, 10) if fraction <= n) * 10.0**exponent
    start = math.floor(low / step + 1e-9)
    stop = math.ceil(high / step - 1e-9)
    return [float(f"{i * step:.12g}") for i in range(start, stop + 1)]


def tick_text(value: float, step: float) -> str:
    """A tick label as precise as the step needs: 0.25, 1.5, 750, 12k, 1.5M."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if step >= div / 10 and max(abs(value), step) >= div:
            value, step, unit = value / div, step / div, suffix
            break
    else:
        unit = ""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    text = f"{value:,.{decimals}f}"
    return "0" if float(text.replace(",", "")) == 0 else text + unit


def usd(value: float, digits: int = 4, *, signed: bool = False) -> str:
    """Dollars to `digits` significant digits, never in e-notation: $0.0001532, $1,234.50."""
    if not math.isfinite(value):
        return "n/a"
    sign = "-" if value < 0 else "+" if signed and value > 0 else ""
    size = abs(value)
    if size == 0:
        return f"{sign}$0"
    decimals = max(digits - 1 - math.floor(math.log10(size)), 0)
    text = f"{size:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
        text += "0" if len(text.partition(".")[2]) == 1 else ""
    return f"{sign}${text}"


@dataclass(frozen=True)
class _Frame:
    """The plot area in pixels and the data ranges it shows."""

    left: float
    top: float
    width: float
    height: float
    xs: Sequence[float]  # x ticks: the first and last are the range
    ys: Sequence[float]

    def x(self, value: float) -> float:
        x0, x1 = self.xs[0], self.xs[-1]
        return self.left + (value - x0) / (x1 - x0) * self.width

    def y(self, value: float) -> float:
        y0, y1 = self.ys[0], self.ys[-1]
        return self.top + self.height - (value - y0) / (y1 - y0) * self.height

    @property
    def bottom(self) -> float:
        return self.top + self.height

    @property
    def right(self) -> float:
        return self.left + self.width


def _doc(title: str, height: float, body: Iterable[str]) -> str:
    h = _n(height)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" '
        f'viewBox="0 0 {WIDTH} {h}" role="img" font-family="{FONT}" font-size="12">'
        f"<title>{_esc(title)}</title>"
        f'<rect width="{WIDTH}" height="{h}" fill="#ffffff"/>'
        f'<text x="16" y="26" font-size="15" font-weight="bold" fill="#222222">'
        f"{_esc(_fit(title, WIDTH - 32, 15))}</text>" + "".join(body) + "</svg>"
    )


def _no_data(title: str, message: str = "no data") -> str:
    text = (
        f'<text class="no-data" x="{WIDTH // 2}" y="80" text-anchor="middle" '
        f'font-size="14" fill="#666666">{_esc(message)}</text>'
    )
    return _doc(title, 120, [text])


def _axes(
    f: _Frame, x_label: str, y_label: str, y_text: Callable[[float], str], *, y_grid: bool = True
) -> list[str]:
    """Grid lines, ticks with labels, axis lines and axis titles."""
    x_step = f.xs[1] - f.xs[0]
    parts = []
    for t in f.ys:
        y = _n(f.y(t))
        label = y_text(t)
        if y_grid:
            parts.append(f'<line x1="{_n(f.left)}" x2="{_n(f.right)}" y1="{y}" y2="{y}" '
                         'stroke="#e6e6e6"/>')  # fmt: skip
        parts.append(
            f'<text class="ytick" data-value="{t:.12g}" x="{_n(f.left - 6)}" y="{y}" '
            f'dy="4" text-anchor="end" fill="#444444">{_esc(label)}</text>'
        )
    for t in f.xs:
        x = _n(f.x(t))
        label = tick_text(t, x_step)
        parts.append(
            f'<line x1="{x}" x2="{x}" y1="{_n(f.top)}" y2="{_n(f.bottom)}" stroke="#eeeeee"/>'
            f'<line x1="{x}" x2="{x}" y1="{_n(f.bottom)}" y2="{_n(f.bottom + 5)}" '
            f'stroke="#444444"/><text class="xtick" data-value="{t:.12g}" x="{x}" '
            f'y="{_n(f.bottom + 19)}" text-anchor="middle" fill="#444444">{_esc(label)}</text>'
        )
    parts.append(
        f'<path d="M{_n(f.left)} {_n(f.top)}V{_n(f.bottom)}H{_n(f.right)}" fill="none" '
        f'stroke="#444444"/><text x="{_n(f.left + f.width / 2)}" y="{_n(f.bottom + 38)}" '
        f'text-anchor="middle" fill="#222222">{_esc(x_label)}</text>'
    )
    if y_label:
        cx, cy = _n(16), _n(f.top + f.height / 2)
        parts.append(
            f'<text x="{cx}" y="{cy}" transform="rotate(-90 {cx} {cy})" text-anchor="middle" '
            f'dy="4" fill="#222222">{_esc(y_label)}</text>'
        )
    return parts


def _legend(items: Sequence[tuple[int, str, str]], top: float) -> list[str]:
    """One row per item: (series index, swatch kind "line" | "dot" | "bar", text)."""
    parts = []
    for row, (i, kind, text) in enumerate(items):
        colour, dash = _style(i)
        y = top + row * ROW
        if kind == "line":
            dashes = f' stroke-dasharray="{dash}"' if dash else ""
            swatch = (f'<line x1="24" x2="54" y1="{_n(y - 4)}" y2="{_n(y - 4)}" '
                      f'stroke="{colour}" stroke-width="2.5"{dashes}/>')  # fmt: skip
        elif kind == "dot":
            swatch = f'<circle cx="39" cy="{_n(y - 4)}" r="5" fill="{DOT}"/>'
        else:
            swatch = f'<rect x="30" y="{_n(y - 10)}" width="18" height="12" fill="{colour}"/>'
        parts.append(
            f'<g class="legend">{swatch}<text x="62" y="{_n(y)}" fill="#222222">'
            f"{_esc(_fit(text, WIDTH - 80))}</text></g>"
        )
    return parts


def _polyline(points: Sequence[Point], i: int, name: str, width: float = 2.5) -> str:
    colour, dash = _style(i)
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    coords = " ".join(f"{_n(x)},{_n(y)}" for x, y in points)
    return (
        f'<polyline class="series" data-series="{_esc(name)}" points="{coords}" fill="none" '
        f'stroke="{colour}" stroke-width="{width}" stroke-linejoin="round"{dashes}/>'
    )


def _quantile_points(values: Sequence[float | None]) -> list[Point]:
    """(value, cumulative share) of evenly spaced quantiles, missing values left out."""
    last = max(len(values) - 1, 1)
    found = [(v, i / last) for i, raw in enumerate(values) if (v := finite(raw)) is not None]
    return sorted(found)


def _share_at(points: Sequence[Point], share: float) -> float | None:
    """The value at a cumulative share, interpolated between the quantiles given."""
    for (v0, q0), (v1, q1) in itertools.pairwise(points):
        if q0 <= share <= q1:
            return v0 if q1 == q0 else v0 + (v1 - v0) * (share - q0) / (q1 - q0)
    return None


def _clip(points: Sequence[Point], limit: float) -> list[Point]:
    """The curve up to x = limit (the quantile curve rises, so one crossing at most)."""
    kept: list[Point] = []
    for v, q in points:
        if v <= limit:
            kept.append((v, q))
            continue
        if kept:
            v0, q0 = kept[-1]
            kept.append((limit, q0 + (q - q0) * (limit - v0) / (v - v0)))
        break
    return kept


def _unit_scale(unit: str, top: float) -> tuple[float, str]:
    return (1000.0, "ms") if unit == "s" and top < 1 else (1.0, unit)


def latency_distribution(
    title: str, series: Mapping[str, Sequence[float | None]], *, unit: str = "s"
) -> str:
    """Per variant, the share of requests (y) done within a latency (x), drawn through evenly
    spaced quantiles (21 of them: 0, 5, …, 100%); p50 and p95 are dotted on each curve.
    A long tail is cut at twice the largest p95 (the legend gives every maximum)."""
    curves = {name: _quantile_points(values) for name, values in series.items()}
    every = [v for points in curves.values() for v, _ in points]
    if not every:
        return _no_data(title)
    scale, unit = _unit_scale(unit, max(every))
    curves = {name: [(v * scale, q) for v, q in pts] for name, pts in curves.items()}
    top = max(every) * scale
    p95s = [p for pts in curves.values() if (p := _share_at(pts, 0.95)) is not None]
    limit = 2 * max(p95s) if p95s and 0 < 2.5 * max(p95s) < top else top
    low = min(every) * scale
    xs = nice_ticks(0.0 if low < 0.5 * limit else low, limit)
    f = _Frame(64, 44, WIDTH - 64 - 24, PLOT_HEIGHT, xs, [0.0, 25.0, 50.0, 75.0, 100.0])
    parts = _axes(f, f"latency ({unit})", "share of requests", lambda t: f"{t:.0f}%")
    for share in (50, 95):
        y = _n(f.y(share))
        parts.append(
            f'<line x1="{_n(f.left)}" x2="{_n(f.right)}" y1="{y}" y2="{y}" stroke="#999999" '
            f'stroke-dasharray="3 3"/><text x="{_n(f.left + 4)}" y="{_n(f.y(share) - 4)}" '
            f'font-size="11" fill="#666666">p{share}</text>'
        )
    legend = []
    for i, (name, points) in enumerate(curves.items()):
        legend.append((i, "line", _latency_legend(name, points, xs[-1], unit)))
        shown = _clip(points, xs[-1])
        if not shown:
            continue
        parts.append(_polyline([(f.x(v), f.y(100 * q)) for v, q in shown], i, name))
        for mark in (0.5, 0.95):
            value = _share_at(points, mark)
            if value is not None and value <= xs[-1]:
                parts.append(
                    f'<circle cx="{_n(f.x(value))}" cy="{_n(f.y(100 * mark))}" r="4" '
                    f'fill="{_style(i)[0]}" stroke="#ffffff" stroke-width="1.5"/>'
                )
    parts += _legend(legend, f.bottom + 66)
    return _doc(title, f.bottom + 66 + ROW * len(legend), parts)


def _latency_legend(name: str, points: Sequence[Point], limit: float, unit: str) -> str:
    if not points:
        return f"{name}: no data"
    p50, p95 = _share_at(points, 0.5), _share_at(points, 0.95)
    top = points[-1][0]
    pairs = (("p50", p50), ("p95", p95))
    figures = [f"{label} {v:.3g} {unit}" for label, v in pairs if v is not None]
    figures.append(f"max {top:.3g} {unit}" + (" (beyond the axis)" if top > limit else ""))
    return f"{name}: " + " · ".join(figures)


def interval_bars(
    title: str,
    bars: Sequence[Bar],
    *,
    unit: str = "",
    fmt: str | Callable[[float], str] = "{:.4g}",
) -> str:
    """One horizontal bar per (label, value, low, high), its 95% interval as an error bar and
    the figures written beside it. `unit` titles the value axis; `fmt` (a format string or a
    function) writes the figures."""
    rows = [(label, finite(v), finite(lo), finite(hi)) for label, v, lo, hi in bars]
    values = [x for _, v, lo, hi in rows for x in (v, lo, hi) if x is not None]
    if not values:
        return _no_data(title)
    write = fmt.format if isinstance(fmt, str) else fmt
    texts = [_bar_text(write, v, lo, hi) for _, v, lo, hi in rows]
    left = min(max(_text_width(label) for label, *_ in rows), 200) + 28
    xs = nice_ticks(min(0.0, *values), max(0.0, *values))
    f = _Frame(left, 44, _bars_width(left, xs, rows, texts), 32 * len(rows) + 8, xs, [0.0, 1.0])
    parts = _axes(f, unit, "", lambda t: "", y_grid=False)
    zero = _n(f.x(0.0))
    parts.append(f'<line x1="{zero}" x2="{zero}" y1="{_n(f.top)}" y2="{_n(f.bottom)}" '
                 'stroke="#444444"/>')  # fmt: skip
    for i, ((label, v, lo, hi), text) in enumerate(zip(rows, texts, strict=True)):
        mid = f.top + 4 + 32 * i + 16
        parts.append(
            f'<text x="{_n(left - 10)}" y="{_n(mid + 4)}" text-anchor="end" fill="#222222">'
            f"<title>{_esc(label)}</title>{_esc(_fit(label, left - 28))}</text>"
        )
        reach = [x for x in (v, lo, hi, 0.0) if x is not None]
        parts.append(
            f'<text x="{_n(f.x(max(reach)) + 8)}" y="{_n(mid + 4)}" fill="#222222">'
            f"{_esc(text)}</text>"
        )
        if v is not None:
            x0, x1 = sorted((f.x(0.0), f.x(v)))
            parts.append(
                f'<rect class="series" data-series="{_esc(label)}" x="{_n(x0)}" '
                f'y="{_n(mid - 9)}" width="{_n(max(x1 - x0, 1))}" height="18" '
                f'fill="{_style(i)[0]}" fill-opacity="0.8"/>'
            )
        if lo is not None and hi is not None:
            a, b, top, bottom = _n(f.x(lo)), _n(f.x(hi)), _n(mid - 6), _n(mid + 6)
            parts.append(
                f'<path class="interval" d="M{a} {top}V{bottom}M{a} {_n(mid)}H{b}M{b} {top}'
                f'V{bottom}" stroke="#222222" stroke-width="1.5" fill="none"/>'
            )
    return _doc(title, f.bottom + 50, parts)


def _bars_width(
    left: float, xs: Sequence[float], rows: Sequence[Bar], texts: Sequence[str]
) -> float:
    """The widest plot leaving room, right of each bar's reach, for its figures."""
    width = WIDTH - left - 24
    for (_, *figures), text in zip(rows, texts, strict=True):
        reach = (max([x for x in figures if x is not None] + [0.0]) - xs[0]) / (xs[-1] - xs[0])
        if reach > 0:
            width = min(width, (WIDTH - 12 - left - 8 - _text_width(text)) / reach)
    return max(width, 160.0)


def _bar_text(
    write: Callable[[float], str], v: float | None, lo: float | None, hi: float | None
) -> str:
    if v is None:
        return "no data"
    if lo is None or hi is None:
        return write(v)
    return f"{write(v)}  [{write(lo)}, {write(hi)}]"


@dataclass(frozen=True)
class _Fleet:
    name: str
    per_hour: float
    capacity: float | None  # requests per hour per replica, when known
    replicas: int | None

    def cost(self, rate: float) -> float:
        if self.capacity is None or self.replicas is None:
            return self.per_hour
        needed = max(math.ceil(rate / self.capacity - 1e-9), self.replicas)
        return needed * self.per_hour / self.replicas

    def line(self, top: float) -> list[Point]:
        """Cost per hour from rate 0 to `top`: flat, or a step per replica added."""
        if self.capacity is None or self.replicas is None or top / self.capacity > 400:
            return [(0.0, self.cost(0.0)), (top, self.cost(top))]
        points = [(0.0, self.cost(0.0))]
        edge = self.replicas * self.capacity
        while edge < top:
            points += [(edge, self.cost(edge)), (edge, self.cost(edge * (1 + 1e-9)))]
            edge += self.capacity
        return [*points, (top, self.cost(top))]


def _fleets(entries: Sequence[Mapping[str, Any]]) -> dict[str, _Fleet]:
    fleets: dict[str, _Fleet] = {}
    for e in entries:
        name, per_hour = str(e.get("fine_tuned", "?")), finite(e.get("fleet_usd_per_hour"))
        if per_hour is None or name in fleets:
            continue
        capacity = finite(e.get("capacity_requests_per_hour"))
        replicas = e.get("replicas")
        good = isinstance(replicas, int) and not isinstance(replicas, bool) and replicas > 0
        fleets[name] = _Fleet(
            name, per_hour, capacity if capacity and capacity > 0 else None,
            replicas if good else None,
        )  # fmt: skip
    return fleets


def break_even_chart(
    title: str, entries: Sequence[Mapping[str, Any]], *, current_rate: float | None
) -> str:
    """Cost per hour against requests per hour: a line through 0 per hosted variant (rate times
    its cost per request), a flat line (or one step per replica added, when a replica's
    capacity is known) per fine-tuned fleet, each reported break-even rate dotted on its
    fleet's cost, today's rate as a vertical line. The x range runs to about twice the larger
    of the crossings and today's rate; y stops at twice the dearest fleet (steeper hosted
    lines leave through the top)."""
    hosted: dict[str, float] = {}
    for e in entries:
        cost = finite(e.get("hosted_cost_per_request_usd"))
        if cost is not None and cost >= 0:
            hosted.setdefault(str(e.get("hosted", "?")), cost)
    fleets = _fleets(entries)
    if not hosted and not fleets:
        return _no_data(title, "no break-even: no fine-tuned fleet with a GPU cost")
    crossings = [
        (str(e.get("fine_tuned", "?")), str(e.get("hosted", "?")), x)
        for e in entries
        if (x := finite(e.get("break_even_requests_per_hour"))) is not None and x > 0
    ]
    now = finite(current_rate)
    now = now if now is not None and now > 0 else None
    reach = [x for *_, x in crossings] + ([now] if now else [])
    capacities = [3 * f.capacity for f in fleets.values() if f.capacity]
    xs = nice_ticks(0.0, 2 * max(reach) if reach else max(capacities, default=100.0))
    fleet_top = max((fleet.cost(xs[-1]) for fleet in fleets.values()), default=0.0)
    hosted_top = max((c * xs[-1] for c in hosted.values()), default=0.0)
    y_top = max(fleet_top, min(hosted_top, 2 * fleet_top)) if fleet_top else hosted_top
    ys = nice_ticks(0.0, y_top or 1.0)
    f = _Frame(72, 44, WIDTH - 72 - 24, PLOT_HEIGHT, xs, ys)
    y_step = ys[1] - ys[0]
    parts = _axes(f, "requests per hour", "USD per hour", lambda t: "$" + tick_text(t, y_step))
    legend: list[tuple[int, str, str]] = []
    for i, (name, points, text) in enumerate(_cost_lines(hosted, fleets, xs[-1], ys[-1])):
        parts.append(_polyline([(f.x(x), f.y(y)) for x, y in points], i, name))
        legend.append((i, "line", text))
    if now is not None:
        parts.append(_today(f, now))
    for ft, hosted_name, x in crossings:
        fleet = fleets.get(ft)
        parts.append(_crossing(f, x, fleet.cost(0.0) if fleet else x * hosted.get(hosted_name, 0)))
        legend.append((-1, "dot", f"break-even {ft} vs {hosted_name}: {x:,.0f} req/h"))
    for e in entries:
        if finite(e.get("break_even_requests_per_hour")) is None:
            text = f"{e.get('fine_tuned', '?')} vs {e.get('hosted', '?')}: never breaks even"
            legend.append((-1, "dot", text))
    parts += _legend(legend, f.bottom + 66)
    return _doc(title, f.bottom + 66 + ROW * len(legend), parts)


def _cost_lines(
    hosted: Mapping[str, float], fleets: Mapping[str, _Fleet], right: float, top: float
) -> list[tuple[str, list[Point], str]]:
    """(series name, points, legend text) per hosted variant, then per fleet."""
    lines = []
    for name, cost in hosted.items():
        end = min(right, top / cost) if cost > 0 else right
        text = f"hosted {name}: {usd(cost)} per request"
        lines.append((name, [(0.0, 0.0), (end, end * cost)], text))
    for name, fleet in fleets.items():
        text = f"{name} fleet: {usd(fleet.per_hour)} per hour"
        if fleet.capacity and fleet.replicas:
            text += (
                f", +{usd(fleet.per_hour / fleet.replicas)}/h per replica beyond "
                f"{fleet.capacity:,.0f} req/h each"
            )
        lines.append((name, fleet.line(right), text))
    return lines


def _today(f: _Frame, rate: float) -> str:
    x = _n(f.x(rate))
    return (
        f'<line class="current-rate" x1="{x}" x2="{x}" y1="{_n(f.top)}" y2="{_n(f.bottom)}" '
        'stroke="#222222" stroke-width="1.5" stroke-dasharray="5 3"/>'
        f'<text x="{_n(f.x(rate) + 5)}" y="{_n(f.top + 13)}" fill="#222222">'
        f"today: {_esc(tick_text(rate, _step_for(rate)))} req/h</text>"
    )


def _crossing(f: _Frame, rate: float, cost: float) -> str:
    x, y = f.x(rate), f.y(min(cost, f.ys[-1]))
    return (
        f'<circle class="break-even" data-rate="{rate:.12g}" cx="{_n(x)}" cy="{_n(y)}" '
        f'r="5.5" fill="{DOT}" stroke="#ffffff" stroke-width="1.5"/>'
        f'<text x="{_n(x + 8)}" y="{_n(y + 17)}" fill="#222222">'
        f"{_esc(tick_text(rate, _step_for(rate)))}</text>"
    )


def _step_for(value: float) -> float:
    """A step giving three significant digits, for labelling one value."""
    return 10.0 ** (math.floor(math.log10(abs(value))) - 2) if value else 1.0


def route_charts(route_name: str, route: Mapping[str, Any]) -> dict[str, str]:
    """The charts of one route of `gateway.report.build_report`'s answer, by kind."""
    variants: Mapping[str, Any] = route.get("variants") or {}
    latency = {
        name: ((v.get("latency_s") or {}).get("total") or {}).get("quantiles") or []
        for name, v in variants.items()
    }
    costs: list[Bar] = []
    for name, v in variants.items():
        i = v.get("cost_per_1k_requests_usd") or {}
        costs.append((name, i.get("estimate"), i.get("low"), i.get("high")))
    title = f"{route_name}: cost per 1,000 requests (95% CI)"
    return {
        "latency": _safe(
            f"{route_name}: total latency of successes", latency_distribution, latency
        ),
        "cost-per-1k": _safe(
            title,
            lambda t, bars: interval_bars(t, bars, unit="USD per 1,000 requests", fmt=usd),
            costs,
        ),
        "break-even": _safe(
            f"{route_name}: cost per hour against traffic",
            lambda t, rows: break_even_chart(t, rows, current_rate=route.get("requests_per_hour")),
            route.get("break_even") or [],
        ),
    }


def _safe(title: str, draw: Callable[[str, Any], str], data: Any) -> str:
    """One chart; numbers too extreme to draw (finite, but past what a coordinate can hold)
    give a chart that says so instead of failing the whole page."""
    try:
        return draw(title, data)
    except (ValueError, OverflowError, ZeroDivisionError):
        return _no_data(title, "figures out of drawable range")


def file_stem(name: str) -> str:
    """`name` made safe as a file name: only [A-Za-z0-9_.-], no leading dot."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "route"


def report_charts(report: Mapping[str, Any]) -> dict[str, str]:
    """Every chart of a report, keyed by a file stem: `{route}-latency`, `{route}-cost-per-1k`,
    `{route}-break-even` (routes whose names sanitise alike get `-2`, `-3`, …)."""
    charts: dict[str, str] = {}
    taken: set[str] = set()
    for name, route in (report.get("routes") or {}).items():
        stem, n = file_stem(name), 2
        while stem in taken:
            stem, n = f"{file_stem(name)}-{n}", n + 1
        taken.add(stem)
        for kind, svg in route_charts(name, route).items():
            charts[f"{stem}-{kind}"] = svg
    return charts


def to_png(svg: str) -> bytes:
    """The SVG rasterised by resvg (the `charts` extra) on white, text in DejaVu Sans."""
    try:
        import resvg_py
    except ImportError:
        raise RuntimeError(PNG_MISSING) from None
    png = resvg_py.svg_to_bytes(
        svg_string=svg, background="#ffffff", sans_serif_family="DejaVu Sans"
    )
    return bytes(png)


def write_pngs(charts: Mapping[str, str], directory: Path) -> list[Path]:
    """Write `{stem}.png` per chart into `directory` (created if needed); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, svg in charts.items():
        path = directory / f"{file_stem(stem)}.png"
        path.write_bytes(to_png(svg))
        written.append(path)
    return written
