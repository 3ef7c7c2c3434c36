"""The systems a benchmark measures, each started pinned to its core and stopped again.

- `direct`: the load generator talks to the fast upstream itself (the baseline).
- `turnout`: `turnout serve` (uvicorn, uvloop, httptools, 1 worker) with features on: 1,000
  configured client keys (sha256; the load uses the last one), a route with a 2-variant split
  (both to the fast upstream), metrics and request records (in memory).
- `turnout-granian`: the same app under granian (ASGI, uvloop, 1 worker), when installed.
- `litellm`: LiteLLM's proxy, one model pointing at the fast upstream, 1 worker, no database.
- `vllm-router`: vllm-router with `--worker-urls` the fast upstream (its default policy).

Peers come from a venv outside the checkout (`make bench-peers`, BENCH_PEERS_ENV).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PEERS_ENV = Path(
    os.environ.get("BENCH_PEERS_ENV", Path.home() / ".cache" / "turnout" / "bench-peers")
)
HOST = "127.0.0.1"
KEYS = 1000
UPSTREAM_MODEL = "m"  # what the load sends to the upstream and to the peers
ROUTE = "bench"  # Turnout's route: a 50/50 split of two variants, both model `m`
RECORDS_CAPACITY = 10_000  # full early in a run, so peak RSS does not depend on run length


def cpus() -> tuple[int | None, int | None]:
    """(gateway core, load core): 0 and 1 by default (BENCH_CPUS="0,1"), None when the
    machine has fewer than two usable cores (then nothing is pinned)."""
    wanted = os.environ.get("BENCH_CPUS", "0,1").split(",")
    gateway, load = int(wanted[0]), int(wanted[1])
    usable = os.sched_getaffinity(0)
    if gateway == load or gateway not in usable or load not in usable:
        return None, None
    return gateway, load


def pinned(cpu: int | None, argv: Sequence[str | Path]) -> list[str]:
    command = [str(a) for a in argv]
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def client_key(index: int) -> str:
    return f"sk-bench-{index:04d}"


LOAD_KEY = client_key(KEYS - 1)
LITELLM_KEY = "sk-bench-litellm"


class Unavailable(Exception):
    """A system that cannot be started here; the message is one line saying why."""


# ---------------------------------------------------------------- processes and memory


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found += [int(p) for p in text.split()]
    return found


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += _children(current)
    return pids


def _status_kb(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Memory:
    rss_mb: float  # VmRSS now, summed over the process tree
    peak_mb: float  # VmHWM (peak resident set), summed over the process tree
    processes: int


def memory(pid: int) -> Memory:
    pids = process_tree(pid)
    rss = sum(_status_kb(p, "VmRSS") for p in pids)
    peak = sum(_status_kb(p, "VmHWM") for p in pids)
    return Memory(rss / 1024, peak / 1024, len(pids))


@dataclass
class Running:
    """A started system: where to send the load and what to send."""

    name: str
    port: int
    model: str
    api_key: str | None
    process: subprocess.Popen[bytes] | None  # None for `direct`: nothing between
    version: str = ""
    notes: list[str] = field(default_factory=list)
    log: Path | None = None

    def memory(self) -> Memory | None:
        return None if self.process is None else memory(self.process.pid)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group we started, SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def _start(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # its own process group: stopped whole, by its id
        )


def _tail(log: Path, lines: int = 1) -> str:
    try:
        text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[:300]


def wait_answering(
    port: int,
    model: str,
    api_key: str | None,
    process: subprocess.Popen[bytes] | None,
    log: Path | None,
    timeout: float,
) -> None:
    """Until a chat request through `port` gets a 200 (raises Unavailable on exit/timeout)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    url = f"http://{HOST}:{port}/v1/chat/completions"
    give_up = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < give_up:
        if process is not None and process.poll() is not None:
            why = _tail(log) if log else ""
            raise Unavailable(f"exited with {process.returncode}: {why}".strip())
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:160]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    raise Unavailable(f"not answering after {timeout:.0f} s ({last})")


