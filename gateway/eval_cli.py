"""`turnout eval`: send a labelled dataset through a gateway to each variant of a route, forced
with `x-turnout-variant` (admin key), score the answers and report accuracy, latency and cost.

The I/O half: the gateway (a running one, or one built from a config file in this process),
the HTTP calls, the progress bar, the table, the JSON result and the charts. Datasets,
scorers and figures are in gateway/eval.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.eval import (
    DatasetError,
    Example,
    Outcome,
    Scorer,
    ScorerSpec,
    Summary,
    check_examples,
    judge_messages,
    load_dataset,
    make_scorer,
    parse_verdict,
    result_json,
    summarise,
)
from router.stats import Interval

FORCE_HEADER = "x-turnout-variant"
ADMIN_KEY_ENV = "TURNOUT_ADMIN_KEY"
EVAL_KEY_ENV = "TURNOUT_EVAL_ADMIN_KEY"  # the in-process gateway's own admin key, if needed
DEFAULT_OUT = Path("eval-result.json")
Json = dict[str, Any]


class EvalFailed(Exception):
    """The evaluation cannot go on; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class EvalOptions:
    dataset: Path
    route: str
    variants: list[str] | None = None  # default: the route's split variants
    scorer: ScorerSpec = field(default_factory=ScorerSpec)
    judge_route: str | None = None  # the route the judge variant is forced on (default: route)
    concurrency: int = 8
    base_url: str | None = None
    api_key: str | None = None  # default: $TURNOUT_ADMIN_KEY
    config: Path | None = None  # run a gateway from this file, in this process
    out: Path = DEFAULT_OUT
    charts: Path | None = None
    timeout_s: float = 120.0


@dataclass
class EvalRun:
    """What an evaluation produced."""

    result: Json
    summary: Summary
    outcomes: list[Outcome]
    out: Path
    charts: list[Path]


async def run_eval(options: EvalOptions, console: Console, progress_console: Console) -> EvalRun:
    """The whole evaluation: check, gateway, send, score, write, show."""
    try:
        options.scorer.check()
    except ValueError as exc:
        raise EvalFailed(str(exc), 2) from None
    if options.concurrency < 1:
        raise EvalFailed("--concurrency must be at least 1", 2)
    if (options.base_url is None) == (options.config is None):
        raise EvalFailed("give either --base-url (a running gateway) or -c (a config to run)", 2)
    try:
        examples = load_dataset(options.dataset)
        check_examples(examples, options.scorer)
    except DatasetError as exc:
        raise EvalFailed(str(exc), 2) from None
    async with _gateway(options) as (base_url, api_key):
        limits = httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=32)
        timeout = httpx.Timeout(options.timeout_s, connect=10.0)
        async with httpx.AsyncClient(
            base_url=base_url, timeout=timeout, limits=limits, trust_env=False
        ) as client:
            caller = _Caller(client, api_key)
            variants = options.variants or await _split_variants(caller, options.route)
            outcomes = await _evaluate(caller, options, examples, variants, progress_console)
    summary = summarise(outcomes, variants)
    meta = {
        "route": options.route,
        "dataset": str(options.dataset),
        "examples": len(examples),
        "scorer": _scorer_json(options.scorer, options.judge_route or options.route),
        "gateway": options.base_url or f"in-process ({options.config})",
        "generated_at": time.time(),
    }
    result = result_json(summary, outcomes, meta)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    render(console, summary, options)
    console.print(f"result: {escape(str(options.out))}")
    charts: list[Path] = []
    if options.charts is not None:
        charts = write_charts(summary, options.route, options.charts)
        console.print(f"charts: {escape(', '.join(str(p) for p in charts))}")
    return EvalRun(result, summary, outcomes, options.out, charts)


# The gateway


