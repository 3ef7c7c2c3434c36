"""`make bench-soak`: 100,000 mixed requests through Turnout; does its memory settle?

Mix, per 10 requests: 5 non-streaming, 3 streaming (one of them asking for usage), 1 to a route
whose upstream model answers 500, and 1 stream that the client leaves at its first event (the
upstream paces that model's events, so the client really leaves mid-stream). Turnout runs as in
`make bench` (1,000 keys, a 2-variant split, metrics, memory records) but with a record ring of
5,000, so that the ring is full before the warm-up ends and growth after it means a leak.

Prints the gateway's RSS (VmRSS, /proc) at start, after the warm-up (10,000 requests) and
after every further 10,000, then the growth after warm-up; exit 1 when that is more than
SOAK_LIMIT_MB (20), when the gateway died, or when a request that should have succeeded did
not.

Run: .venv/bin/python -m bench.soak   Env: SOAK_REQUESTS (100000), SOAK_WARMUP (10000),
SOAK_CONCURRENCY (16), SOAK_LIMIT_MB (20).
"""

from __future__ import annotations

import collections
import os
import sys
import time

from rich.console import Console

from bench.client import Kind, request_bytes, run_load
from bench.systems import HOST, ROUTE, Unavailable, cpus, fast_upstream, started, workdir

RECORDS = 5_000
STEP = 10_000
console = Console(highlight=False)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, "") or default)


def kinds(port: int, key: str | None) -> list[Kind]:
    def make(model: str, stream: bool = False, include_usage: bool = False) -> bytes:
        return request_bytes(
            HOST, port, model, api_key=key, stream=stream, include_usage=include_usage
        )

    plain = Kind("plain", make(ROUTE))
    stream = Kind("stream", make(ROUTE, stream=True), stream=True)
    usage = Kind("stream+usage", make(ROUTE, stream=True, include_usage=True), stream=True)
    error = Kind("upstream-500", make("broken"))
    leave = Kind("leave-mid-stream", make("slow", stream=True), True, True)
    return [plain, stream, plain, usage, error, plain, stream, plain, leave, plain]


def main() -> int:
    total = _env_int("SOAK_REQUESTS", 100_000)
    warmup = min(total, _env_int("SOAK_WARMUP", 10_000))
    concurrency = _env_int("SOAK_CONCURRENCY", 16)
    limit_mb = float(os.environ.get("SOAK_LIMIT_MB", "") or 20)
    gateway_cpu, load_cpu = cpus()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    console.print(
        f"[bold]Turnout soak[/]: {total:,} requests at concurrency {concurrency} "
        f"(warm-up {warmup:,}); fail when RSS grows more than {limit_mb:g} MB after warm-up"
    )
    outcomes: collections.Counter[tuple[str, int]] = collections.Counter()
    failed = 0
    started_at = time.monotonic()
    with workdir() as work, fast_upstream(load_cpu, work) as upstream_port:
        try:
            context = started("turnout", upstream_port, gateway_cpu, work, RECORDS)
            with context as running:
                assert running.process is not None
                mix = kinds(running.port, running.api_key)
                readings: list[tuple[int, float]] = []

                def reading(done: int, label: str) -> None:
                    found = running.memory()
                    assert found is not None
                    readings.append((done, found.rss_mb))
                    console.print(
                        f"  {label:>16}: RSS {found.rss_mb:7.1f} MB (peak {found.peak_mb:.1f} MB)"
                        f"  [{time.monotonic() - started_at:5.0f} s]"
                    )

                reading(0, "start")
                done = 0
                while done < total:
                    step = warmup if done == 0 else min(STEP, total - done)
                    result = run_load(HOST, running.port, mix, concurrency=concurrency, count=step)
                    outcomes.update(result.by_kind)
                    failed += result.failed
                    done += step
                    if running.process.poll() is not None:
                        console.print(f"[red]the gateway exited ({running.process.returncode})")
                        return 1
                    reading(done, "after warm-up" if done == warmup else f"after {done:,}")
        except Unavailable as exc:
            console.print(f"[red]turnout did not start: {exc}[/]")
            return 1

    console.print("outcomes (kind: status → count; status 0 = the client left on purpose):")
    for (kind, status), count in sorted(outcomes.items()):
        console.print(f"  {kind:>16}: {status} → {count:,}")
    unexpected = sum(
        n
        for (kind, status), n in outcomes.items()
        if kind in ("plain", "stream", "stream+usage") and status != 200
    )
    warm_rss = next(rss for n, rss in readings if n == warmup)
    growth = readings[-1][1] - warm_rss
    console.print(
        f"RSS: start {readings[0][1]:.1f} MB, after warm-up {warm_rss:.1f} MB, end "
        f"{readings[-1][1]:.1f} MB; growth after warm-up {growth:+.1f} MB "
        f"(limit {limit_mb:g} MB); {time.monotonic() - started_at:.0f} s"
    )
    ok = True
    if failed:
        console.print(f"[yellow]{failed} connections were lost before an answer ended[/]")
    if unexpected:
        console.print(f"[red]FAIL: {unexpected} requests that should have succeeded did not[/]")
        ok = False
    if growth > limit_mb:
        console.print(f"[red]FAIL: RSS grew {growth:.1f} MB after warm-up (> {limit_mb:g} MB)[/]")
        ok = False
    if ok:
        console.print("[green]ok[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
