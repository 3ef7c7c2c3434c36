"""`turnout eval` against real gateways on simulated variants of known accuracy: the figures,
the forced requests, the JSON result and charts, the judge, and the errors that stop a run;
and against a scripted fake gateway, for what a real one does not do on demand (rate limits,
slow bodies, failing variants, a judge that cannot judge)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

import gateway.eval_cli as eval_cli
from gateway.app import TurnoutApp
from gateway.cli import app as cli
from gateway.eval import ScorerSpec, load_dataset
from gateway.eval_cli import EvalFailed, EvalOptions, GatewayURL, retry_delay, run_eval
from gateway.proxy import FORCE_HEADER
from serving.sim_answers import load_answers
from tests.integration.conftest import ADMIN_KEY, ENV, Upstreams, running
from tests.servers import serve_app

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "examples" / "support-eval.jsonl"
TRUE_ACCURACY = {"support-ft": 0.92, "support-prompted": 0.85}
MODELS = {"support-ft": "support-lora", "support-prompted": "gpt-4o-mini"}
FAST = {"ttft_ms": 0, "tokens_per_s": 1_000_000}


def eval_config(judge_url: str, answers: str = str(DATASET)) -> dict[str, Any]:
    """Route `support` over two simulated upstreams that know the dataset, and route `judge`
    whose only variant is the fake upstream's judge (priced, so its cost shows)."""
    return {
        "admin_key_env": "TURNOUT_ADMIN_KEY",
        "upstreams": {
            "ft-sim": {
                "kind": "simulated",
                **FAST,
                "models": ["support-lora"],
                "answers": answers,
                "accuracy": {"support-lora": TRUE_ACCURACY["support-ft"]},
                "gpu": {"hourly_usd": 2.49},
            },
            "hosted-sim": {
                "kind": "simulated",
                **FAST,
                "models": ["gpt-4o-mini"],
                "answers": answers,
                "accuracy": {"gpt-4o-mini": TRUE_ACCURACY["support-prompted"]},
            },
            "fake": {"kind": "openai", "base_url": judge_url + "/v1"},
        },
        "variants": {
            "support-ft": {"upstream": "ft-sim", "model": "support-lora"},
            "support-prompted": {
                "upstream": "hosted-sim",
                "model": "gpt-4o-mini",
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
                "prompt": {"system": "Classify the ticket: billing, bug, account or other."},
            },
            "judge": {
                "upstream": "fake",
                "model": "judge",
                "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            },
            # the fake upstream answers 401: the gateway says 502 upstream_rejected
            "rejected": {"upstream": "fake", "model": "error-401", "price": {}},
        },
        "routes": {
            "support": {"split": {"support-ft": 80, "support-prompted": 20}},
            "judge": {"split": {"judge": 1}},
            "broken": {"split": {"rejected": 1}},
        },
    }


@pytest.fixture(scope="module")
def served(upstreams: Upstreams) -> Iterator[tuple[str, TurnoutApp]]:
    with running(eval_config(upstreams.urls[0])) as gateway:
        yield gateway


def expected_correct(variant: str, path: Path = DATASET) -> int:
    """What the simulator decides, example by example: the count the eval must report."""
    answers = load_answers(path)
    accuracy = {MODELS[variant]: TRUE_ACCURACY[variant]}
    return sum(
        1
        for e in load_dataset(path)
        if answers.answer(e.messages, MODELS[variant], accuracy, None) == e.expected
    )


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_ADMIN_KEY", ADMIN_KEY)


def first_lines(tmp_path: Path, count: int) -> Path:
    subset = tmp_path / f"first-{count}.jsonl"
    subset.write_text("".join(DATASET.read_text().splitlines(keepends=True)[:count]))
    return subset


def invoke(argv: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, argv, env=ENV if env is None else env)


def one_line(output: str) -> str:
    return " ".join(output.split())


async def test_accuracy_cost_latency_of_each_variant(
    served: tuple[str, TurnoutApp], tmp_path: Path, admin_env: None
) -> None:
    url, app = served
    before = Counter(r.variant for r in app.gateway.records if r.forced)
    options = EvalOptions(
        dataset=DATASET,
        route="support",
        concurrency=4,
        base_url=url,
        scorer=ScorerSpec("normalised"),
        out=tmp_path / "out" / "result.json",
        charts=tmp_path / "charts",
    )
    console = quiet()
    run = await run_eval(options, console, console)

    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result == json.loads(json.dumps(run.result))
    assert list(result["variants"]) == ["support-ft", "support-prompted"]  # the split's
    for name, truth in TRUE_ACCURACY.items():
        row = result["variants"][name]
        assert row["examples"] == 200 and row["errors"] == 0
        assert row["correct"] == expected_correct(name)
        accuracy = row["accuracy"]
        assert accuracy["estimate"] == row["correct"] / 200
        assert accuracy["low"] <= truth <= accuracy["high"]
        assert 0 < row["latency_s"]["p50"]["estimate"] <= row["latency_s"]["p95"]["estimate"]
        assert row["completion_tokens_per_request"] == 1.0  # one-token labels
        assert row["cost_per_1k_requests_usd"] > 0
    prompted = result["variants"]["support-prompted"]
    assert (
        prompted["prompt_tokens_per_request"]
        > result["variants"]["support-ft"]["prompt_tokens_per_request"]
    )  # the prompt tax
    [comparison] = result["comparisons"]
    assert (comparison["baseline"], comparison["variant"]) == ("support-ft", "support-prompted")
    assert comparison["method"] == "paired" and comparison["pairs"] == 200
    difference = comparison["accuracy_difference"]
    assert difference["low"] <= -0.07 <= difference["high"]
    assert result["gateway"] == url and result["problems"] == []

    rows = result["rows"]
    assert len(rows) == 400 and len({(r["id"], r["variant"]) for r in rows}) == 400
    assert all(r["status"] == 200 and r["request_id"] and r["cost_usd"] is not None for r in rows)
    assert sum(r["correct"] for r in rows if r["variant"] == "support-ft") == expected_correct(
        "support-ft"
    )

    # every request was forced to its variant, and the A/B report leaves them all out
    forced = Counter(r.variant for r in app.gateway.records if r.forced) - before
    assert forced == {"support-ft": 200, "support-prompted": 200}
    ids = {r.request_id for r in app.gateway.records if r.forced}
    assert {r["request_id"] for r in rows} <= ids
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        response = await client.get(
            url + "/turnout/report",
            params={"route": "support"},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        )
    report = response.json()["routes"]["support"]
    assert report["forced_records_excluded"] >= 400
    assert all(v["requests"] == 0 for v in report["variants"].values())

    assert sorted(p.name for p in run.charts) == [
        "support-eval-accuracy.png",
        "support-eval-cost-per-1k.png",
        "support-eval-latency-p50.png",
        "support-eval-latency-p95.png",
    ]
    for path in run.charts:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_judge_scores_answers_and_its_cost_is_apart(
    served: tuple[str, TurnoutApp], tmp_path: Path, admin_env: None
) -> None:
    url, _ = served
    common: dict[str, Any] = {
        "dataset": first_lines(tmp_path, 40),
        "route": "support",
        "variants": ["support-prompted"],
        "concurrency": 4,
        "base_url": url,
    }
    console = quiet()
    judged = await run_eval(
        EvalOptions(
            **common,
            scorer=ScorerSpec("judge", judge="judge"),
            judge_route="judge",
            out=tmp_path / "judged.json",
        ),
        console,
        console,
    )
    plain = await run_eval(
        EvalOptions(**common, scorer=ScorerSpec("exact"), out=tmp_path / "plain.json"),
        console,
        console,
    )
    row = judged.result["variants"]["support-prompted"]
    # the fake judge says yes exactly when the answer is the label: as exact scoring does
    assert row["correct"] == plain.result["variants"]["support-prompted"]["correct"]
    assert 0 < row["correct"] < 40
    assert [r["correct"] for r in judged.result["rows"]] == [
        r["correct"] for r in plain.result["rows"]
    ]
    assert {r["judge_answer"] for r in judged.result["rows"]} == {"Yes.", "No, it differs."}
    # the judge's cost: reported apart, not in the variant's cost
    assert row["judge_cost_usd"] > 0
    assert judged.result["judge_cost_usd"] == pytest.approx(row["judge_cost_usd"])
    assert row["cost_usd"] == pytest.approx(
        plain.result["variants"]["support-prompted"]["cost_usd"]
    )
    assert judged.result["scorer"] == {"name": "judge", "judge": "judge", "judge_route": "judge"}
    assert (row["judged"], row["judge_unparsed"], row["judge_errors"]) == (40, 0, 0)


async def test_the_judge_forced_on_the_task_route_fails_the_run(
    served: tuple[str, TurnoutApp], tmp_path: Path, admin_env: None
) -> None:
    """The default --judge-route is --route: a judge variant carrying the task's own prompt
    answers a label, not yes/no. Every verdict is unparsed: exit 1, the result written."""
    url, _ = served
    out = tmp_path / "judged.json"
    options = EvalOptions(
        dataset=first_lines(tmp_path, 20),
        route="support",
        variants=["support-ft"],
        scorer=ScorerSpec("judge", judge="support-prompted"),
        base_url=url,
        out=out,
    )
    with pytest.raises(EvalFailed) as caught:
        await run_eval(options, quiet(), quiet())
    message = str(caught.value)
    assert caught.value.exit_code == 1
    assert "the judge `support-prompted` gave no verdict" in message
    assert "support-ft 20 of 20 (20 unparsed, 0 failed)" in message
    assert "give --judge-route ROUTE, a route with a plain variant" in message
    result = json.loads(out.read_text())
    row = result["variants"]["support-ft"]
    assert (row["judged"], row["judge_unparsed"], row["judge_errors"]) == (20, 20, 0)
    assert result["problems"] == [message.split(" (the result is in")[0]]


def test_cli_with_a_config_runs_its_own_gateway(tmp_path: Path) -> None:
    """-c: a gateway built from the file in this process; `answers` is relative to the file;
    no admin key in the environment (eval gives its gateway one, and does not warn about
    it); the config's other warnings are shown."""
    folder = tmp_path / "conf"
    folder.mkdir()
    lines = DATASET.read_text().splitlines(keepends=True)[:30]
    (folder / "tickets.jsonl").write_text("".join(lines))
    config = eval_config("http://127.0.0.1:9", answers="tickets.jsonl")
    config["variants"]["unpriced"] = {"upstream": "fake", "model": "judge"}
    (folder / "turnout.yaml").write_text(json.dumps(config))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        cli,
        [
            *("eval", str(folder / "tickets.jsonl"), "--route", "support"),
            *("-c", str(folder / "turnout.yaml"), "--variants", "support-ft", "--out", str(out)),
        ],
        env={"TURNOUT_ADMIN_KEY": ""},
    )
    assert result.exit_code == 0, result.output
    assert "support-ft" in result.output and "accuracy" in result.output
    text = one_line(result.output)
    assert "warning" in text and "variants.unpriced.price: no price on an openai upstream" in text
    assert "admin_key_env" not in text
    data = json.loads(out.read_text())
    row = data["variants"]["support-ft"]
    assert row["examples"] == 30
    assert row["correct"] == expected_correct("support-ft", folder / "tickets.jsonl")