@asynccontextmanager
async def _gateway(options: EvalOptions) -> AsyncIterator[tuple[str, str]]:
    """(base URL, admin key) of the gateway: the running one named, or one served in this
    process from the config for the evaluation's duration."""
    if options.base_url is not None:
        key = options.api_key or os.environ.get(ADMIN_KEY_ENV, "").strip()
        if not key:
            raise EvalFailed(
                f"`turnout eval` needs the gateway's admin key: --api-key or ${ADMIN_KEY_ENV}", 2
            )
        yield options.base_url.rstrip("/"), key
        return
    assert options.config is not None
    from gateway.app import create_app
    from gateway.config_check import check_path
    from serving.loopback import on_loopback

    settings, problems = check_path(options.config, os.environ, strict=False)
    if settings is None:
        lines = "\n".join(str(p) for p in problems if p.severity == "error")
        raise EvalFailed(f"{options.config} has problems:\n{lines}", 2)
    environ = dict(os.environ)
    key = environ.get(settings.admin_key_env or "", "").strip()
    if not key:  # the gateway is ours: give it an admin key of its own
        key = secrets.token_urlsafe(24)
        environ[EVAL_KEY_ENV] = key
        settings = msgspec.structs.replace(settings, admin_key_env=EVAL_KEY_ENV)
    # The start-up warnings are for operators of a served gateway (an open gateway, inexact
    # tokenizers), not for this private one on loopback; errors still show.
    log = logging.getLogger("turnout")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        app = create_app(settings, environ)
        async with on_loopback(app) as url:
            yield url, key
    finally:
        log.setLevel(level)


class _Fatal(Exception):
    """An answer that means no other request can succeed either."""


@dataclass
class _Reply:
    status: int | None
    body: Json | None
    headers: Mapping[str, str]
    latency_s: float
    error: str | None = None


class _Caller:
    def __init__(self, client: httpx.AsyncClient, api_key: str) -> None:
        self.client = client
        self.auth = {"authorization": f"Bearer {api_key}"}

    async def chat(self, route: str, variant: str, body: Json) -> _Reply:
        headers = self.auth | {FORCE_HEADER: variant}
        payload = {"model": route, "temperature": 0} | body | {"model": route, "stream": False}
        start = time.perf_counter()
        try:
            response = await self.client.post("/v1/chat/completions", json=payload, headers=headers)
        except httpx.ConnectError as exc:
            raise _Fatal(f"cannot reach the gateway at {self.client.base_url}: {exc}") from None
        except httpx.TransportError as exc:  # a timeout, a reset: this request failed
            elapsed = time.perf_counter() - start
            return _Reply(None, None, {}, elapsed, f"{type(exc).__name__}: {exc}".rstrip(": "))
        elapsed = time.perf_counter() - start
        data = _json_of(response)
        reply = _Reply(response.status_code, data, response.headers, elapsed)
        if not response.is_success:
            reply.error = f"{response.status_code}: {_message(data, response.text)}"
            _raise_if_fatal(response.status_code, data, route, variant)
        elif data is None:
            reply.error = "the answer is not a JSON object"
        return reply

    async def split_variants(self, route: str) -> list[str]:
        """The route's split variants, from the report endpoint (no records: cheap)."""
        future = time.time() + 365 * 86400  # `since` after every record: nothing to compute
        try:
            response = await self.client.get(
                "/turnout/report", params={"route": route, "since": str(future)}, headers=self.auth
            )
        except httpx.ConnectError as exc:
            raise _Fatal(f"cannot reach the gateway at {self.client.base_url}: {exc}") from None
        data = _json_of(response)
        if response.status_code in (401, 403):
            raise _Fatal(_admin_needed(response.status_code, data, response.text))
        if response.status_code == 404:
            raise _Fatal(f"unknown route `{route}`: the gateway has no such route")
        try:
            assert data is not None
            return list(data["routes"][route]["variants"])
        except (AssertionError, KeyError, TypeError):
            raise _Fatal(
                f"cannot learn route `{route}`'s variants from the gateway "
                f"({response.status_code}): name them with --variants"
            ) from None


def _json_of(response: httpx.Response) -> Json | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _message(data: Json | None, text: str) -> str:
    error = (data or {}).get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return text[:200]


def _admin_needed(status: int, data: Json | None, text: str) -> str:
    return (
        f"the gateway refused the key ({status}: {_message(data, text)}); `turnout eval` needs "
        f"the gateway's admin key (--api-key or ${ADMIN_KEY_ENV}) to force variants"
    )


def _raise_if_fatal(status: int, data: Json | None, route: str, variant: str) -> None:
    error = (data or {}).get("error")
    error = error if isinstance(error, dict) else {}
    if status in (401, 403):
        raise _Fatal(_admin_needed(status, data, ""))
    if status == 404 and error.get("code") == "model_not_found":
        raise _Fatal(f"unknown route `{route}`: {_message(data, '')}")
    if status == 400 and error.get("param") == FORCE_HEADER:
        raise _Fatal(f"unknown variant `{variant}` on route `{route}`: {_message(data, '')}")


