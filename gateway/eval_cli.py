"""`turnout eval`: send a labelled dataset through a gateway to each variant of a route, forced
with the variant header of gateway/proxy.py (admin key), score the answers and report accuracy,
latency and cost.

The I/O half: the gateway (a running one, or one built from a config file in this process),
the HTTP calls, the progress bar, the table, the JSON result and the charts. Datasets,
scorers and figures are in gateway/eval.py.

A run stops at once (exit 1, no result) on what no later request can get past: a gateway that
cannot be reached or talked to before it has answered once, a refused admin key, an unknown
route or variant, a wrong path (404 `not_found`) and a variant whose upstream refuses the
gateway's credentials or configuration (502 `upstream_rejected`). Rate limits (429) are
retried after their Retry-After. Other failures are counted per request; once the run is done
it fails (exit 1, the result still written) when a variant's share of errors, or the judge's
share of answers without a verdict, exceeds `--max-error-rate`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.auth import ADMIN_KEY_ENV
from gateway.eval import (
    DEFAULT_MAX_ERROR_RATE,
    DatasetError,
    Example,
    Outcome,
    Scorer,
    ScorerSpec,
    Summary,
    check_examples,
    error_failure,
    finite_json,
    judge_failure,
    judge_messages,
    load_dataset,
    make_scorer,
    parse_verdict,
    result_json,
    summarise,
)
from gateway.proxy import FORCE_HEADER
from router.stats import Interval

EVAL_KEY_ENV = "TURNOUT_EVAL_ADMIN_KEY"  # the in-process gateway's own admin key, if needed
DEFAULT_OUT = Path("eval-result.json")
RATE_LIMIT_RETRIES = 5  # a 429 is retried this many times, then counted as an error
RETRY_WAIT_S = 1.0  # the first wait after a 429 without Retry-After (then doubled)
MAX_RETRY_WAIT_S = 60.0  # a longer Retry-After is cut to this
CONNECT_TIMEOUT_S = 10.0
Json = dict[str, Any]


class EvalFailed(Exception):
    """The evaluation cannot go on, or went wrong; the message says why and what to do."""

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
    admin_key_env: str = ADMIN_KEY_ENV  # --base-url's admin key is read from this variable
    config: Path | None = None  # run a gateway from this file, in this process
    allow_redis: bool = False  # -c: a config with state.redis_url may run (it writes there)
    out: Path = DEFAULT_OUT
    charts: Path | None = None
    timeout_s: float = 120.0  # total deadline of each request
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE


@dataclass
class EvalRun:
    """What an evaluation produced."""

    result: Json
    summary: Summary
    outcomes: list[Outcome]
    out: Path
    charts: list[Path]


async def run_eval(options: EvalOptions, console: Console, err_console: Console) -> EvalRun:
    """The whole evaluation: check, gateway, send, score, write, show; then EvalFailed (exit
    1) if too many requests failed or the judge gave too few verdicts. `console` shows the
    table; `err_console` the progress bar, warnings and notes."""
    _check_options(options)
    target = None if options.base_url is None else GatewayURL.parse(options.base_url)
    try:
        examples = load_dataset(options.dataset)
        check_examples(examples, options.scorer)
    except DatasetError as exc:
        raise EvalFailed(str(exc), 2) from None
    async with _gateway(options, target, err_console) as (base_url, api_key, shown):
        limits = httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=32)
        # The deadline is asyncio's (`_Caller._post`); httpx's own, a little later, only
        # backs it up. Connecting has a shorter one (a ConnectTimeout, fatal at first).
        timeout = httpx.Timeout(
            options.timeout_s + 5.0, connect=min(CONNECT_TIMEOUT_S, options.timeout_s * 0.9)
        )
        async with httpx.AsyncClient(
            base_url=base_url, timeout=timeout, limits=limits, trust_env=False
        ) as client:
            caller = _Caller(client, api_key, shown, options.timeout_s)
            variants = options.variants or await _split_variants(caller, options.route)
            outcomes = await _evaluate(caller, options, examples, variants, err_console)
    summary = summarise(outcomes, variants)
    judge_route = options.judge_route or options.route
    found = [error_failure(summary, outcomes, options.max_error_rate)]
    if options.scorer.judge is not None:
        found.append(
            judge_failure(
                summary,
                outcomes,
                options.max_error_rate,
                options.scorer.judge,
                judge_route,
                options.route,
            )
        )
    problems = [text for text in found if text is not None]
    meta = {
        "route": options.route,
        "dataset": str(options.dataset),
        "examples": len(examples),
        "scorer": _scorer_json(options.scorer, judge_route),
        "gateway": shown if target is not None else f"in-process ({options.config})",
        "generated_at": time.time(),
        "max_error_rate": options.max_error_rate,
        "problems": problems,
    }
    result = result_json(summary, outcomes, meta)
    write_result(options.out, result)
    render(console, summary, options)
    console.print(f"result: {escape(str(options.out))}")
    charts: list[Path] = []
    if options.charts is not None:
        charts = write_charts(summary, options.route, options.charts)
        console.print(f"charts: {escape(', '.join(str(p) for p in charts))}")
    if problems:
        raise EvalFailed("\n".join(problems) + f" (the result is in {options.out})")
    return EvalRun(result, summary, outcomes, options.out, charts)


def _check_options(options: EvalOptions) -> None:
    try:
        options.scorer.check()
    except ValueError as exc:
        raise EvalFailed(str(exc), 2) from None
    if options.concurrency < 1:
        raise EvalFailed("--concurrency must be at least 1", 2)
    if not options.timeout_s > 0 or not math.isfinite(options.timeout_s):
        raise EvalFailed("--timeout must be a positive number of seconds", 2)
    if not 0 <= options.max_error_rate <= 1:
        raise EvalFailed("--max-error-rate must be from 0 to 1", 2)
    if (options.base_url is None) == (options.config is None):
        raise EvalFailed("give either --base-url (a running gateway) or -c (a config to run)", 2)


def write_result(path: Path, result: Json) -> None:
    """The result as strict JSON (no NaN or infinity: those are null)."""
    text = json.dumps(finite_json(result), indent=2, ensure_ascii=False, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


# The gateway


@dataclass(frozen=True)
class GatewayURL:
    """--base-url, checked: `url` is what requests go to (one trailing `/v1` removed: the
    gateway's API paths carry their own), `shown` the same without credentials (for messages
    and the result)."""

    url: str
    shown: str
    stripped_v1: bool = False
    had_credentials: bool = False

    @classmethod
    def parse(cls, raw: str) -> GatewayURL:
        text = raw.strip()
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = None
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EvalFailed(
                f"--base-url {_without_credentials(text)!r} is not an http:// or https:// URL "
                "(say e.g. http://127.0.0.1:8080)",
                2,
            )
        path = parts.path.rstrip("/")
        stripped = path.endswith("/v1")
        if stripped:
            path = path[: -len("/v1")]
        host = parts.hostname
        netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
        # Credentials in the URL are never sent: httpx would turn them into a Basic
        # Authorization header that replaces the admin key's.
        url = urlunsplit((parts.scheme, netloc, path, parts.query, ""))
        had = parts.username is not None or parts.password is not None
        return cls(url, url, stripped, had)

    @property
    def exposes_key(self) -> bool:
        """The admin key would cross a network in clear: plain http to a non-loopback host."""
        parts = urlsplit(self.url)
        if parts.scheme != "http":
            return False
        host = (parts.hostname or "").rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True


def _without_credentials(text: str) -> str:
    parts = urlsplit(text)
    if "@" not in parts.netloc:
        return text
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


@asynccontextmanager
async def _gateway(
    options: EvalOptions, target: GatewayURL | None, err_console: Console
) -> AsyncIterator[tuple[str, str, str]]:
    """(base URL, admin key, base URL to show) of the gateway: the running one named, or one
    served in this process from the config for the evaluation's duration."""
    if target is not None:
        key = os.environ.get(options.admin_key_env, "").strip()
        if not key:
            raise EvalFailed(
                f"`turnout eval` needs the gateway's admin key in ${options.admin_key_env} "
                "(--admin-key-env names the variable)",
                2,
            )
        if target.had_credentials:
            _warn(err_console, "the user:password in --base-url is ignored (never sent)")
        if target.exposes_key:
            _warn(
                err_console,
                f"the admin key goes to {target.shown} over plain http://: anyone on the "
                "way can read it; use https:// (or a loopback address)",
            )
        if target.stripped_v1:
            _note(err_console, f"--base-url without its trailing /v1: {target.shown}")
        yield target.url, key, target.shown
        return
    assert options.config is not None
    from gateway.app import create_app
    from gateway.config_check import check_path
    from serving.loopback import on_loopback

    settings, problems = check_path(options.config, os.environ, strict=False)
    if settings is None:
        lines = "\n".join(str(p) for p in problems if p.severity == "error")
        raise EvalFailed(f"{options.config} has problems:\n{lines}", 2)
    for problem in problems:  # an unset admin key is no problem here: eval makes one up
        if problem.severity == "warning" and problem.path != "admin_key_env":
            _warn(err_console, f"{options.config}: {problem}")
    if settings.state.redis_url is not None and not options.allow_redis:
        raise EvalFailed(
            f"{options.config} sets state.redis_url: the gateway `turnout eval` runs from it "
            "would write into that Redis (budget spend, rate-limit counters, keys, "
            "assignments, records and feedback), which may be production's. Evaluate with a "
            "copy of the config without state.redis_url, or give --allow-redis if that Redis "
            "is meant for it",
            2,
        )
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
            yield url, key, url
    finally:
        log.setLevel(level)


