"""The `turnout` command as a user runs it: check, serve (with the openai client), demo."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.processes import ROOT, TURNOUT, free_port, wait_ready


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TURNOUT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_check_ok_on_examples() -> None:
    result = _run("check", "-c", "examples/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_check_lists_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "upstreams:\n  u: {kind: openai, base_url: 'http://x/v1', colour: red}\n"
        "variants:\n  v: {upstream: nope, model: m}\n"
        "routes:\n  r: {split: {v: -1, w: 1}}\n"
    )
    result = _run("check", "-c", str(bad))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    for path in (
        "upstreams.u.colour",
        "variants.v.upstream",
        "routes.r.split.v",
        "routes.r.split.w",
    ):
        assert path in out


def test_check_missing_secret_is_warning_unless_strict() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"OPENAI_API_KEY", "TURNOUT_ADMIN_KEY"}}
    loose = subprocess.run(
        [TURNOUT, "check", "-c", "examples/production.yaml"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert loose.returncode == 0 and "OPENAI_API_KEY" in loose.stdout + loose.stderr
    strict = subprocess.run(
        [TURNOUT, "check", "--strict", "-c", "examples/production.yaml"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert strict.returncode == 1


@pytest.fixture
def served_quickstart() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [TURNOUT, "serve", "-c", "examples/quickstart.yaml", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)
        assert "OPEN" in output  # the open gateway is announced at start


def test_serve_quickstart_with_openai_client(served_quickstart: str) -> None:
    client = openai.OpenAI(base_url=served_quickstart + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == ["support"]
    messages = [{"role": "user", "content": "I was charged twice"}]
    variants = set()
    for i in range(12):
        raw = client.chat.completions.with_raw_response.create(
            model="support",
            messages=messages,
            user=f"u{i}",  # type: ignore[arg-type]
        )
        assert raw.parse().choices[0].message.content
        variants.add(raw.headers["x-turnout-variant"])
    assert variants == {"support-ft", "support-prompted"} or len(variants) == 1
    chunks = list(
        client.chat.completions.create(
            model="support",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert client.completions.create(model="support", prompt="hi").choices[0].text
    assert len(client.embeddings.create(model="support", input="hi").data) == 1


def test_make_demo_exits_zero_with_a_verdict_and_the_html_report() -> None:
    page = ROOT / "turnout-report.html"
    page.unlink(missing_ok=True)
    result = subprocess.run(["make", "demo"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "support-ft" in result.stdout and "support-prompted" in result.stdout
    assert "Break-even" in result.stdout
    assert re.search(r"verdict: (keep|split|switch to support-prompted)", result.stdout)
    assert "shadow support-ft -> support-small" in result.stdout
    html = page.read_text(encoding="utf-8")
    assert "Route support" in html and html.count("<svg") >= 3


def test_simulate_serves_an_openai_compatible_upstream() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [TURNOUT, "simulate", "--port", str(port), "--profile", "instant", "--model", "base"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 20
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert [m.id for m in models] == ["base"]
        reply = client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="other", messages=[{"role": "user", "content": "x"}]
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_simulate_rejects_unknown_profile() -> None:
    result = _run("simulate", "--profile", "nope")
    assert result.returncode != 0 and "--profile" in result.stdout + result.stderr


def test_serving_command_and_launch(tmp_path: Path) -> None:
    """`serving command` prints the vLLM line; `serving launch` execs it with the secret
    resolved from the environment (a stand-in interpreter records what it got)."""
    config = tmp_path / "turnout.yaml"
    config.write_text(
        "upstreams:\n"
        "  gpu:\n"
        "    kind: vllm\n"
        "    urls: [http://127.0.0.1:8000, http://127.0.0.1:8001]\n"
        "    api_key_env: GPU_KEY\n"
        "    serve: {base_model: /models/base, adapters: {support-lora: /adapters/s}}\n"
        "variants: {ft: {upstream: gpu, model: support-lora}}\n"
        "routes: {support: {split: {ft: 1}}}\n"
    )
    shown = subprocess.run(
        [TURNOUT, "serving", "command", "-c", str(config), "--upstream", "gpu", "--replica", "1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=os.environ | {"GPU_KEY": "k-1"},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == (
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_API_KEY=$GPU_KEY vllm serve /models/base "
        "--host 0.0.0.0 --port 8001 --enable-lora --lora-modules support-lora=/adapters/s"
    )
    fake = tmp_path / "python"
    out = tmp_path / "out.txt"
    fake.write_text(
        f'#!/bin/sh\necho "$@" > {out}\n'
        f'echo "$VLLM_API_KEY $VLLM_ALLOW_RUNTIME_LORA_UPDATING" >> {out}\n'
    )
    fake.chmod(0o755)
    ran = subprocess.run(
        [TURNOUT, "serving", "launch", "-c", str(config), "--upstream", "gpu",
         "--python", str(fake)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=os.environ | {"GPU_KEY": "k-1"},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    args, env = out.read_text().splitlines()
    assert args == (
        "-m vllm.entrypoints.openai.api_server --model /models/base --host 0.0.0.0 --port 8000 "
        "--enable-lora --lora-modules support-lora=/adapters/s"
    )
    assert env == "k-1 True"
    assert "k-1" not in ran.stderr  # the line it prints keeps the secret by reference
    wrong = subprocess.run(
        [TURNOUT, "serving", "command", "-c", str(config), "--upstream", "nope"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert wrong.returncode == 2 and "gpu" in wrong.stderr