async def _split_variants(caller: _Caller, route: str) -> list[str]:
    try:
        return await caller.split_variants(route)
    except _Fatal as exc:
        raise EvalFailed(str(exc)) from None


# Sending and scoring


async def _evaluate(
    caller: _Caller,
    options: EvalOptions,
    examples: Sequence[Example],
    variants: Sequence[str],
    progress_console: Console,
) -> list[Outcome]:
    """Every example to every variant (interleaved), at most `concurrency` calls at a time."""
    gate = asyncio.Semaphore(options.concurrency)
    score = None if options.scorer.name == "judge" else make_scorer(options.scorer)
    judge_route = options.judge_route or options.route
    pairs = [(example, variant) for example in examples for variant in variants]
    outcomes: list[Outcome | None] = [None] * len(pairs)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=progress_console, transient=True) as progress:
        task = progress.add_task(f"eval {options.route}", total=len(pairs))

        async def one(i: int, example: Example, variant: str) -> None:
            async with gate:
                reply = await caller.chat(
                    options.route, variant, {"messages": example.messages, **example.params}
                )
            outcome = _outcome(example, variant, reply, score)
            if options.scorer.judge is not None and outcome.ok and outcome.answer is not None:
                async with gate:
                    await _judge(caller, judge_route, options.scorer.judge, example, outcome)
            outcomes[i] = outcome
            progress.advance(task)

        try:
            async with asyncio.TaskGroup() as group:
                for i, (example, variant) in enumerate(pairs):
                    group.create_task(one(i, example, variant))
        except BaseExceptionGroup as group_error:
            fatal = _first_fatal(group_error)
            if fatal is None:
                raise
            raise EvalFailed(str(fatal)) from None
    return [o for o in outcomes if o is not None]


def _first_fatal(error: BaseException) -> _Fatal | None:
    if isinstance(error, _Fatal):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_fatal(inner)
            if found is not None:
                return found
    return None


def _outcome(example: Example, variant: str, reply: _Reply, score: Scorer | None) -> Outcome:
    usage = (reply.body or {}).get("usage") if reply.error is None else None
    usage = usage if isinstance(usage, dict) else {}
    answer = _answer_text(reply.body) if reply.error is None else None
    correct = answer is not None and score is not None and score(answer, example.expected)
    return Outcome(
        example_id=example.id,
        variant=variant,
        status=reply.status,
        answer=answer,
        correct=correct,
        latency_s=reply.latency_s,
        expected=example.expected,
        cost_usd=_cost(reply.headers),
        request_id=reply.headers.get("x-request-id"),
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        error=reply.error,
    )


async def _judge(
    caller: _Caller, route: str, judge: str, example: Example, outcome: Outcome
) -> None:
    """Ask the judge variant whether the answer is right; the outcome takes its verdict."""
    assert outcome.answer is not None
    body = {"messages": judge_messages(example.question, example.expected, outcome.answer)}
    reply = await caller.chat(route, judge, body)
    outcome.judge_cost_usd = _cost(reply.headers)
    outcome.judge_request_id = reply.headers.get("x-request-id")
    if reply.error is not None:
        outcome.judge_error = reply.error
        return
    outcome.judge_answer = _answer_text(reply.body) or ""
    outcome.judge_verdict = parse_verdict(outcome.judge_answer)
    outcome.correct = outcome.judge_verdict is True


