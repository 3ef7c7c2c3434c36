"""The experiment report (`gateway.report.build_report`'s answer) as one self-contained HTML
page: per route the verdict, the tables and the charts of `gateway.charts`, inline.

The page loads nothing: inline CSS and SVG, no script, and a Content-Security-Policy that
forbids fetching anything but `data:` images. Every text from the report is escaped; keys
the report may lack (shadow comparisons, feedback, capacities) are read with `.get`.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gateway.charts import route_charts, usd
from router.stats import finite

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
NA = '<span class="na">n/a</span>'
CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; color: #222; margin: 0 auto;
  max-width: 1120px; padding: 16px 24px 48px; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2.2em;
  border-bottom: 2px solid #ddd; padding-bottom: 4px; } h3 { margin: 1.4em 0 0.4em; }
.meta, .ci, .rule, .na { color: #666; } .ci { font-size: 0.85em; white-space: nowrap; }
.rule { font-size: 0.85em; margin-top: 8px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 5px 9px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; }
.verdict { border-left: 6px solid #0072B2; background: #f3f8fc; padding: 10px 16px; }
.verdict.keep { border-color: #666; background: #f6f6f6; }
.verdict.split { border-color: #E69F00; background: #fdf7ea; }
.decision { font-size: 1.35em; font-weight: bold; } dl { margin: 6px 0 0; }
dt { float: left; clear: left; width: 260px; color: #555; } dd { margin: 0 0 2px 270px; }
.warning { background: #fff3cd; border: 1px solid #e0c36a; padding: 6px 10px; margin-top: 8px; }
.yes { color: #0a6b3d; font-weight: bold; } .no { color: #666; }
.tag { font-size: 0.75em; background: #e8e8e8; border-radius: 3px; padding: 1px 5px; }
.charts svg { display: block; max-width: 100%; height: auto; margin: 14px 0; }
.how { background: #fafafa; border: 1px solid #e4e4e4; padding: 8px 16px; font-size: 0.92em; }
"""
HOW_TO_READ = """
<p>Each route splits its traffic between variants; the first is the <b>control</b>. Figures
in brackets are 95% confidence intervals: the range the true value lies in, given how many
requests were seen. A difference is <b>significant</b> when its interval leaves out zero.
Error rates count failures of the gateway or upstream (HTTP 5xx); latency and tokens are over
successful requests; cost per request includes failures. <b>Needed per arm</b> is how many
requests each variant needs to detect the route's minimum effect (10% by default) in mean
cost. <b>Break-even</b> is the traffic above which a fine-tuned fleet, paid by the hour,
costs less than a hosted model paid per request. Shadow requests and forced ones (offline
evaluations) are never counted in the figures above them.</p>
"""

Json = Mapping[str, Any]
Fmt = Callable[[float], str]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def pct(value: float, *, signed: bool = False) -> str:
    """A share as a percentage, finer below 1%."""
    sign = "+" if signed and value > 0 else ""
    return f"{sign}{value:.2%}" if 0 < abs(value) < 0.01 else f"{sign}{value:.1%}"


def seconds(value: float, *, signed: bool = False) -> str:
    """Seconds to three significant digits, in ms below one second."""
    sign = "+" if signed and value > 0 else ""
    if abs(value) < 1:
        return f"{sign}{value * 1000:.3g} ms"
    return f"{sign}{value:.3g} s"


def _fmt(value: object, fmt: Fmt) -> str:
    number = finite(value)
    return NA if number is None else _e(fmt(number))


def _interval(interval: object, fmt: Fmt) -> str:
    """'estimate [low, high]', or n/a."""
    if not isinstance(interval, Mapping) or finite(interval.get("estimate")) is None:
        return NA
    text = _fmt(interval["estimate"], fmt)
    low, high = finite(interval.get("low")), finite(interval.get("high"))
    if low is None or high is None:
        return text
    return f'{text} <span class="ci">[{_e(fmt(low))}, {_e(fmt(high))}]</span>'


