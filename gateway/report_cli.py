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
    return build_report(routes, records, settings.variants, meters_for(settings), since=since)


def render(console: Console, report: Json) -> None:
    """One table per route: the figures that decide, then the verdict."""
    for name, route in report["routes"].items():
        table = Table(title=f"route {name}")
        for column in ("variant", "requests", "error rate", "p50 s", "cost / 1k req"):
            table.add_column(column, justify="right")
        for variant, row in route.get("variants", {}).items():
            table.add_row(
                variant,
                str(row["requests"]),
                _fmt(row["error_rate"], "{:.1%}"),
                _fmt(row["latency_s"]["total"]["p50"], "{:.3f}"),
                _fmt(row["cost_per_1k_requests_usd"], "${:.4f}"),
            )
        console.print(table)
        verdict = route.get("verdict", {})
        numbers = ", ".join(f"{k}={v}" for k, v in verdict.get("numbers", {}).items())
        console.print(
            f"verdict: [bold]{escape(verdict.get('decision', '-'))}[/]  {escape(numbers)}"
        )
        if verdict.get("warning"):
            console.print(f"[yellow]warning: {verdict['warning']}[/]")


def _fmt(interval: Json | None, pattern: str) -> str:
    if not interval or interval.get("estimate") is None:
        return "-"
    low, high = interval.get("low"), interval.get("high")
    text = pattern.format(interval["estimate"])
    if low is None or high is None:
        return text
    return f"{text} [{pattern.format(low)}, {pattern.format(high)}]"
