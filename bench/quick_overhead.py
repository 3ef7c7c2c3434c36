"""A quick look at Turnout's added latency: direct vs through the gateway, concurrency 1.

Not the benchmark of the performance issue: one process per side, a simple httpx loop.
Run: .venv/bin/python bench/quick_overhead.py
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

BIN = Path(sys.executable).parent
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _p50(url: str, model: str, n: int = 1000) -> tuple[float, float]:
    with httpx.Client() as client:
        body = dict(BODY, model=model)
        for _ in range(50):
            client.post(url, json=body)
        timings = []
        for _ in range(n):
            started = time.perf_counter()
            response = client.post(url, json=body)
            timings.append(time.perf_counter() - started)
            response.raise_for_status()
    return statistics.median(timings) * 1000, n / sum(timings)


def main() -> None:
    sim_port, gw_port = _free_port(), _free_port()
    config = {
        "upstreams": {"v": {"kind": "vllm", "urls": [f"http://127.0.0.1:{sim_port}"]}},
        "variants": {"ft": {"upstream": "v", "model": "m"}},
        "routes": {"r": {"split": {"ft": 1}}},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(config, file)
        file.flush()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        sim = subprocess.Popen(
            [BIN / "turnout", "simulate", "--port", str(sim_port), "--profile", "instant"], **quiet
        )
        gw = subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                BIN / "turnout",
                "serve",
                "-c",
                file.name,
                "--port",
                str(gw_port),
            ],
            **quiet,
        )
        try:
            time.sleep(4)
            direct = _p50(f"http://127.0.0.1:{sim_port}/v1/chat/completions", "m")
            through = _p50(f"http://127.0.0.1:{gw_port}/v1/chat/completions", "r")
        finally:
            gw.terminate()
            sim.terminate()
    print(
        f"direct p50 {direct[0]:.2f} ms ({direct[1]:.0f} req/s); through Turnout p50 "
        f"{through[0]:.2f} ms ({through[1]:.0f} req/s); added p50 {through[0] - direct[0]:.2f} ms"
    )


if __name__ == "__main__":
    main()
