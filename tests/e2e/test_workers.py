"""`turnout serve --workers 2`: one scrape of /metrics counts the requests of every worker."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.processes import ROOT, TURNOUT, free_port, wait_ready

REQUESTS = 200
CONFIG = """\
upstreams:
  sim: {kind: simulated, ttft_ms: 0, tokens_per_s: 1000000, completion_tokens: 4}
variants:
  v: {upstream: sim, model: base}
routes:
  r: {split: {v: 1}}
"""


@dataclass
class Served:
    url: str
    tmp: Path  # the server's TMPDIR: its metrics directory is made in there
    proc: subprocess.Popen[str]


@pytest.fixture
def served_workers(tmp_path: Path) -> Iterator[Served]:
    config = tmp_path / "turnout.yaml"
    config.write_text(CONFIG)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [TURNOUT, "serve", "-c", str(config), "--workers", "2", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", tmp_path, proc)
    try:
        wait_ready(served.url, served.proc)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise


def _one_request(url: str) -> None:
    body = {"model": "r", "messages": [{"role": "user", "content": "hi"}]}
    # A fresh connection each time, so the kernel hands requests to either worker.
    response = httpx.post(url + "/v1/chat/completions", json=body, headers={"connection": "close"})
    assert response.status_code == 200, response.text


def _per_worker(metrics_dir: Path) -> dict[int, float]:
    """Requests counted in each worker's own file (named by its pid)."""
    counts: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(re.fullmatch(r"counter_(\d+)\.db", path.name).group(1))  # type: ignore[union-attr]
        for metric in MultiProcessCollector.merge([str(path)]):
            if metric.name == "turnout_requests":
                counts[pid] = sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return counts


def test_one_scrape_counts_every_worker(served_workers: Served) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(_one_request, [served_workers.url] * REQUESTS))

    scrape = httpx.get(served_workers.url + "/metrics")
    assert scrape.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    requests = families["turnout_requests"].samples
    assert {(s.labels["route"], s.labels["status_class"]) for s in requests} == {("r", "2xx")}
    assert sum(s.value for s in requests) == REQUESTS
    durations = families["turnout_request_duration_seconds"].samples
    assert sum(s.value for s in durations if s.name.endswith("_count")) == REQUESTS
    tokens = {s.labels["kind"]: s.value for s in families["turnout_tokens"].samples}
    assert tokens["completion"] == 4 * REQUESTS

    (metrics_dir,) = served_workers.tmp.glob("turnout-metrics-*")
    per_worker = _per_worker(metrics_dir)
    assert sum(per_worker.values()) == REQUESTS
    assert len(per_worker) == 2, f"one worker served everything: {per_worker}"

    served_workers.proc.send_signal(signal.SIGINT)
    output, _ = served_workers.proc.communicate(timeout=30)
    assert served_workers.proc.returncode == 0, output
    started = {int(pid) for pid in re.findall(r"serving routes .* \(pid (\d+)\)", output)}
    assert set(per_worker) <= started and len(started) == 2
    assert not metrics_dir.exists(), "the metrics directory outlived the server"