def test_cli_refuses_redis_state_unless_allowed(tmp_path: Path) -> None:
    """An in-process gateway on the production config would spend its budgets, count its
    rate limits and write its records into that Redis: refused before anything runs."""
    config = eval_config("http://127.0.0.1:9")
    config["state"] = {"redis_url": "redis://127.0.0.1:9/0"}
    path = tmp_path / "turnout.yaml"
    path.write_text(json.dumps(config))
    out = tmp_path / "r.json"
    argv = ["eval", str(DATASET), "--route", "support", "-c", str(path), "--out", str(out)]
    result = invoke(argv)
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert "sets state.redis_url" in text and "--allow-redis" in text
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "args", "message"),
    [
        ("not-the-admin-key", [], "needs the gateway's admin key"),
        ("not-the-admin-key", ["--variants", "support-ft"], "admin key"),
        (ADMIN_KEY, ["--variants", "support-ft,nope"], "unknown variant `nope`"),
        (ADMIN_KEY, ["--route", "nope"], "unknown route `nope`"),
        (ADMIN_KEY, ["--route", "nope", "--variants", "v"], "unknown route `nope`"),
        # the fake upstream refuses the gateway's credentials: 502 upstream_rejected
        (ADMIN_KEY, ["--route", "broken"], "variant `rejected` (route `broken`): its upstream"),
    ],
)
def test_cli_stops_with_a_clear_error(
    served: tuple[str, TurnoutApp], tmp_path: Path, key: str, args: list[str], message: str
) -> None:
    url, _ = served
    argv = ["eval", str(DATASET), "--route", "support", "--base-url", url, *args]
    result = invoke([*argv, "--out", str(tmp_path / "r.json")], ENV | {"TURNOUT_ADMIN_KEY": key})
    assert result.exit_code == 1, result.output
    assert message in one_line(result.output)
    assert isinstance(result.exception, SystemExit)  # no traceback
    assert not (tmp_path / "r.json").exists()


