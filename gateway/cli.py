"""The `turnout` command line: serve, check, simulate, report, demo, eval, serving."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from gateway.auth import ADMIN_KEY_ENV
from gateway.config_check import SettingsError, check_file, check_path, load_settings
from gateway.gateway import WORKERS_ENV
from gateway.serve import CONFIG_ENV, configure_logging, shared_metrics, uvicorn_options
from gateway.settings import Settings
from serving.vllm_command import Launch, vllm_launch

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Turnout LLM gateway.")
console = Console(stderr=True)
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")]
serving_app = typer.Typer(
    no_args_is_help=True, help="vLLM for fine-tuned models, from a `vllm` upstream's `serve`."
)
app.add_typer(serving_app, name="serving")
UpstreamOption = Annotated[str, typer.Option("--upstream", help="A `vllm` upstream with `serve`.")]
ReplicaOption = Annotated[
    int, typer.Option("--replica", min=0, help="Which of its `urls` (gives the port).")
]
PythonOption = Annotated[
    str | None,
    typer.Option(
        "--python",
        help="Run `PYTHON -m vllm.entrypoints.openai.api_server` instead of `vllm serve`.",
    ),
]


@serving_app.command("command")
def serving_command(
    config: ConfigOption,
    upstream: UpstreamOption,
    replica: ReplicaOption = 0,
    python: PythonOption = None,
) -> None:
    """Print the vLLM command line (environment first; secrets by reference) for a replica."""
    typer.echo(_launch(config, upstream, replica, python).shell())


@serving_app.command("launch")
def serving_launch(
    config: ConfigOption,
    upstream: UpstreamOption,
    replica: ReplicaOption = 0,
    python: PythonOption = None,
) -> None:
    """Exec vLLM for a replica, with the environment it needs (replaces this process)."""
    launch = _launch(config, upstream, replica, python)
    console.print(f"exec {escape(launch.shell())}")
    try:
        os.execvpe(launch.argv[0], list(launch.argv), launch.env(os.environ))
    except OSError as exc:
        console.print(f"[red]error[/] cannot run {escape(launch.argv[0])}: {escape(str(exc))}")
        raise typer.Exit(1) from None


def _launch(config: Path, upstream: str, replica: int, python: str | None) -> Launch:
    from gateway.settings import VllmUpstream

    settings = _settings_for_report(config)
    found = settings.upstreams.get(upstream)
    if not isinstance(found, VllmUpstream) or found.serve is None:
        names = [
            n for n, u in settings.upstreams.items() if isinstance(u, VllmUpstream) and u.serve
        ]
        console.print(
            f"[red]error[/] no vllm upstream `{escape(upstream)}` with a `serve` section "
            f"(have: {escape(', '.join(names) or 'none')})"
        )
        raise typer.Exit(2)
    if replica >= len(found.urls):
        console.print(f"[red]error[/] upstream `{escape(upstream)}` has {len(found.urls)} url(s)")
        raise typer.Exit(2)
    return vllm_launch(found, replica, python=python)


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
            lifespan="on",
            access_log=False,
            # Turnout reads no client address: X-Forwarded-* from a client is never trusted,
            # and the middleware that would rewrite the scope per request is not run.
            proxy_headers=False,
            log_level="info",
            timeout_graceful_shutdown=10,
            **uvicorn_options(settings.server),  # httptools guarded: header/write deadlines
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
    admin_key_env: Annotated[
        str, typer.Option(help="Env var holding the admin key.")
    ] = ADMIN_KEY_ENV,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the report as an HTML page here.")
    ] = None,
    png: Annotated[
        Path | None, typer.Option("--png", help="Also write its charts as PNG files here.")
    ] = None,
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
    try:
        written = _report_files(result, html, png)
    except (RuntimeError, OSError) as exc:
        console.print(f"[red]error[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    for path in written:
        typer.echo(str(path), err=as_json)


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=10, help="Requests to send.")] = 300,
    html: Annotated[Path, typer.Option(help="Where the HTML experiment report is written.")] = Path(
        "turnout-report.html"
    ),
) -> None:
    """The whole story on simulated upstreams: routing, A/B split, tokens, cost, the report."""
    from gateway.demo import run_demo

    raise typer.Exit(run_demo(requests, html))


@app.command("eval")
def evaluate(
    dataset: Annotated[
        Path, typer.Argument(help="JSON lines: {messages | prompt, expected[, id, params]}.")
    ],
    route: Annotated[str, typer.Option(help="The route whose variants are evaluated.")],
    variants: Annotated[
        str | None, typer.Option(help="Comma-separated variants (default: the route's split).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 8,
    base_url: Annotated[
        str | None, typer.Option(help="A running gateway's root URL (a trailing /v1 is dropped).")
    ] = None,
    admin_key_env: Annotated[
        str, typer.Option(help="Env var holding --base-url's admin key.")
    ] = ADMIN_KEY_ENV,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Run a gateway from this YAML, in this process."),
    ] = None,
    allow_redis: Annotated[
        bool, typer.Option(help="-c: run even if the config has state.redis_url (it writes there).")
    ] = False,
    scorer: Annotated[
        str, typer.Option(help="exact | normalised | regex | json-field | judge")
    ] = "normalised",
    pattern: Annotated[
        str | None, typer.Option(help="regex: a pattern with {expected} in it.")
    ] = None,
    field: Annotated[str | None, typer.Option(help="json-field: a dotted path, a.b.")] = None,
    judge: Annotated[str | None, typer.Option(help="judge: the variant asked.")] = None,
    judge_route: Annotated[
        str | None, typer.Option(help="judge: the route it is forced on (default: --route).")
    ] = None,
    out: Annotated[Path, typer.Option(help="The JSON result.")] = Path("eval-result.json"),
    charts: Annotated[Path | None, typer.Option(help="Write PNG charts here.")] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds per request (its total deadline).")
    ] = 120.0,
    max_error_rate: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Exit 1 when a variant's (or the judge's) failures exceed this."
        ),
    ] = 0.5,
) -> None:
    """Offline evaluation: a labelled dataset through the gateway to each variant of a route."""
    import asyncio

    from gateway.eval import SCORERS, ScorerSpec
    from gateway.eval_cli import EvalFailed, EvalOptions, run_eval

    if scorer not in SCORERS:
        raise typer.BadParameter(f"choose one of {', '.join(SCORERS)}", param_hint="--scorer")
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    options = EvalOptions(
        dataset=dataset,
        route=route,
        variants=names,
        scorer=ScorerSpec(scorer, pattern, field, judge),
        judge_route=judge_route,
        concurrency=concurrency,
        base_url=base_url,
        admin_key_env=admin_key_env,
        config=config,
        allow_redis=allow_redis,
        out=out,
        charts=charts,
        timeout_s=timeout,
        max_error_rate=max_error_rate,
    )
    try:
        asyncio.run(run_eval(options, Console(width=max(Console().width, 150)), console))
    except EvalFailed as exc:
        console.print(f"[red]error[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _report_files(report: dict[str, Any], html: Path | None, png: Path | None) -> list[Path]:
    """Write the report as an HTML page and its charts as PNG files, where asked."""
    from gateway.charts import report_charts, write_pngs
    from gateway.report_html import render_html

    written = []
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(render_html(report), encoding="utf-8")
        written.append(html)
    if png is not None:
        written += write_pngs(report_charts(report), png)
    return written


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
