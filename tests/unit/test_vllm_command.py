"""The vLLM command line built from a `serve` section, and the section's checks."""

from __future__ import annotations

import shlex
from typing import Any

import msgspec
import pytest

from gateway.config_check import check_settings
from gateway.settings import VllmUpstream
from serving.vllm_command import serve_args, vllm_launch

SERVE: dict[str, Any] = {
    "base_model": "meta-llama/Llama-3.1-8B-Instruct",
    "served_model_name": "base",
    "adapters": {
        "support-lora": "/adapters/support",
        "legal-lora": {"path": "s3://bucket/legal lora", "at_start": True},
        "late-lora": {"path": "/adapters/late", "at_start": False},
    },
    "max_model_len": 8192,
    "max_loras": 4,
    "max_lora_rank": 16,
    "dtype": "bfloat16",
    "gpu_memory_utilization": 0.9,
    "tensor_parallel_size": 2,
    "extra_args": ["--enable-prefix-caching"],
}


def _upstream(**extra: Any) -> VllmUpstream:
    raw = {"kind": "vllm", "urls": ["http://gpu-0:8000", "http://gpu-1:9001"], "serve": SERVE}
    return msgspec.convert(raw | extra, VllmUpstream)


def test_the_vllm_serve_command_for_each_replica() -> None:
    first = vllm_launch(_upstream(), 0)
    assert first.argv == (
        "vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct", "--host", "0.0.0.0", "--port",
        "8000", "--served-model-name", "base", "--enable-lora", "--lora-modules",
        "support-lora=/adapters/support", "legal-lora=s3://bucket/legal lora",
        "--max-model-len", "8192", "--max-loras", "4", "--max-lora-rank", "16", "--dtype",
        "bfloat16", "--gpu-memory-utilization", "0.9", "--tensor-parallel-size", "2",
        "--enable-prefix-caching",
    )  # fmt: skip
    assert "late-lora" not in " ".join(first.argv)  # loaded at run time only
    assert vllm_launch(_upstream(), 1).argv[6] == "9001"
    assert first.env_shown == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def test_the_module_form_takes_the_same_flags() -> None:
    launch = vllm_launch(_upstream(), 0, python="/opt/venv/bin/python")
    assert launch.argv[:5] == (
        "/opt/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
        "meta-llama/Llama-3.1-8B-Instruct",
    )  # fmt: skip
    assert launch.argv[5:] == vllm_launch(_upstream(), 0).argv[3:]


def test_the_shell_line_quotes_and_keeps_secrets_by_reference() -> None:
    launch = vllm_launch(_upstream(api_key_env="VLLM_KEY"), 0)
    line = launch.shell()
    assert line.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_API_KEY=$VLLM_KEY vllm ")
    assert "'legal-lora=s3://bucket/legal lora'" in line
    assert shlex.split(line)[2:] == list(launch.argv)
    env = launch.env({"VLLM_KEY": "sk-vllm-secret", "PATH": "/bin"})
    assert env["VLLM_API_KEY"] == "sk-vllm-secret" and env["PATH"] == "/bin"
    assert "sk-vllm-secret" not in line


def test_minimal_section_and_errors() -> None:
    upstream = msgspec.convert(
        {"kind": "vllm", "urls": ["http://h"], "serve": {"base_model": "m",
                                                          "runtime_lora_updating": False}},
        VllmUpstream,
    )  # fmt: skip
    launch = vllm_launch(upstream)
    assert launch.argv == ("vllm", "serve", "m", "--host", "0.0.0.0", "--port", "80")
    assert launch.env_shown == {} and launch.secret_env == {}
    assert serve_args(upstream.serve) == []  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replica"):
        vllm_launch(upstream, 1)
    with pytest.raises(ValueError, match="serve"):
        vllm_launch(msgspec.convert({"kind": "vllm", "urls": ["http://h"]}, VllmUpstream))


def _problems(serve: dict[str, Any], model: str = "support-lora") -> list[str]:
    config = {
        "upstreams": {"gpu": {"kind": "vllm", "urls": ["http://h:8000"], "serve": serve}},
        "variants": {"ft": {"upstream": "gpu", "model": model}},
        "routes": {"r": {"split": {"ft": 1}}},
    }
    _, problems = check_settings(config, {})
    return [str(p) for p in problems if p.severity == "error"]


def test_serve_section_checks() -> None:
    assert _problems(SERVE) == []
    assert _problems(SERVE, model="base") == []  # the base model's served name
    unknown = _problems(SERVE, model="missing-lora")
    assert unknown and "variants.ft.model" in unknown[0]
    bad = dict(SERVE, adapters={"a b": "/x", "ok": {"path": " "}},
               extra_args=["--port=9", "--max-loras", "2"], served_model_name="ok")  # fmt: skip
    found = _problems(bad, model="ok")
    assert any("serve.adapters.a b" in p for p in found)
    assert any("serve.adapters.ok" in p and "path" in p for p in found)
    assert any("serve.extra_args[0]" in p and "--port" in p for p in found)
    assert any("serve.extra_args[1]" in p for p in found)
    assert any("serve.served_model_name" in p for p in found)