def test_cli_reads_the_admin_key_from_the_variable_named(
    served: tuple[str, TurnoutApp], tmp_path: Path
) -> None:
    url, _ = served
    out = tmp_path / "r.json"
    argv = [
        *("eval", str(first_lines(tmp_path, 5)), "--route", "support", "--base-url", url),
        *("--variants", "support-ft", "--admin-key-env", "EVAL_KEY", "--out", str(out)),
    ]
    result = invoke(argv, {"EVAL_KEY": ADMIN_KEY, "TURNOUT_ADMIN_KEY": ""})
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # loopback: no warning about plain http
    missing = invoke(argv, {"TURNOUT_ADMIN_KEY": ADMIN_KEY})
    assert missing.exit_code == 2
    assert "needs the gateway's admin key in $EVAL_KEY" in one_line(missing.output)
    # the key on the command line is gone (it would show in `ps` and shell history)
    old = invoke([*argv[:8], "--api-key", ADMIN_KEY, "--out", str(out)])
    assert old.exit_code == 2 and "--api-key" in old.output


def test_cli_base_url_with_v1_is_the_root(served: tuple[str, TurnoutApp], tmp_path: Path) -> None:
    """The OpenAI client's base URL ends in /v1; eval's is the gateway's root. One trailing
    /v1 is dropped (and said); a path that still 404s stops the run with what to do."""
    url, _ = served
    out = tmp_path / "r.json"
    subset = str(first_lines(tmp_path, 5))
    base = ["eval", subset, "--route", "support", "--out", str(out)]
    result = invoke([*base, "--base-url", url + "/v1/"])
    assert result.exit_code == 0, result.output
    assert f"--base-url without its trailing /v1: {url}" in one_line(result.output)
    assert json.loads(out.read_text())["gateway"] == url
    out.unlink()
    for suffix, variants in [("/v1/v1", []), ("/api", []), ("/api", ["--variants", "support-ft"])]:
        wrong = invoke([*base, "--base-url", url + suffix, *variants])
        assert wrong.exit_code == 1, wrong.output
        text = one_line(wrong.output)
        assert "is not found (404" in text and "must be the gateway's root URL" in text
        assert isinstance(wrong.exception, SystemExit)
        assert not out.exists()