def _answer_text(body: Json | None) -> str | None:
    try:
        content = (body or {})["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return content if isinstance(content, str) else ""


def _cost(headers: Mapping[str, str]) -> float | None:
    try:
        value = float(headers.get("x-turnout-cost-usd", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _scorer_json(spec: ScorerSpec, judge_route: str) -> Json:
    out: Json = {"name": spec.name}
    if spec.pattern is not None:
        out["pattern"] = spec.pattern
    if spec.field is not None:
        out["field"] = spec.field
    if spec.judge is not None:
        out |= {"judge": spec.judge, "judge_route": judge_route}
    return out


# Showing and writing


def render(console: Console, summary: Summary, options: EvalOptions) -> None:
    """One row per variant, the accuracy difference from the first variant beside it."""
    scorer = options.scorer.name + (f" ({options.scorer.judge})" if options.scorer.judge else "")
    table = Table(title=f"route {options.route}: {options.dataset.name}, scorer {scorer}")
    for column in (
        "variant",
        "examples",
        "accuracy [95% CI]",
        "errors",
        "p50 s",
        "p95 s",
        "cost / 1k req",
        "tokens / req",
        f"Δ accuracy vs {summary.variants[0].variant}",
    ):
        table.add_column(column, justify="left" if column == "variant" else "right")
    differences = {c.variant: c.difference for c in summary.comparisons}
    for row in summary.variants:
        difference = differences.get(row.variant)
        diff_text = "-"
        if difference is not None and math.isfinite(difference.estimate):
            diff_text = _interval_text(difference, "{:+.1%}") + (
                " [bold green]significant[/]" if difference.significant else " (n.s.)"
            )
        tokens = [row.prompt_tokens_per_request, row.completion_tokens_per_request]
        table.add_row(
            escape(row.variant),
            str(row.examples),
            _interval_text(row.accuracy, "{:.1%}"),
            f"[red]{row.errors}[/]" if row.errors else "0",
            _fmt(row.latency_p50_s.estimate, "{:.3f}"),
            _fmt(row.latency_p95_s.estimate, "{:.3f}"),
            _fmt(row.cost_per_1k_usd, "${:.4f}"),
            " + ".join(_fmt(t, "{:.1f}") for t in tokens),
            diff_text,
        )
    console.print(table)
    console.print("tokens / req: prompt + completion; errors (non-2xx) count as incorrect.")
    if options.scorer.judge is not None:
        cost = math.fsum(row.judge_cost_usd for row in summary.variants)
        unparsed = sum(row.judge_unparsed for row in summary.variants)
        console.print(
            f"judge {escape(options.scorer.judge)}: ${cost:.6f} in all (not in the table)"
            + (f", {unparsed} verdicts without a leading yes/no (incorrect)" if unparsed else "")
        )


def _interval_text(interval: Interval, pattern: str) -> str:
    if not math.isfinite(interval.estimate):
        return "-"
    return (
        f"{pattern.format(interval.estimate)} "
        f"[{pattern.format(interval.low)}, {pattern.format(interval.high)}]"
    )


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None or not math.isfinite(value) else pattern.format(value)


def eval_charts(summary: Summary, route: str) -> dict[str, str]:
    """SVG charts by file stem: accuracy, latency p50/p95 and cost per 1k requests."""
    from gateway.charts import interval_bars

    rows = summary.variants

    def bars(get: Callable[[Any], Interval], scale: float = 1.0) -> list[Any]:
        out = []
        for row in rows:
            i = get(row)
            out.append((row.variant, i.estimate * scale, i.low * scale, i.high * scale))
        return out

    def point(value: float | None) -> Interval:
        v = math.nan if value is None else value
        return Interval(v, v, v)

    return {
        f"{route}-eval-accuracy": interval_bars(
            f"{route}: accuracy (95% Wilson interval)",
            bars(lambda r: r.accuracy, 100),
            unit="% correct",
            fmt="{:.1f}",
        ),
        f"{route}-eval-latency-p50": interval_bars(
            f"{route}: latency p50 (95% bootstrap interval)",
            bars(lambda r: r.latency_p50_s),
            unit="seconds",
            fmt="{:.3f}",
        ),
        f"{route}-eval-latency-p95": interval_bars(
            f"{route}: latency p95 (95% bootstrap interval)",
            bars(lambda r: r.latency_p95_s),
            unit="seconds",
            fmt="{:.3f}",
        ),
        f"{route}-eval-cost-per-1k": interval_bars(
            f"{route}: cost per 1,000 requests",
            bars(lambda r: point(r.cost_per_1k_usd)),
            unit="USD",
            fmt="${:.4f}",
        ),
    }


def write_charts(summary: Summary, route: str, directory: Path) -> list[Path]:
    from gateway.charts import write_pngs

    try:
        return write_pngs(eval_charts(summary, route), directory)
    except (RuntimeError, OSError) as exc:
        raise EvalFailed(f"cannot write the charts: {exc}") from None
