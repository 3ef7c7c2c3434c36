"""The `turnout` command line: serve, check, simulate, demo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from gateway.config_check import SettingsError, check_file, check_path, load_settings
from gateway.gateway import WORKERS_ENV
from gateway.serve import CONFIG_ENV, configure_logging, shared_metrics
from gateway.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Turnout LLM gateway.")
console = Console(stderr=True)
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")]


@app.command()
def serve(
    config: ConfigOption,
    host: Annotated[str | None, typer.Option(help="Bind address (overrides server.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (overrides server.port).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Serve the gateway under uvicorn (uvloop + httptools)."""
    import uvicorn

    configure_logging()
    settings = _load_or_exit(config)
    os.environ[CONFIG_ENV] = str(config.resolve())
    os.environ[WORKERS_ENV] = str(workers)
    with shared_metrics(workers):
        uvicorn.run(
            "gateway.serve:app_from_env",
            factory=True,
            host=host or settings.server.host,
            port=settings.server.port if port is None else port,
            workers=workers,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level="info",
            timeout_graceful_shutdown=10,
        )


@app.command()
def check(
    config: ConfigOption,
    strict: Annotated[bool, typer.Option(help="Treat missing secrets as errors.")] = False,
) -> None:
    """Validate a configuration file and list every problem found."""
    problems = check_file(config, os.environ, strict=strict)
    for problem in problems:
        style = "red" if problem.severity == "error" else "yellow"
        console.print(f"[{style}]{problem.severity}[/] {escape(str(problem))}")
    if any(p.severity == "error" for p in problems):
        raise typer.Exit(1)
    typer.echo("ok")


@app.command()
def simulate(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    profile: Annotated[
        str, typer.Option(help="vllm-lora | hosted | instant | flaky (flags below override).")
    ] = "vllm-lora",
    ttft_ms: Annotated[float | None, typer.Option(help="Time to first token, ms.")] = None,
    tokens_per_s: Annotated[float | None, typer.Option(help="Decode speed, tokens/s.")] = None,
    failure_rate: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Served model names (any if none).")
    ] = None,
) -> None:
    """Run a simulated OpenAI-compatible upstream that answers like vLLM's server."""
    import msgspec

    from serving.simulated import PROFILES, run_simulated

    if profile not in PROFILES:
        raise typer.BadParameter(f"choose one of {', '.join(PROFILES)}", param_hint="--profile")
    overrides = {
        "ttft_ms": ttft_ms,
        "tokens_per_s": tokens_per_s,
        "failure_rate": failure_rate,
        "models": tuple(model) if model else None,
    }
    chosen = msgspec.structs.replace(
        PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}
    )
    run_simulated(chosen, host, port)


@app.command()
def report(
    url: Annotated[str | None, typer.Option(help="A running gateway's base URL.")] = None,
    records: Annotated[
        Path | None, typer.Option(help="A JSON-lines record file (records.file); needs -c.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="The gateway's YAML.")
    ] = None,
    route: Annotated[str | None, typer.Option(help="Only this route.")] = None,
    since: Annotated[float | None, typer.Option(help="Only records from this unix time.")] = None,
    admin_key_env: Annotated[str, typer.Option(help="Env var holding the admin key.")] = (
        "TURNOUT_ADMIN_KEY"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The experiment report: from a running gateway (--url) or a record file (--records -c)."""
    import json

    import msgspec

    from gateway.report_cli import from_file, from_gateway, render

    try:
        if url is not None:
            result = from_gateway(url, admin_key_env, route, since)
        elif records is not None and config is not None:
            result = from_file(records, _settings_for_report(config), route, since)
        else:
            raise typer.BadParameter("give --url, or --records with -c")
    except (RuntimeError, OSError, ValueError, msgspec.MsgspecError) as exc:
        console.print(f"[red]error[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render(Console(), result)


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=10, help="Requests to send.")] = 300,
) -> None:
    """The whole story on simulated upstreams: routing, A/B split, tokens, cost."""
    from gateway.demo import run_demo

    raise typer.Exit(run_demo(requests))


def _settings_for_report(path: Path) -> Settings:
    """The configuration, checked; a secret missing on this machine does not matter here."""
    settings, problems = check_path(path, os.environ, strict=False)
    if settings is None:
        for problem in problems:
            console.print(f"[red]{problem.severity}[/] {escape(str(problem))}")
        raise typer.Exit(2)
    return settings


def _load_or_exit(path: Path) -> Settings:
    try:
        return load_settings(path, os.environ)
    except SettingsError as exc:
        for problem in exc.problems:
            console.print(f"[red]{problem.severity}[/] {escape(str(problem))}")
        raise typer.Exit(2) from None


def main() -> None:
    app()