def test_cli_unreachable_gateway(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            *("eval", str(DATASET), "--route", "support", "--base-url", "http://127.0.0.1:9"),
            *("--variants", "a", "--out", str(tmp_path / "r.json")),
        ],
        env=ENV,
    )
    assert result.exit_code == 1
    assert "cannot reach the gateway" in result.output


@contextlib.contextmanager
def not_http() -> Iterator[str]:
    """A server that answers anything with a line that is not HTTP, then hangs up (a wrong
    port: an SSH server, a database)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        listener.close()


@pytest.mark.parametrize("variants", [[], ["--variants", "a,b"]])
def test_cli_a_server_that_is_not_the_gateway_stops_the_run(
    tmp_path: Path, variants: list[str]
) -> None:
    """Any transport error before the gateway has answered once is fatal: exit 1, one line,
    no traceback (before, a protocol error counted every request as failed and exited 0)."""
    out = tmp_path / "r.json"
    with not_http() as url:
        argv = ["eval", str(DATASET), "--route", "support", "--base-url", url, *variants]
        result = invoke([*argv, "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    # garbage then a close: which of the two httpx sees first depends on timing
    line = one_line(result.output)
    assert any(f"cannot reach the gateway at {url}: {e}" in line for e in _NOT_HTTP), line
    assert not out.exists()


_NOT_HTTP = ("RemoteProtocolError", "ReadError")


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "localhost:8080", "ftp://host", "http://"])
def test_cli_base_url_must_be_http(tmp_path: Path, url: str) -> None:
    result = invoke(["eval", str(DATASET), "--route", "support", "--base-url", url])
    assert result.exit_code == 2, result.output
    assert "is not an http:// or https:// URL" in one_line(result.output)
    assert isinstance(result.exception, SystemExit)


def test_cli_bad_dataset_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "expected": "b"}\n{"prompt": "c"}\n')
    result = CliRunner().invoke(
        cli, ["eval", str(bad), "--route", "support", "--base-url", "http://127.0.0.1:9"], env=ENV
    )
    assert result.exit_code == 2
    assert "line 2: `expected` is missing" in result.output


async def test_run_eval_needs_one_gateway(tmp_path: Path) -> None:
    with pytest.raises(EvalFailed, match="--base-url"):
        await run_eval(EvalOptions(dataset=DATASET, route="r"), quiet(), quiet())


# A scripted gateway: what each forced variant does is in its name


ANSWER = "right"
TRICKLE_S = 2.0  # `slow` sends its body over this long, a byte at a time


class FakeGateway:
    """Speaks the two endpoints eval uses. `GET /turnout/report` knows route `mixed`
    (variants good, broken) and `good`; the chat answer depends on the forced variant:
    good (the right answer), broken (500), rejected (502 upstream_rejected), limited (429
    twice, then good), always-limited (429), slow (a body trickling for TRICKLE_S), label (a
    judge that answers a label), judge (yes), judge-down (500)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.authorizations: set[str] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        while (await receive()).get("more_body"):
            pass
        self.authorizations.add(headers.get("authorization", ""))
        if headers.get("authorization") != f"Bearer {ADMIN_KEY}":
            return await self.error(send, 401, "Invalid key.", "invalid_api_key")
        if scope["path"] == "/turnout/report":
            route = parse_qs(scope["query_string"].decode())["route"][0]
            routes = {"mixed": ["good", "broken"], "good": ["good"]}
            if route not in routes:
                return await self.error(send, 404, f"No route `{route}`.", "not_found", "route")
            variants: dict[str, Any] = {name: {} for name in routes[route]}
            return await self.json(send, 200, {"routes": {route: {"variants": variants}}})
        if scope["path"] != "/v1/chat/completions":
            return await self.error(send, 404, "Not Found", "not_found")
        variant = headers[FORCE_HEADER]
        self.calls[variant] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.002)
            await self.chat(send, variant)
        finally:
            self.in_flight -= 1

    async def chat(self, send: Any, variant: str) -> None:
        if variant == "broken" or variant == "judge-down":
            return await self.error(send, 500, "boom", "server_error")
        if variant == "rejected":
            return await self.error(send, 502, "upstream says no", "upstream_rejected")
        if variant == "always-limited" or (variant == "limited" and self.calls[variant] <= 2):
            return await self.error(send, 429, "slow down", "rate_limit_exceeded", retry="7")
        if variant == "slow":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(20):
                await send({"type": "http.response.body", "body": b" ", "more_body": True})
                await asyncio.sleep(TRICKLE_S / 20)
            await send({"type": "http.response.body", "body": b"{}"})
            return
        text = {"label": "billing", "judge": "Yes."}.get(variant, ANSWER)
        body = {
            "choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
        await self.json(send, 200, body)

    async def error(
        self,
        send: Any,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        retry: str | None = None,
    ) -> None:
        body = {"error": {"message": message, "type": "x", "param": param, "code": code}}
        await self.json(send, status, body, {"retry-after": retry} if retry else {})

    async def json(
        self, send: Any, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        raw = json.dumps(body).encode()
        pairs = [(b"content-type", b"application/json")]
        pairs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": pairs})
        await send({"type": "http.response.body", "body": raw})


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeGateway]]:
    fake = FakeGateway()
    with serve_app(fake) as url:
        yield url, fake


