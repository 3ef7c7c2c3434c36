"""Non-streaming levels with `wrk` (Debian's package) and bench/wrk_chat.lua, when installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.systems import pinned

SCRIPT = Path(__file__).with_name("wrk_chat.lua")
MARK = "BENCH_JSON "


def available() -> bool:
    return shutil.which("wrk") is not None


def version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split("Copyright")[0].strip() if first else "wrk"


def run_wrk(
    host: str,
    port: int,
    body: bytes,
    api_key: str | None,
    concurrency: int,
    seconds: float,
    cpu: int | None,
) -> dict[str, Any]:
    """One level: `wrk -t1 -cN` (one thread: the load core is shared with the upstream).
    Returns the same keys as LoadResult.summary() for the non-streaming columns."""
    env = dict(os.environ, BENCH_BODY=body.decode(), BENCH_AUTH=api_key or "")
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(SCRIPT),
        f"http://{host}:{port}/v1/chat/completions",
    ]
    done = subprocess.run(
        pinned(cpu, argv),
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 60,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout)[-300:]}")
    raw = json.loads(lines[-1][len(MARK) :])
    elapsed = raw["duration_us"] / 1e6
    errors = sum(v for k, v in raw.items() if k.startswith("errors_"))
    return {
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "requests": raw["requests"],
        "rate": round(raw["requests"] / elapsed, 1) if elapsed > 0 else 0.0,
        "errors": errors,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "client": "wrk",
        "wrk": raw,
    }
