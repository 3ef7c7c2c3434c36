"""SVG charts of the report: well-formed, escaped, finite, one series per variant, markers
where the numbers say, and PNG through resvg."""

from __future__ import annotations

import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gateway import charts

SVG = "{http://www.w3.org/2000/svg}"
NASTY = '<b>&"x'
QUANTILES = [0.1 + 0.01 * i for i in range(21)]
COORDINATES = {"x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "r", "width", "height"}


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img"
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    assert root[0].tag == f"{SVG}title" and root[0].text
    assert "DejaVu Sans" in (root.get("font-family") or "")
    for element in root.iter():
        for name, value in element.attrib.items():
            if name in COORDINATES:
                assert math.isfinite(float(value)), (name, value)
        for number in re.findall(r"-?[\d.]+", element.get("points", "")):
            assert math.isfinite(float(number))
    lowered = svg.lower()
    assert "nan" not in lowered and "inf" not in lowered
    return root


def _series(root: ET.Element) -> list[str]:
    return [e.get("data-series", "") for e in root.iter() if e.get("class") == "series"]


def _axis(root: ET.Element, which: str) -> tuple[float, float]:
    """(pixels per unit, pixel of 0) of an axis, read back from its tick labels."""
    ticks = [(float(e.get("data-value", "")), float(e.get(which[0], "")))
             for e in root.iter() if e.get("class") == f"{which}tick"]  # fmt: skip
    (v0, p0), (v1, p1) = ticks[0], ticks[-1]
    scale = (p1 - p0) / (v1 - v0)
    return scale, p0 - v0 * scale


def test_latency_distribution_draws_each_variant_escaped() -> None:
    series: dict[str, list[float | None]] = {
        "ft": [*QUANTILES],
        NASTY: [2 * q for q in QUANTILES],
        "empty": [None] * 21,
    }
    svg = charts.latency_distribution("latency of <route>", series)
    root = _parse(svg)
    assert _series(root) == ["ft", NASTY]  # the empty variant has a legend row, no curve
    assert NASTY not in svg and "&lt;b&gt;&amp;&quot;x" in svg
    legend = " ".join("".join(g.itertext()) for g in root.iter() if g.get("class") == "legend")
    assert "empty: no data" in legend and "ms" in legend  # under a second: milliseconds
    assert root[0].text == "latency of <route>"


def test_latency_skips_non_finite_values_and_cuts_a_long_tail() -> None:
    values: list[float | None] = [*QUANTILES[:20], 50.0]
    values[3], values[4] = math.nan, math.inf
    root = _parse(charts.latency_distribution("t", {"a": values}))
    scale, zero = _axis(root, "x")
    (curve,) = (e for e in root.iter() if e.get("class") == "series")
    xs = [float(p.split(",")[0]) for p in (curve.get("points") or "").split()]
    assert max((x - zero) / scale for x in xs) < 1000  # ms: cut well below the 50 s maximum
    assert "beyond the axis" in ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize(
    "svg",
    [
        charts.latency_distribution("t", {}),
        charts.latency_distribution("t", {"a": [None] * 21, "b": []}),
        charts.interval_bars("t", []),
        charts.interval_bars("t", [("a", None, None, None), ("b", math.nan, None, None)]),
        charts.break_even_chart("t", [], current_rate=None),
    ],
)
def test_empty_data_says_so(svg: str) -> None:
    root = _parse(svg)
    assert any(e.get("class") == "no-data" for e in root.iter())


def test_interval_bars_one_bar_and_interval_per_label() -> None:
    bars = [("ft", 0.3, 0.25, 0.35), (NASTY, -0.2, -0.3, -0.1), ("none", None, None, None)]
    svg = charts.interval_bars("cost", bars, unit="USD", fmt=charts.usd)
    root = _parse(svg)
    assert _series(root) == ["ft", NASTY]
    assert sum(1 for e in root.iter() if e.get("class") == "interval") == 2
    text = "".join(root.itertext())
    assert "$0.30  [$0.25, $0.35]" in text and "-$0.20" in text and "no data" in text
    scale, zero = _axis(root, "x")
    (first, _) = (e for e in root.iter() if e.get("class") == "series")
    assert float(first.get("x", "")) == pytest.approx(zero, abs=0.1)
    assert float(first.get("width", "")) == pytest.approx(0.3 * scale, abs=0.2)


def test_break_even_marks_the_crossing_and_today() -> None:
    entries = [
        {"fine_tuned": "ft", "hosted": "gpt", "fleet_usd_per_hour": 4.0,
         "hosted_cost_per_request_usd": 0.002, "break_even_requests_per_hour": 2000.0},
        {"fine_tuned": "ft", "hosted": "free", "fleet_usd_per_hour": 4.0,
         "hosted_cost_per_request_usd": 0.0, "break_even_requests_per_hour": None},
    ]  # fmt: skip
    root = _parse(charts.break_even_chart("be", entries, current_rate=500.0))
    assert _series(root) == ["gpt", "free", "ft"]
    x_scale, x_zero = _axis(root, "x")
    y_scale, y_zero = _axis(root, "y")
    (dot,) = (e for e in root.iter() if e.get("class") == "break-even")
    assert (float(dot.get("cx", "")) - x_zero) / x_scale == pytest.approx(2000, abs=5)
    assert (float(dot.get("cy", "")) - y_zero) / y_scale == pytest.approx(4.0, abs=0.02)
    (today,) = (e for e in root.iter() if e.get("class") == "current-rate")
    assert (float(today.get("x1", "")) - x_zero) / x_scale == pytest.approx(500, abs=5)
    ticks = [float(e.get("data-value", "")) for e in root.iter() if e.get("class") == "xtick"]
    assert 4000 <= ticks[-1] <= 5000  # about twice the larger of crossing and today
    text = "".join(root.itertext())
    assert "today: 500 req/h" in text and "ft vs free: never breaks even" in text


def test_break_even_fleet_steps_per_replica_never_below_the_fleet() -> None:
    entry = {
        "fine_tuned": "ft", "hosted": "gpt", "fleet_usd_per_hour": 4.0, "replicas": 2,
        "hosted_cost_per_request_usd": 0.002, "break_even_requests_per_hour": 2000.0,
        "capacity_requests_per_hour": 900.0,
    }  # fmt: skip
    root = _parse(charts.break_even_chart("be", [entry], current_rate=1500.0))
    y_scale, y_zero = _axis(root, "y")
    x_scale, x_zero = _axis(root, "x")
    fleet = next(e for e in root.iter() if e.get("data-series") == "ft")
    points = [tuple(map(float, p.split(","))) for p in (fleet.get("points") or "").split()]
    costs = [((x - x_zero) / x_scale, (y - y_zero) / y_scale) for x, y in points]
    assert min(c for _, c in costs) == pytest.approx(4.0, abs=0.02)  # two replicas at least
    for rate, cost in costs:  # ceil(rate / 900) replicas at $2 each, from 1,800 req/h on
        assert cost == pytest.approx(4.0, abs=0.02) or cost >= 2 * math.floor(rate / 900) - 0.1
    assert max(c for _, c in costs) == pytest.approx(2 * math.ceil(4000 / 900), abs=0.05)


@pytest.mark.parametrize("rate", [None, 0.0, math.inf, math.nan])
def test_break_even_without_crossing_or_rate_stays_finite(rate: float | None) -> None:
    entry = {
        "fine_tuned": "ft", "hosted": "h", "fleet_usd_per_hour": 1.0,
        "hosted_cost_per_request_usd": 0.0, "break_even_requests_per_hour": math.inf,
    }  # fmt: skip
    root = _parse(charts.break_even_chart("be", [entry], current_rate=rate))
    assert not any(e.get("class") == "current-rate" for e in root.iter())


def test_nice_ticks_and_labels() -> None:
    assert charts.nice_ticks(0, 7.3) == [0, 2, 4, 6, 8]
    assert charts.nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(0.0, 0.0123) == [0, 0.005, 0.01, 0.015]
    assert charts.tick_text(12000, 5000) == "12k" and charts.tick_text(0, 5000) == "0"
    assert charts.tick_text(0.25, 0.05) == "0.25" and charts.tick_text(750, 250) == "750"
    assert charts.usd(0.00006521) == "$0.00006521" and charts.usd(4.98) == "$4.98"
    assert charts.usd(0.3) == "$0.30" and charts.usd(-0.0012, signed=True) == "-$0.0012"
    assert charts.usd(1234.5) == "$1,234" and charts.usd(0.5, signed=True) == "+$0.50"


def test_report_charts_names_files_safely(tmp_path: Path) -> None:
    route = {"variants": {"a": {"latency_s": {"total": {"quantiles": QUANTILES}}}}}
    found = charts.report_charts({"routes": {"sup/port v1": route, "sup:port_v1": route}})
    assert list(found) == [
        "sup_port_v1-latency", "sup_port_v1-cost-per-1k", "sup_port_v1-break-even",
        "sup_port_v1-2-latency", "sup_port_v1-2-cost-per-1k", "sup_port_v1-2-break-even",
    ]  # fmt: skip
    written = charts.write_pngs(dict(list(found.items())[:3]), tmp_path / "png")
    assert [p.name for p in written] == [f"sup_port_v1-{k}.png" for k in
                                         ("latency", "cost-per-1k", "break-even")]  # fmt: skip
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    assert charts.file_stem("../etc") == "_etc"


def test_to_png_and_its_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    png = charts.to_png(charts.latency_distribution("t", {"a": QUANTILES}))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "resvg_py", None)
    with pytest.raises(RuntimeError, match=r"turnout\[charts\]"):
        charts.to_png("<svg/>")


def test_figures_past_drawable_range_give_a_chart_that_says_so() -> None:
    """A finite but huge estimate (1.7e308) overflows a coordinate: that chart says so, the
    others of the route still draw."""
    route = {
        "variants": {"a": {"cost_per_1k_requests_usd": {"estimate": 1.7e308, "low": 0.0,
                                                        "high": 1.7e308}}},
        "break_even": [],
        "requests_per_hour": 10.0,
    }  # fmt: skip
    drawn = charts.route_charts("r", route)
    assert "out of drawable range" in drawn["cost-per-1k"]
    for svg in drawn.values():
        ET.fromstring(svg)