def _difference(diff: object, fmt: Fmt) -> str:
    if not isinstance(diff, Mapping):
        return NA
    significant = diff.get("significant")
    mark = ""
    if isinstance(significant, bool):
        mark = '<br><span class="yes">significant</span>' if significant else ""
        mark = mark or '<br><span class="no">not significant</span>'
    return _interval(diff, fmt) + mark


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of already escaped cells; cells after the first are right-aligned."""
    top = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i else ""}>{c}</td>' for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><thead><tr>{top}</tr></thead><tbody>{body}</tbody></table>"


def _usd_signed(value: float) -> str:
    return usd(value, signed=True)


def _figure(key: str, value: object) -> str:
    """A verdict number, formatted by its name."""
    if isinstance(value, Mapping) and "estimate" in value:
        fmt: Fmt = _usd_signed if "usd" in key else seconds if key.endswith("_s") else str
        return _difference(value, fmt)
    number = finite(value)
    if number is None:
        return NA if value is None else _e(value)
    if "usd" in key:
        return _e(usd(number))
    if "ratio" in key:
        return _e(f"{number:.2f}x")
    return _e(f"{number:,.0f}" if number.is_integer() else f"{number:.4g}")


def _verdict(verdict: Json) -> str:
    decision = str(verdict.get("decision", "n/a"))
    kind = decision.split()[0] if decision.split() else "keep"
    numbers = verdict.get("numbers") or {}
    items = "".join(
        f"<dt>{_e(str(k).replace('_', ' '))}</dt><dd>{_figure(str(k), v)}</dd>"
        for k, v in numbers.items()
    )
    warning = verdict.get("warning")
    return (
        f'<div class="verdict {_e(kind)}"><div class="decision">verdict: {_e(decision)}</div>'
        + (f"<dl>{items}</dl>" if items else "")
        + (f'<div class="warning">warning: {_e(warning)}</div>' if warning else "")
        + (f'<div class="rule">rule: {_e(verdict["rule"])}</div>' if verdict.get("rule") else "")
        + "</div>"
    )


VARIANT_HEAD = [
    *("variant", "requests", "error rate", "p50 latency", "p95 latency", "TTFT p50"),
    "tokens per request<br>prompt · injected · completion",
    "cost per 1k requests",
]


def _variants(route: Json) -> str:
    control = route.get("control")
    rows = []
    for name, v in (route.get("variants") or {}).items():
        latency = v.get("latency_s") or {}
        total, ttft = latency.get("total") or {}, latency.get("ttft") or {}
        tokens = v.get("tokens_per_request") or {}
        kinds = ("client_prompt", "injected", "completion")
        counts = " · ".join(
            _fmt((tokens.get(k) or {}).get("estimate"), "{:,.0f}".format) for k in kinds
        )
        tag = ' <span class="tag">control</span>' if name == control else ""
        rows.append([
            _e(name) + tag,
            _fmt(v.get("requests"), "{:,.0f}".format),
            _interval(v.get("error_rate"), pct),
            _interval(total.get("p50"), seconds),
            _interval(total.get("p95"), seconds),
            _interval(ttft.get("p50"), seconds),
            counts,
            _interval(v.get("cost_per_1k_requests_usd"), usd),
        ])  # fmt: skip
    return _table(VARIANT_HEAD, rows)


def _pairwise(route: Json) -> str:
    rows = []
    for pair in route.get("pairwise") or []:
        needed = _fmt(pair.get("needed_per_arm"), "{:,.0f}".format)
        still = finite(pair.get("still_needed_per_arm"))
        if still:
            needed += f' <span class="ci">({still:,.0f} more)</span>'
        rows.append([
            f"{_e(pair.get('variant', '?'))} vs {_e(pair.get('control', '?'))}",
            _difference(pair.get("cost_per_request_usd"), _usd_signed),
            _difference(pair.get("latency_p50_total_s"), lambda x: seconds(x, signed=True)),
            _difference(pair.get("error_rate"), lambda x: pct(x, signed=True)),
            needed,
        ])  # fmt: skip
    if not rows:
        return '<p class="meta">No other variant to compare with the control.</p>'
    head = ["variant vs control", "cost per request", "p50 latency", "error rate",
            "needed per arm"]  # fmt: skip
    return _table(head, rows)


BREAK_EVEN_OPTIONAL = {
    "replicas": ("replicas", "{:,.0f}"),
    "capacity_requests_per_hour": ("capacity per replica, req/h", "{:,.0f}"),
    "fleet_capacity_requests_per_hour": ("fleet capacity, req/h", "{:,.0f}"),
    "within_capacity": ("crossing within capacity", ""),
}


def _yes_no(value: object) -> str:
    if isinstance(value, bool):
        return '<span class="yes">yes</span>' if value else '<span class="no">no</span>'
    return NA


def _break_even(route: Json) -> str:
    entries = route.get("break_even") or []
    if not entries:
        return '<p class="meta">No fine-tuned variant with a GPU cost on this route.</p>'
    extra = [k for k in BREAK_EVEN_OPTIONAL if any(e.get(k) is not None for e in entries)]
    head = ["fine-tuned", "hosted", "fleet per hour", "hosted per request",
            "break-even, req/h", "today, req/h", "fleet cheaper now"]  # fmt: skip
    head += [BREAK_EVEN_OPTIONAL[k][0] for k in extra]
    rows = []
    for e in entries:
        crossing = finite(e.get("break_even_requests_per_hour"))
        row = [
            _e(e.get("fine_tuned", "?")),
            _e(e.get("hosted", "?")),
            _fmt(e.get("fleet_usd_per_hour"), usd),
            _fmt(e.get("hosted_cost_per_request_usd"), usd),
            "never" if crossing is None else _e(f"{crossing:,.0f}"),
            _fmt(e.get("current_requests_per_hour"), "{:,.1f}".format),
            _yes_no(e.get("fleet_cheaper_now")),
        ]
        for key in extra:
            pattern = BREAK_EVEN_OPTIONAL[key][1]
            row.append(_fmt(e.get(key), pattern.format) if pattern else _yes_no(e.get(key)))
        rows.append(row)
    return _table(head, rows)


def _shadow(route: Json) -> str:
    comparisons = route.get("shadow")
    if not comparisons:
        return ""
    rows = [
        [
            f"{_e(s.get('primary', '?'))} &rarr; {_e(s.get('shadow', '?'))}",
            _fmt(s.get("pairs"), "{:,.0f}".format),
            _fmt(s.get("shadow_errors"), "{:,.0f}".format),
            _interval(s.get("agreement"), pct),
            _interval(s.get("latency_delta_s"), lambda x: seconds(x, signed=True)),
            _interval(s.get("cost_delta_usd"), _usd_signed),
        ]
        for s in comparisons
        if isinstance(s, Mapping)
    ]
    head = ["primary &rarr; shadow", "pairs", "shadow errors", "agreement",
            "latency, shadow - primary", "cost, shadow - primary"]  # fmt: skip
    return "<h3>Shadow comparisons</h3>" + _table(head, rows)


def _feedback(route: Json) -> str:
    """Per variant and metric: n, the mean (a rate for yes/no metrics), the difference with
    the control and whether it is significantly better in the metric's direction."""
    against = {p.get("variant"): p.get("feedback") or {} for p in route.get("pairwise") or []}
    rows = []
    for name, v in (route.get("variants") or {}).items():
        for metric, figures in (v.get("feedback") or {}).items():
            figures = figures if isinstance(figures, Mapping) else {}
            diff = against.get(name, {}).get(metric)
            better = _yes_no(diff.get("better")) if isinstance(diff, Mapping) else ""
            rows.append([
                _e(name), _e(metric), _fmt(figures.get("n"), "{:,.0f}".format),
                _interval(figures.get("mean"), "{:.3g}".format),
                _interval(diff, "{:+.3g}".format) if diff else "", better,
            ])  # fmt: skip
    if not rows:
        return ""
    head = ["variant", "metric", "n", "mean", "vs control", "better"]
    return "<h3>Feedback</h3>" + _table(head, rows)