def _warn(console: Console, text: str) -> None:
    console.print(f"[yellow]warning[/] {escape(text)}", soft_wrap=True)


def _note(console: Console, text: str) -> None:
    console.print(f"[dim]note[/] {escape(text)}", soft_wrap=True)


class _Fatal(Exception):
    """An answer that means no other request can succeed either."""


@dataclass
class _Reply:
    status: int | None
    body: Json | None
    headers: Mapping[str, str]
    latency_s: float
    error: str | None = None


async def _sleep(seconds: float) -> None:  # the wait after a 429 (tests replace it)
    await asyncio.sleep(seconds)


def retry_delay(value: str | None, attempt: int, now: float | None = None) -> float:
    """Seconds to wait before retrying a 429: its Retry-After (seconds or an HTTP date),
    else RETRY_WAIT_S doubled per attempt; never negative, at most MAX_RETRY_WAIT_S."""
    seconds = _retry_after(value, time.time() if now is None else now)
    if seconds is None:
        seconds = RETRY_WAIT_S * 2**attempt
    if not math.isfinite(seconds):
        seconds = MAX_RETRY_WAIT_S
    return min(max(seconds, 0.0), MAX_RETRY_WAIT_S)


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return float(parsedate_to_datetime(value).timestamp()) - now
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class _Caller:
    def __init__(
        self, client: httpx.AsyncClient, api_key: str, shown: str, timeout_s: float
    ) -> None:
        self.client = client
        self.auth = {"authorization": f"Bearer {api_key}"}
        self.shown = shown
        self.timeout_s = timeout_s
        # Until the gateway has answered once, a transport error is the gateway's (wrong URL,
        # nothing listening, not HTTP): fatal. After, it is the one request's: counted.
        self.answered = False

    def _unreachable(self, exc: httpx.TransportError) -> _Fatal:
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return _Fatal(f"cannot reach the gateway at {self.shown}: {detail}")

    def _not_found(self, path: str, data: Json | None, text: str) -> _Fatal:
        return _Fatal(
            f"{self.shown}{path} is not found (404: {_message(data, text)}): --base-url must "
            "be the gateway's root URL, without /v1 or any other path (one trailing /v1 is "
            "removed already)"
        )

    async def chat(self, route: str, variant: str, body: Json) -> _Reply:
        """One forced chat completion; a 429 is retried after its Retry-After, up to
        RATE_LIMIT_RETRIES times, then returned (an error)."""
        headers = self.auth | {FORCE_HEADER: variant}
        payload = {"model": route, "temperature": 0} | body | {"model": route, "stream": False}
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            reply = await self._post(payload, headers)
            if reply.status != 429:
                break
            if attempt == RATE_LIMIT_RETRIES:
                reply.error = f"{reply.error} (still after {RATE_LIMIT_RETRIES} retries)"
                return reply
            await _sleep(retry_delay(reply.headers.get("retry-after"), attempt))
        if reply.status is not None and not 200 <= reply.status < 300:
            self._raise_if_fatal(reply.status, reply.body, reply.error or "", route, variant)
        return reply

    async def _post(self, payload: Json, headers: Mapping[str, str]) -> _Reply:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.post(
                    "/v1/chat/completions", json=payload, headers=headers
                )
        except TimeoutError:
            elapsed = time.perf_counter() - start
            return _Reply(None, None, {}, elapsed, f"no answer within {self.timeout_s:g} s")
        except httpx.TransportError as exc:  # a reset, a connection refused
            if not self.answered:
                raise self._unreachable(exc) from None
            elapsed = time.perf_counter() - start
            return _Reply(None, None, {}, elapsed, f"{type(exc).__name__}: {exc}".rstrip(": "))
        elapsed = time.perf_counter() - start
        self.answered = True
        data = _json_of(response)
        reply = _Reply(response.status_code, data, response.headers, elapsed)
        if not response.is_success:
            reply.error = f"{response.status_code}: {_message(data, response.text)}"
        elif data is None:
            reply.error = "the answer is not a JSON object"
        return reply

    def _raise_if_fatal(
        self, status: int, data: Json | None, text: str, route: str, variant: str
    ) -> None:
        error = (data or {}).get("error")
        error = error if isinstance(error, dict) else {}
        code = error.get("code")
        if status in (401, 403):
            raise _Fatal(_admin_needed(status, data, text))
        if status == 404 and code == "model_not_found":
            raise _Fatal(f"unknown route `{route}`: {_message(data, text)}")
        if status == 404:  # `not_found`, or not Turnout's answer at all: a wrong path
            raise self._not_found("/v1/chat/completions", data, text)
        if status == 400 and error.get("param") == FORCE_HEADER:
            raise _Fatal(f"unknown variant `{variant}` on route `{route}`: {_message(data, text)}")
        if status == 502 and code == "upstream_rejected":
            raise _Fatal(
                f"variant `{variant}` (route `{route}`): its upstream refused the gateway's "
                f"credentials or configuration (502 upstream_rejected: {_message(data, text)}); "
                "check the provider key and the upstream of that variant in the gateway's config"
            )

    async def split_variants(self, route: str) -> list[str]:
        """The route's split variants, from the report endpoint (no records: cheap)."""
        future = time.time() + 365 * 86400  # `since` after every record: nothing to compute
        path = "/turnout/report"
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.get(
                    path, params={"route": route, "since": str(future)}, headers=self.auth
                )
        except TimeoutError:
            raise _Fatal(
                f"no answer from the gateway at {self.shown} within {self.timeout_s:g} s"
            ) from None
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        self.answered = True
        data = _json_of(response)
        if response.status_code in (401, 403):
            raise _Fatal(_admin_needed(response.status_code, data, response.text))
        if response.status_code == 404:
            error = (data or {}).get("error")
            if isinstance(error, dict) and error.get("param") == "route":
                raise _Fatal(f"unknown route `{route}`: the gateway has no such route")
            raise self._not_found(path, data, response.text)
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
    return " ".join(text.split())[:200]


