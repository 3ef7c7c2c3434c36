"""`make bench`: Turnout side by side with direct calls and with peers, on one machine.

The gateway under test runs on core 0 (`taskset -c 0`); the fast upstream (bench/upstream.py)
and the load generator (wrk for non-streaming levels when installed, else bench/client.py;
always bench/client.py for streams) share core 1. Every system gets the same levels:

- non-streaming, concurrency 1, 16, 64: req/s, p50, p99 (BENCH_SECONDS each, default 10);
- streaming (20 content chunks), concurrency 1 and 16: time to the first data event, data
  events per second, and whether the relayed bytes equal the upstream's (BENCH_SECONDS / 2);
- the gateway's peak RSS (VmHWM from /proc, summed over its process tree).

Each system is measured BENCH_RUNS times (default 3) in a row and every figure is the median of
its runs (each run's figures are kept in the JSON). Added latency = the system's p50 - direct
p50 at the same level. Results: a table, ratios, and bench/results/bench-<timestamp>.json.

Run: .venv/bin/python -m bench.run [--seconds S] [--runs N] [--systems direct,turnout,...]
[--client wrk]
Env: BENCH_SECONDS, BENCH_RUNS, BENCH_SYSTEMS, BENCH_CLIENT (wrk|python), BENCH_CPUS ("0,1"),
BENCH_PEERS_ENV (default ~/.cache/turnout/bench-peers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import wrk
from bench.client import Kind, LoadResult, request_bytes, run_load
from bench.systems import (
    HOST,
    SYSTEMS,
    Running,
    Unavailable,
    cpus,
    fast_upstream,
    peers_installed,
    started,
    workdir,
)

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (1, 16, 64)
STREAM_LEVELS = (1, 16)
CHUNKS = 20
MIN_REQUESTS = 30  # per level with bench/client.py: a slow system gets up to 3 x the time
UPSTREAM_HEADROOM = 3.0  # direct c=16 must be this many times the fastest gateway's rate

# A wide table: when not a terminal (make, a log file) rich would fold it to 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "loadavg_at_start": [float(x) for x in load],
    }


def command_line() -> str:
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_")]
    argv = [Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]
    return " ".join([*env, *argv])


# ---------------------------------------------------------------- measuring one system


def _print_level(name: str, label: str, summary: dict[str, Any]) -> None:
    extra = ""
    if summary.get("first_event_p50_ms") is not None:
        extra = (
            f", first event p50 {summary['first_event_p50_ms']:.2f} ms, "
            f"{summary['events_per_s']:,.0f} events/s"
        )
    errors = f", [red]{summary['errors']} errors[/]" if summary.get("errors") else ""
    p50, p99 = summary.get("p50_ms"), summary.get("p99_ms")
    latency = "" if p50 is None or p99 is None else f", p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    console.print(f"  {name} {label}: {summary['rate']:,.0f} req/s{latency}{extra}{errors}")


def _stream_summary(result: LoadResult) -> dict[str, Any]:
    summary = result.summary()
    summary["client"] = "python"
    summary["byte_identical"] = result.identical > 0 and result.different == 0
    if result.first_difference is not None:
        summary["first_difference"] = result.first_difference[:600].decode(errors="replace")
    return summary


def measure(
    running: Running,
    seconds: float,
    client: str,
    cpu: int | None,
    reference: bytes | None,
) -> dict[str, Any]:
    """Every level against one started system."""
    port, model, key = running.port, running.model, running.api_key
    plain = request_bytes(HOST, port, model, api_key=key)
    streamed = request_bytes(HOST, port, model, api_key=key, stream=True)
    body = plain.split(b"\r\n\r\n", 1)[1]
    stream_seconds = max(1.0, seconds / 2)
    # Warm-up: connections, caches, first-call paths (not recorded).
    run_load(HOST, port, [Kind("plain", plain)], concurrency=16, seconds=min(1.0, seconds))
    run_load(HOST, port, [Kind("stream", streamed, stream=True)], concurrency=4, seconds=0.5)
    levels: dict[str, Any] = {}
    for concurrency in LEVELS:
        if client == "wrk":
            summary = wrk.run_wrk(HOST, port, body, key, concurrency, seconds, cpu)
        else:
            loaded = run_load(
                HOST,
                port,
                [Kind("plain", plain)],
                concurrency=concurrency,
                seconds=seconds,
                min_requests=MIN_REQUESTS,
            )
            summary = loaded.summary() | {"client": "python"}
        levels[f"c{concurrency}"] = summary
        _print_level(running.name, f"c={concurrency}", summary)
    streams: dict[str, Any] = {}
    for concurrency in STREAM_LEVELS:
        result = run_load(
            HOST,
            port,
            [Kind("stream", streamed, stream=True)],
            concurrency=concurrency,
            seconds=stream_seconds,
            reference=reference,
            min_requests=MIN_REQUESTS,
        )
        streams[f"c{concurrency}"] = _stream_summary(result)
        if reference is None and result.first_body is not None:
            streams["reference"] = result.first_body.decode(errors="replace")
        _print_level(running.name, f"stream c={concurrency}", streams[f"c{concurrency}"])
    found = running.memory()
    return {
        "status": "ok",
        "version": running.version,
        "notes": running.notes,
        "levels": levels,
        "stream": streams,
        "rss_mb": None if found is None else round(found.rss_mb, 1),
        "peak_rss_mb": None if found is None else round(found.peak_mb, 1),
        "processes": None if found is None else found.processes,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs: numbers are the median of the runs' values, flags hold
    only if they held in every run, anything else is the first run's."""

    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, bool):
            return all(v is True for v in values)
        if isinstance(first, int | float):
            numbers = [v for v in values if isinstance(v, int | float)]
            return statistics.median(numbers) if len(numbers) == len(values) else None
        if isinstance(first, dict):
            keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
            return {k: merge([v.get(k) if isinstance(v, dict) else None for v in values])
                    for k in keys}  # fmt: skip
        return first

    merged: dict[str, Any] = merge(runs)
    merged["runs"] = len(runs)
    merged["each_run"] = [{k: r[k] for k in ("levels", "stream") if k in r} for r in runs]
    return merged