def _route(index: int, name: str, route: Json) -> str:
    facts = [
        f"control <b>{_e(route.get('control', '?'))}</b>",
        f"{_fmt(route.get('requests'), '{:,.0f}'.format)} requests",
        f"{_fmt(route.get('requests_per_hour'), '{:,.1f}'.format)} per hour",
        f"over {_fmt(route.get('window_hours'), '{:,.2f}'.format)} h",
        f"{_fmt(route.get('shadow_records_excluded'), '{:,.0f}'.format)} shadow records left out",
    ]
    if route.get("forced_records_excluded"):
        facts.append(f"{_fmt(route['forced_records_excluded'], '{:,.0f}'.format)} forced left out")
    charts = "".join(route_charts(name, route).values())
    return (
        f'<section id="route-{index}"><h2>Route {_e(name)}</h2>'
        f'<p class="meta">{" · ".join(facts)}</p>'
        + _verdict(route.get("verdict") or {})
        + "<h3>Variants</h3>" + _variants(route)
        + "<h3>Against the control</h3>" + _pairwise(route)
        + "<h3>Break-even</h3>" + _break_even(route)
        + _shadow(route) + _feedback(route)
        + f'<div class="charts">{charts}</div></section>'
    )  # fmt: skip


def _when(value: object) -> str:
    stamp = finite(value)
    if stamp is None:
        return "n/a"
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def render_html(report: Mapping[str, Any]) -> str:
    """One HTML5 page with every route of the report: verdict, tables, charts."""
    routes: Mapping[str, Json] = report.get("routes") or {}
    level = finite(report.get("level"))
    meta = [f"generated {_e(_when(report.get('generated_at')))}"]
    meta.append(f"seed {_e(report.get('seed', 'n/a'))}")
    meta.append(f"intervals at {level:.0%}" if level is not None else "")
    nav = " · ".join(f'<a href="#route-{i}">{_e(name)}</a>' for i, name in enumerate(routes))
    sections = "".join(_route(i, name, route) for i, (name, route) in enumerate(routes.items()))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,"><title>Turnout experiment report</title>'
        f"<style>{CSS}</style></head><body><h1>Turnout experiment report</h1>"
        f'<p class="meta">{" · ".join(m for m in meta if m)}</p>'
        + (f'<p class="meta">routes: {nav}</p>' if len(routes) > 1 else "")
        + f'<div class="how"><b>How to read this</b>{HOW_TO_READ}</div>'
        + (sections or '<p class="meta">No routes in this report.</p>')
        + "</body></html>\n"
    )  # fmt: skip