# ---------------------------------------------------------------- the fast upstream


@contextlib.contextmanager
def fast_upstream(cpu: int | None, workdir: Path, chunks: int = 20) -> Iterator[int]:
    port = free_port()
    log = workdir / "upstream.log"
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--chunks", str(chunks)]
    process = _start(pinned(cpu, argv), log)
    try:
        wait_answering(port, UPSTREAM_MODEL, None, process, log, timeout=15)
        yield port
    finally:
        _stop(process)


# ---------------------------------------------------------------- Turnout


def turnout_config(
    upstream_port: int, records_capacity: int = RECORDS_CAPACITY
) -> dict[str, object]:
    keys = [
        {"name": f"key-{i:04d}", "sha256": hashlib.sha256(client_key(i).encode()).hexdigest()}
        for i in range(KEYS)
    ]
    return {
        "server": {"host": HOST},
        "upstreams": {"fast": {"kind": "vllm", "urls": [f"http://{HOST}:{upstream_port}"]}},
        "variants": {
            "a": {"upstream": "fast", "model": UPSTREAM_MODEL},
            "b": {"upstream": "fast", "model": UPSTREAM_MODEL},
            "broken": {"upstream": "fast", "model": "fail-500"},
            "slow": {"upstream": "fast", "model": "slow"},
        },
        "routes": {
            ROUTE: {"split": {"a": 50, "b": 50}},
            "broken": {"split": {"broken": 1}},  # the soak's upstream errors
            "slow": {"split": {"slow": 1}},  # the soak's clients that leave mid-stream
        },
        "keys": keys,
        "records": {"capacity": records_capacity},
    }


