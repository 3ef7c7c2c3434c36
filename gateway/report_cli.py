"""`turnout report`: the experiment report from a running gateway or from a JSON-lines file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.charts import usd
from gateway.gateway import meters_for
from gateway.records import RequestRecord
from gateway.report import build_report
from gateway.settings import Settings

Json = dict[str, Any]


def from_gateway(url: str, admin_key_env: str, route: str | None, since: float | None) -> Json:
    """Ask a running gateway (admin key from the environment variable named)."""
    params: dict[str, str] = {}
    if route is not None:
        params["route"] = route
    if since is not None:
        params["since"] = str(since)
    key = os.environ.get(admin_key_env, "").strip()
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(
            url.rstrip("/") + "/turnout/report",
            params=params,
            headers=headers,
            timeout=60,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach the gateway: {exc}") from None
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text)
        raise RuntimeError(f"the gateway answered {response.status_code}: {message}")
    data: Json = response.json()
    return data


def from_file(path: Path, settings: Settings, route: str | None, since: float | None) -> Json:
    """Compute the report offline from records appended by `records.file`."""
    decoder = msgspec.json.Decoder(RequestRecord)
    with path.open("rb") as lines:
        records = [decoder.decode(line) for line in lines if line.strip()]
    routes: Mapping[str, Any] = settings.routes
    if route is not None:
        if route not in routes:
            raise RuntimeError(f"no route `{route}` in the configuration")
        routes = {route: routes[route]}
    fleets = {name: meter.figures() for name, meter in meters_for(settings).items()}
    return build_report(routes, records, settings.variants, fleets, since=since)


def render(console: Console, report: Json) -> None:
    """Per route: the variant table, then break-even, shadows and the verdict in a few lines."""
    for name, route in report["routes"].items():
        variants = route.get("variants", {})
        metrics = sorted({m for row in variants.values() for m in row.get("feedback", {})})
        table = Table(title=f"route {name}")
        columns = ["variant", "requests", "error rate", "p50 s", "p95 s", "cost / 1k req"]
        for column in [*columns, *metrics]:
            table.add_column(column, justify="right")
        for variant, row in variants.items():
            total = row["latency_s"]["total"]
            feedback = row.get("feedback", {})
            table.add_row(
                variant,
                str(row["requests"]),
                _fmt(row["error_rate"], "{:.1%}"),
                _fmt(total["p50"], "{:.3f}"),
                _fmt(total["p95"], "{:.3f}"),
                _fmt(row["cost_per_1k_requests_usd"], "${:.4f}"),
                *(_fmt(feedback.get(m, {}).get("mean"), "{:.3g}") for m in metrics),
            )
        console.print(table)
        for row in route.get("break_even", []):
            crossing, today = (
                row.get("break_even_requests_per_hour"),
                row.get("current_requests_per_hour"),
            )
            hosted = usd(row["hosted_cost_per_request_usd"])
            console.print(
                f"break-even {escape(row['fine_tuned'])} vs {escape(row['hosted'])}: fleet "
                f"${row['fleet_usd_per_hour']:.2f}/h, hosted {hosted}/request -> the fleet is "
                f"cheaper above {_rate(crossing)} requests/h (today {_rate(today)})"
            )
        for row in route.get("shadow", []):
            per_1k = {k: None if v is None else v * 1000 for k, v in row["cost_delta_usd"].items()}
            console.print(
                f"shadow {escape(row['primary'])} -> {escape(row['shadow'])}: {row['pairs']} "
                f"pairs, agreement {_fmt(row['agreement'], '{:.0%}')}, latency "
                f"{_fmt(row['latency_delta_s'], '{:+.3f}')} s, cost per 1k requests "
                f"{_fmt(per_1k, '{:+.4f}')} $"
            )
        verdict = route.get("verdict", {})
        numbers = ", ".join(f"{k} {_value(v)}" for k, v in verdict.get("numbers", {}).items())
        console.print(
            f"verdict: [bold]{escape(verdict.get('decision', '-'))}[/]  {escape(numbers)}"
        )
        if verdict.get("warning"):
            console.print(f"[yellow]warning: {verdict['warning']}[/]")


def _rate(value: float | None) -> str:
    return "never" if value is None else f"{value:,.0f}"


def _value(value: Any) -> str:
    """A verdict number: an interval, a float, or as it is."""
    if isinstance(value, dict):
        return _fmt(value, "{:.4g}")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt(interval: Json | None, pattern: str) -> str:
    if not interval or interval.get("estimate") is None:
        return "-"
    low, high = interval.get("low"), interval.get("high")
    text = pattern.format(interval["estimate"])
    if low is None or high is None:
        return text
    return f"{text} [{pattern.format(low)}, {pattern.format(high)}]"