def _admin_needed(status: int, data: Json | None, text: str) -> str:
    return (
        f"the gateway refused the key ({status}: {_message(data, text)}); `turnout eval` needs "
        "the gateway's admin key (in $TURNOUT_ADMIN_KEY, or the variable --admin-key-env "
        "names) to force variants"
    )


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
    """Every example to every variant (interleaved) by `concurrency` workers, each taking the
    next pair when done with its last: tasks and calls in flight stay at `concurrency`,
    whatever the dataset's size."""
    score = None if options.scorer.name == "judge" else make_scorer(options.scorer)
    judge_route = options.judge_route or options.route
    total = len(examples) * len(variants)
    outcomes: list[Outcome | None] = [None] * total
    jobs: Iterator[tuple[int, tuple[Example, str]]] = enumerate(
        (example, variant) for example in examples for variant in variants
    )
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=progress_console, transient=True) as progress:
        task = progress.add_task(f"eval {options.route}", total=total)

        async def worker() -> None:
            for i, (example, variant) in jobs:  # shared: each pair goes to one worker
                reply = await caller.chat(
                    options.route, variant, {"messages": example.messages, **example.params}
                )
                outcome = _outcome(example, variant, reply, score)
                if options.scorer.judge is not None and outcome.ok and outcome.answer is not None:
                    await _judge(caller, judge_route, options.scorer.judge, example, outcome)
                outcomes[i] = outcome
                progress.advance(task)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(options.concurrency, total)):
                    group.create_task(worker())
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
    """One row per variant, the (paired) accuracy difference from the first variant beside
    it; with a judge, how many of its verdicts were unparsed or failed."""
    scorer = options.scorer.name + (f" ({options.scorer.judge})" if options.scorer.judge else "")
    judged = options.scorer.judge is not None
    table = Table(title=f"route {options.route}: {options.dataset.name}, scorer {scorer}")
    columns = [
        "variant",
        "examples",
        "accuracy [95% CI]",
        "errors",
        "p50 s",
        "p95 s",
        "cost / 1k req",
        "tokens / req",
        *(["judge unparsed", "judge errors"] if judged else []),
        f"Δ accuracy vs {summary.variants[0].variant} (paired)",
    ]
    for column in columns:
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
        judge_cells = [_count(row.judge_unparsed), _count(row.judge_errors)] if judged else []
        table.add_row(
            escape(row.variant),
            str(row.examples),
            _interval_text(row.accuracy, "{:.1%}"),
            _count(row.errors),
            _fmt(row.latency_p50_s.estimate, "{:.3f}"),
            _fmt(row.latency_p95_s.estimate, "{:.3f}"),
            _fmt(row.cost_per_1k_usd, "${:.4f}"),
            " + ".join(_fmt(t, "{:.1f}") for t in tokens),
            *judge_cells,
            diff_text,
        )
    console.print(table)
    console.print(
        "tokens / req: prompt + completion; errors (non-2xx or no answer) count as incorrect; "
        "Δ: Newcombe's interval for paired data (every variant answered the same examples)."
    )
    if options.scorer.judge is not None:
        cost = math.fsum(row.judge_cost_usd for row in summary.variants)
        unparsed = sum(row.judge_unparsed for row in summary.variants)
        failed = sum(row.judge_errors for row in summary.variants)
        console.print(
            f"judge {escape(options.scorer.judge)}: ${cost:.6f} in all (not in the table)"
            + (f", {unparsed} verdicts without a leading yes/no (incorrect)" if unparsed else "")
            + (f", {failed} judge calls failed (incorrect)" if failed else "")
        )


def _count(value: int) -> str:
    return f"[red]{value}[/]" if value else "0"


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