def _version(python: Path, dist: str) -> str:
    try:
        done = subprocess.run(
            [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return done.stdout.strip()


def start_turnout(
    server: str, upstream_port: int, cpu: int | None, workdir: Path, records_capacity: int
) -> Running:
    config = workdir / "turnout.yaml"
    config.write_text(yaml.safe_dump(turnout_config(upstream_port, records_capacity)))
    port = free_port()
    log = workdir / f"turnout-{server}.log"
    env = dict(os.environ)
    if server == "uvicorn":
        argv: list[str | Path] = [VENV_BIN / "turnout", "serve", "-c", config, "--port", str(port)]
        name = "turnout"
    else:
        granian = VENV_BIN / "granian"
        if not granian.exists():
            raise Unavailable("granian is not installed in the project venv (pip install granian)")
        env.update(TURNOUT_CONFIG=str(config), TURNOUT_WORKERS="1")
        argv = [
            granian,
            "--interface",
            "asgi",
            "--factory",
            "--loop",
            "uvloop",
            "--workers",
            "1",
            "--no-access-log",
            "--host",
            HOST,
            "--port",
            str(port),
            "gateway.serve:app_from_env",
        ]
        name = "turnout-granian"
    process = _start(pinned(cpu, argv), log, env)
    running = Running(name, port, ROUTE, LOAD_KEY, process, log=log)
    running.version = _version(Path(sys.executable), "turnout")
    if server != "uvicorn":
        running.version += f" (granian {_version(Path(sys.executable), 'granian')})"
    running.notes.append(
        f"{KEYS} keys, 2-variant split, metrics, memory records (capacity {records_capacity})"
    )
    try:
        wait_answering(port, ROUTE, LOAD_KEY, process, log, timeout=60)
    except Unavailable:
        _stop(process)
        raise
    return running


# ---------------------------------------------------------------- peers


def _peer_python() -> Path:
    python = PEERS_ENV / "bin" / "python"
    if not python.exists():
        raise Unavailable(f"not installed: no venv at {PEERS_ENV} (make bench-peers)")
    return python


def start_litellm(upstream_port: int, cpu: int | None, workdir: Path) -> Running:
    python = _peer_python()
    entry = PEERS_ENV / "bin" / "litellm"
    if not entry.exists():
        raise Unavailable(f"litellm is not installed in {PEERS_ENV} (make bench-peers)")
    config = workdir / "litellm.yaml"
    model = {
        "model_name": UPSTREAM_MODEL,
        "litellm_params": {
            "model": f"openai/{UPSTREAM_MODEL}",
            "api_base": f"http://{HOST}:{upstream_port}/v1",
            "api_key": "unused",
        },
    }
    # A master key (LiteLLM refuses to start without one, or a flag allowing that): auth on,
    # as on Turnout; without a database it is the only key.
    settings = {"model_list": [model], "general_settings": {"master_key": LITELLM_KEY}}
    config.write_text(yaml.safe_dump(settings))
    port = free_port()
    log = workdir / "litellm.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL")
    }
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch of the price list at start
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
    )
    argv: list[str | Path] = [
        entry,
        "--config",
        config,
        "--host",
        HOST,
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    process = _start(pinned(cpu, argv), log, env)
    running = Running("litellm", port, UPSTREAM_MODEL, LITELLM_KEY, process, log=log)
    running.version = _version(python, "litellm")
    running.notes.append("proxy, 1 worker, no database, master key")
    try:
        wait_answering(port, UPSTREAM_MODEL, LITELLM_KEY, process, log, timeout=120)
    except Unavailable:
        _stop(process)
        raise
    return running


def start_vllm_router(upstream_port: int, cpu: int | None, workdir: Path) -> Running:
    python = _peer_python()
    entry = PEERS_ENV / "bin" / "vllm-router"
    if not entry.exists():
        raise Unavailable(f"vllm-router is not installed in {PEERS_ENV} (make bench-peers)")
    port = free_port()
    log = workdir / "vllm-router.log"
    argv: list[str | Path] = [
        entry,
        "--host",
        HOST,
        "--port",
        str(port),
        "--worker-urls",
        f"http://{HOST}:{upstream_port}",
        "--prometheus-port",
        str(free_port()),
        "--worker-startup-check-interval",
        "1",
        "--log-level",
        "warning",
    ]
    process = _start(pinned(cpu, argv), log)
    running = Running("vllm-router", port, UPSTREAM_MODEL, LOAD_KEY, process, log=log)
    running.version = _version(python, "vllm-router")
    running.notes.append("default policy, metrics on")
    try:
        wait_answering(port, UPSTREAM_MODEL, LOAD_KEY, process, log, timeout=60)
    except Unavailable:
        _stop(process)
        raise
    return running


SYSTEMS = ("direct", "turnout", "turnout-granian", "litellm", "vllm-router")


def peers_installed() -> list[str]:
    return [
        name
        for name, entry in (("litellm", "litellm"), ("vllm-router", "vllm-router"))
        if (PEERS_ENV / "bin" / entry).exists()
    ]


@contextlib.contextmanager
def started(
    name: str,
    upstream_port: int,
    cpu: int | None,
    workdir: Path,
    records_capacity: int = RECORDS_CAPACITY,
) -> Iterator[Running]:
    """Start one system (raises Unavailable with a one-line reason), stop it on exit."""
    if name == "direct":
        yield Running("direct", upstream_port, UPSTREAM_MODEL, LOAD_KEY, None, version="")
        return
    if name == "turnout":
        running = start_turnout("uvicorn", upstream_port, cpu, workdir, records_capacity)
    elif name == "turnout-granian":
        running = start_turnout("granian", upstream_port, cpu, workdir, records_capacity)
    elif name == "litellm":
        running = start_litellm(upstream_port, cpu, workdir)
    elif name == "vllm-router":
        running = start_vllm_router(upstream_port, cpu, workdir)
    else:
        raise Unavailable(f"unknown system {name!r} (one of {', '.join(SYSTEMS)})")
    try:
        yield running
    finally:
        assert running.process is not None
        _stop(running.process)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="turnout-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