@pytest.fixture
def fake(fake_server: tuple[str, FakeGateway], admin_env: None) -> tuple[str, FakeGateway]:
    fake_server[1].reset()
    return fake_server


def questions(tmp_path: Path, count: int) -> Path:
    path = tmp_path / f"questions-{count}.jsonl"
    rows = [{"prompt": f"question {i}", "expected": ANSWER} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fake_options(url: str, tmp_path: Path, count: int = 10, **fields: Any) -> EvalOptions:
    fields.setdefault("out", tmp_path / "r.json")
    return EvalOptions(dataset=questions(tmp_path, count), base_url=url, **fields)


def test_cli_exits_1_when_a_variant_mostly_failed_but_writes_the_result(
    fake: tuple[str, FakeGateway], tmp_path: Path
) -> None:
    url, _ = fake
    out = tmp_path / "r.json"
    argv = [
        *("eval", str(questions(tmp_path, 10)), "--route", "mixed", "--base-url", url),
        *("--out", str(out)),
    ]
    result = invoke(argv)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    text = one_line(result.output)
    assert (
        "too many requests failed (more than --max-error-rate 50% of a variant's): "
        "broken 10 of 10 (100%); most common error (10x): 500: boom"
    ) in text
    result_json = json.loads(out.read_text())  # written all the same
    assert result_json["variants"]["broken"]["errors"] == 10
    assert result_json["variants"]["good"]["correct"] == 10
    assert result_json["problems"][0].startswith("too many requests failed")
    tolerant = invoke([*argv, "--max-error-rate", "1"])
    assert tolerant.exit_code == 0, tolerant.output
    assert invoke([*argv, "--max-error-rate", "1.5"]).exit_code == 2


async def test_rate_limits_are_retried_after_their_retry_after(
    fake: tuple[str, FakeGateway], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, gateway = fake
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(eval_cli, "_sleep", sleep)
    options = fake_options(url, tmp_path, 4, route="mixed", variants=["limited"], concurrency=1)
    run = await run_eval(options, quiet(), quiet())
    assert waits == [7.0, 7.0]  # the first two calls were told to wait 7 s
    assert gateway.calls["limited"] == 4 + 2
    assert all(o.ok and o.correct for o in run.outcomes)

    waits.clear()
    options = fake_options(url, tmp_path, 3, route="mixed", variants=["always-limited"])
    with pytest.raises(EvalFailed, match=r"always-limited 3 of 3 \(100%\)") as caught:
        await run_eval(options, quiet(), quiet())
    assert "429: slow down (still after 5 retries)" in str(caught.value)
    assert gateway.calls["always-limited"] == 3 * (1 + eval_cli.RATE_LIMIT_RETRIES)
    assert waits == [7.0] * 3 * eval_cli.RATE_LIMIT_RETRIES


@pytest.mark.parametrize(
    ("value", "attempt", "seconds"),
    [
        ("7", 0, 7.0),
        ("0.25", 3, 0.25),
        ("-3", 0, 0.0),
        ("86400", 0, eval_cli.MAX_RETRY_WAIT_S),
        ("nan", 0, eval_cli.MAX_RETRY_WAIT_S),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 0, 10.0),  # an HTTP date, 10 s after "now"
        (None, 0, 1.0),  # no Retry-After: 1 s, doubled per attempt
        ("soon", 2, 4.0),
    ],
)
def test_retry_delay(value: str | None, attempt: int, seconds: float) -> None:
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert retry_delay(value, attempt, now) == pytest.approx(seconds)


async def test_timeout_is_a_deadline_for_the_whole_request(
    fake: tuple[str, FakeGateway], tmp_path: Path
) -> None:
    """A body that keeps trickling never trips httpx's per-read timeout; --timeout is the
    request's total deadline, as documented."""
    url, _ = fake
    options = fake_options(
        url, tmp_path, 2, route="mixed", variants=["slow"], timeout_s=0.4, max_error_rate=1.0
    )
    start = time.perf_counter()
    run = await run_eval(options, quiet(), quiet())
    assert time.perf_counter() - start < TRICKLE_S * 0.75
    assert [o.error for o in run.outcomes] == ["no answer within 0.4 s"] * 2
    assert all(o.status is None and not o.correct for o in run.outcomes)


async def test_a_fixed_pool_of_workers_sends_the_requests(
    fake: tuple[str, FakeGateway], tmp_path: Path
) -> None:
    """Tasks stay at --concurrency (plus this test's), not one per example and variant."""
    url, gateway = fake
    options = fake_options(url, tmp_path, 120, route="mixed", variants=["good"], concurrency=4)
    most = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal most
        while not done.is_set():
            # anyio's connection attempts (one per connection opened) are httpx's, not ours
            ours = [t for t in asyncio.all_tasks() if "TaskHandle" not in repr(t.get_coro())]
            most = max(most, len(ours))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        run = await run_eval(options, quiet(), quiet())
    finally:
        done.set()
        await watcher
    assert len(run.outcomes) == 120 and all(o.correct for o in run.outcomes)
    assert [o.example_id for o in run.outcomes] == [str(i) for i in range(1, 121)]
    assert most <= 4 + 2  # the workers, this test and its watcher
    assert 1 < gateway.max_in_flight <= 4


async def test_a_judge_that_cannot_judge_fails_the_run(
    fake: tuple[str, FakeGateway], tmp_path: Path
) -> None:
    url, _ = fake
    options = fake_options(url, tmp_path, 6, route="mixed", variants=["good"])
    options.scorer = ScorerSpec("judge", judge="judge-down")
    options.judge_route = "judges"
    with pytest.raises(EvalFailed) as caught:
        await run_eval(options, quiet(), quiet())
    message = str(caught.value)
    assert "good 6 of 6 (0 unparsed, 6 failed)" in message
    assert "most common judge error (6x): 500: boom" in message
    assert "--judge-route ROUTE" not in message  # a judge route was given
    result = json.loads(options.out.read_text())
    assert result["variants"]["good"]["judge_errors"] == 6
    options.scorer = ScorerSpec("judge", judge="judge")
    run = await run_eval(options, quiet(), quiet())
    assert run.result["variants"]["good"]["correct"] == 6


def test_credentials_in_the_base_url_are_neither_sent_nor_written(
    fake: tuple[str, FakeGateway], tmp_path: Path
) -> None:
    url, gateway = fake
    out = tmp_path / "r.json"
    secret_url = url.replace("http://", "http://user:s3cret-pw@")
    argv = [
        *("eval", str(questions(tmp_path, 3)), "--route", "good", "--base-url", secret_url),
        *("--out", str(out)),
    ]
    result = invoke(argv)
    assert result.exit_code == 0, result.output
    assert "user:password in --base-url is ignored" in one_line(result.output)
    assert "s3cret" not in out.read_text() and "s3cret" not in result.output
    assert json.loads(out.read_text())["gateway"] == url
    assert gateway.authorizations == {f"Bearer {ADMIN_KEY}"}  # no Basic auth in its place


def test_cli_warns_once_when_the_admin_key_crosses_a_network_in_clear(
    fake: tuple[str, FakeGateway], tmp_path: Path
) -> None:
    url, _ = fake
    exposed = url.replace("127.0.0.1", "0.0.0.0")  # not loopback; Linux connects it locally
    argv = [
        *("eval", str(questions(tmp_path, 4)), "--route", "good", "--base-url", exposed),
        *("--out", str(tmp_path / "r.json")),
    ]
    result = invoke(argv)
    assert result.exit_code == 0, result.output
    assert one_line(result.output).count("over plain http://") == 1


@pytest.mark.parametrize(
    ("url", "exposed"),
    [
        ("http://127.0.0.1:8080", False),
        ("http://127.8.0.1", False),
        ("http://[::1]:8080", False),
        ("http://localhost:8080/v1", False),
        ("http://api.localhost", False),
        ("https://gateway.example.com", False),
        ("http://gateway.example.com", True),
        ("http://10.0.0.5:8080", True),
        ("http://[2001:db8::1]:8080", True),
    ],
)
def test_which_urls_expose_the_admin_key(url: str, exposed: bool) -> None:
    assert GatewayURL.parse(url).exposes_key is exposed


@pytest.mark.parametrize(
    ("raw", "url", "stripped"),
    [
        ("http://h:8080", "http://h:8080", False),
        ("http://h:8080/", "http://h:8080", False),
        ("http://h:8080/v1", "http://h:8080", True),
        ("http://h:8080/v1/", "http://h:8080", True),
        ("http://h/v1/v1", "http://h/v1", True),  # one only: a second 404s, and says so
        ("https://u:p@h/gw/v1", "https://h/gw", True),
        ("http://[::1]:9/v1", "http://[::1]:9", True),
    ],
)
def test_base_url_normalisation(raw: str, url: str, stripped: bool) -> None:
    parsed = GatewayURL.parse(raw)
    assert (parsed.url, parsed.shown, parsed.stripped_v1) == (url, url, stripped)


async def test_a_transport_error_counts_once_the_gateway_has_answered() -> None:
    """Before the first answer a reset means the URL is wrong (fatal); after it, it is one
    request's failure."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls in (1, 3):
            raise httpx.ReadError("connection reset")
        return httpx.Response(200, json={"choices": [{"message": {"content": "x"}}]})

    async with httpx.AsyncClient(
        base_url="http://gw", transport=httpx.MockTransport(handler)
    ) as client:
        caller = eval_cli._Caller(client, "k", "http://gw", 5.0)
        with pytest.raises(eval_cli._Fatal, match="cannot reach the gateway at http://gw"):
            await caller.chat("r", "v", {"messages": []})
        assert (await caller.chat("r", "v", {"messages": []})).error is None
        failed = await caller.chat("r", "v", {"messages": []})
        assert (failed.status, failed.error) == (None, "ReadError: connection reset")


def test_the_variant_header_is_the_proxy_s() -> None:
    source = Path(eval_cli.__file__).read_text()
    assert '"x-turnout-variant"' not in source and "FORCE_HEADER" in source