# ---------------------------------------------------------------- derived numbers and output


def _get(result: dict[str, Any], *path: str) -> Any:
    current: Any = result
    for part in path:
        if not isinstance(current, dict) or part not in current:
            return None
        current = current[part]
    return current


def derive(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Added latencies (vs direct), Turnout/peer ratios, the upstream's headroom."""
    direct = results.get("direct", {})
    for result in results.values():
        if result.get("status") != "ok":
            continue
        added: dict[str, float | None] = {}
        for level in LEVELS:
            mine, base = _get(result, "levels", f"c{level}", "p50_ms"), None
            base = _get(direct, "levels", f"c{level}", "p50_ms")
            added[f"p50_c{level}_ms"] = None if mine is None or base is None else mine - base
        for level in STREAM_LEVELS:
            mine = _get(result, "stream", f"c{level}", "first_event_p50_ms")
            base = _get(direct, "stream", f"c{level}", "first_event_p50_ms")
            added[f"ttft_p50_c{level}_ms"] = None if mine is None or base is None else mine - base
        result["added"] = added
    gateways = {n: r for n, r in results.items() if n != "direct" and r.get("status") == "ok"}

    def headroom(*path: str) -> dict[str, Any]:
        fastest = max((_get(r, *path) or 0.0 for r in gateways.values()), default=0.0)
        base = _get(direct, *path) or 0.0
        return {
            "direct": base,
            "fastest_gateway": fastest,
            "ratio": base / fastest if fastest else None,
            "ok": (base >= UPSTREAM_HEADROOM * fastest) if fastest else None,
        }

    derived: dict[str, Any] = {
        "headroom": {
            "c16_rate": headroom("levels", "c16", "rate"),
            "stream_c16_events": headroom("stream", "c16", "events_per_s"),
        }
    }
    ratios: dict[str, dict[str, float | None]] = {}
    for ours in ("turnout", "turnout-granian"):
        if ours not in gateways:
            continue
        for peer in ("litellm", "vllm-router"):
            if peer not in gateways:
                continue
            rate_ours = _get(gateways[ours], "levels", "c16", "rate")
            rate_peer = _get(gateways[peer], "levels", "c16", "rate")
            added_ours = _get(gateways[ours], "added", "p50_c1_ms")
            added_peer = _get(gateways[peer], "added", "p50_c1_ms")
            ratios[f"{ours}/{peer}"] = {
                "c16_rate": rate_ours / rate_peer if rate_ours and rate_peer else None,
                "added_p50_c1": (
                    added_ours / added_peer if added_ours is not None and added_peer else None
                ),
            }
    derived["ratios"] = ratios
    return derived


def _num(value: float | None, fmt: str = ",.0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{suffix}"


def print_table(results: dict[str, dict[str, Any]], derived: dict[str, Any]) -> None:
    table = Table(title="Turnout side by side (gateway on core 0; upstream + load on core 1)")
    columns = (
        "system",
        "c=1 req/s",
        "added p50 @c=1",
        "p99 @c=1",
        "c=16 req/s",
        "c=64 req/s",
        "stream added TTFT p50 @c=1",
        "chunks/s @c=16",
        "byte-identical",
        "peak RSS",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, result in results.items():
        if result.get("status") != "ok":
            reason = str(result.get("reason", "not measured"))
            table.add_row(name, f"[yellow]not measured: {reason}[/]", *[""] * (len(columns) - 2))
            continue
        is_direct = name == "direct"
        identical = [_get(result, "stream", c, "byte_identical") for c in ("c1", "c16")]
        table.add_row(
            f"{name} {result.get('version', '')}".strip(),
            _num(_get(result, "levels", "c1", "rate")),
            "(baseline)" if is_direct else _num(_get(result, "added", "p50_c1_ms"), ".2f", " ms"),
            _num(_get(result, "levels", "c1", "p99_ms"), ".2f", " ms"),
            _num(_get(result, "levels", "c16", "rate")),
            _num(_get(result, "levels", "c64", "rate")),
            "(baseline)"
            if is_direct
            else _num(_get(result, "added", "ttft_p50_c1_ms"), ".2f", " ms"),
            _num(_get(result, "stream", "c16", "events_per_s")),
            "(reference)" if is_direct else ("yes" if all(identical) else "no"),
            "—" if is_direct else _num(result.get("peak_rss_mb"), ".0f", " MB"),
        )
    console.print(table)

    detail = Table(title="Every level (p50 / p99 in ms; errors)")
    detail.add_column("system")
    for level in LEVELS:
        detail.add_column(f"c={level}", justify="right")
    for level in STREAM_LEVELS:
        detail.add_column(f"stream c={level} (TTFT)", justify="right")
    for name, result in results.items():
        if result.get("status") != "ok":
            continue
        cells = []
        for level in LEVELS:
            found = _get(result, "levels", f"c{level}") or {}
            errors = f" [red]{found['errors']} err[/]" if found.get("errors") else ""
            cells.append(
                f"{_num(found.get('rate'))}/s {_num(found.get('p50_ms'), '.2f')} / "
                f"{_num(found.get('p99_ms'), '.2f')}{errors}"
            )
        for level in STREAM_LEVELS:
            found = _get(result, "stream", f"c{level}") or {}
            errors = f" [red]{found['errors']} err[/]" if found.get("errors") else ""
            cells.append(
                f"{_num(found.get('rate'))}/s {_num(found.get('first_event_p50_ms'), '.2f')} / "
                f"{_num(found.get('first_event_p99_ms'), '.2f')}{errors}"
            )
        detail.add_row(name, *cells)
    console.print(detail)

    for pair, ratio in derived["ratios"].items():
        ours, peer = pair.split("/")
        console.print(
            f"{ours} / {peer}: c=16 throughput {_num(ratio['c16_rate'], '.2f', 'x')}, "
            f"added p50 @c=1 {_num(ratio['added_p50_c1'], '.2f', 'x')} (lower is better)"
        )
    for key, what in (
        ("c16_rate", "non-streaming req/s"),
        ("stream_c16_events", "streamed events/s"),
    ):
        found = derived["headroom"][key]
        if found["ratio"] is None:
            continue
        line = (
            f"fast upstream + load generator ceiling (direct, c=16): {found['direct']:,.0f} "
            f"{what} = {found['ratio']:.1f}x the fastest gateway"
        )
        if found["ok"]:
            console.print(f"[green]{line} (≥ {UPSTREAM_HEADROOM:.0f}x: ok)[/]")
        else:
            console.print(
                f"[red]warning: {line}: below {UPSTREAM_HEADROOM:.0f}x, the upstream or the "
                "load generator may be what limits the gateways' numbers[/]"
            )


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", "10") or 10)
    )
    parser.add_argument(
        "--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "3") or 3), help="median of"
    )
    parser.add_argument("--systems", default=os.environ.get("BENCH_SYSTEMS", ""))
    parser.add_argument("--client", default=os.environ.get("BENCH_CLIENT", ""))
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: results/)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    started_at = time.monotonic()
    names = [n.strip() for n in args.systems.split(",") if n.strip()] or [
        "turnout",
        *peers_installed(),
    ]
    names = ["direct", *[n for n in names if n != "direct"]]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        console.print(f"[red]unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
        return 2
    client = args.client or ("wrk" if wrk.available() else "python")
    if client == "wrk" and not wrk.available():
        console.print("[red]wrk is not installed (apt-get install wrk)[/]")
        return 2
    gateway_cpu, load_cpu = cpus()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # this process is the streaming load generator
    info = machine()
    console.print(
        f"[bold]Turnout bench[/]: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"load average {' '.join(map(str, info['loadavg_at_start']))}"
    )
    console.print(f"command: {command_line()}")
    if gateway_cpu is None:
        console.print("[yellow]warning: fewer than two usable cores: nothing is pinned[/]")
    if info["loadavg_at_start"] and info["loadavg_at_start"][0] > 0.5:
        console.print("[yellow]warning: the machine is not quiet (load average > 0.5)[/]")
    client_name = wrk.version() if client == "wrk" else "bench/client.py (uvloop, raw sockets)"
    console.print(
        f"systems: {', '.join(names)}; non-streaming load: {client_name}; streams: "
        f"bench/client.py; {args.seconds:g} s per level ({max(1.0, args.seconds / 2):g} s "
        f"per stream level); median of {max(1, args.runs)} run(s) per system"
    )

    results: dict[str, dict[str, Any]] = {}
    reference: bytes | None = None
    with workdir() as work, fast_upstream(load_cpu, work, CHUNKS) as upstream_port:
        for name in names:
            console.print(f"[bold]{name}[/]")
            try:
                with started(name, upstream_port, gateway_cpu, work) as running:
                    runs = []
                    for run in range(max(1, args.runs)):
                        if args.runs > 1:
                            console.print(f"  run {run + 1} of {args.runs}")
                        runs.append(measure(running, args.seconds, client, load_cpu, reference))
                    result = median_of(runs)
            except Unavailable as exc:
                console.print(f"  [yellow]{name}: not measured: {exc}[/]")
                results[name] = {"status": "unavailable", "reason": str(exc)}
                continue
            except (RuntimeError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                console.print(f"  [red]{name}: failed: {reason}[/]")
                results[name] = {"status": "failed", "reason": reason}
                continue
            if name == "direct":
                text = _get(result, "stream", "reference")
                reference = text.encode() if isinstance(text, str) else None
            results[name] = result

    derived = derive(results)
    print_table(results, derived)
    elapsed = time.monotonic() - started_at
    report = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": info,
        "settings": {
            "seconds": args.seconds,
            "runs": max(1, args.runs),
            "stream_seconds": max(1.0, args.seconds / 2),
            "levels": list(LEVELS),
            "stream_levels": list(STREAM_LEVELS),
            "stream_chunks": CHUNKS,
            "client": client,
            "cpus": {"gateway": gateway_cpu, "upstream_and_load": load_cpu},
        },
        "systems": results,
        "derived": derived,
        "elapsed_s": round(elapsed, 1),
    }
    output = args.output or RESULTS / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {output} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
