"""`turnout eval` against real gateways on simulated variants of known accuracy: the figures,
the forced requests, the JSON result and charts, the judge, and the errors that stop a run."""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from gateway.app import TurnoutApp
from gateway.cli import app as cli
from gateway.eval import ScorerSpec, load_dataset
from gateway.eval_cli import EvalFailed, EvalOptions, run_eval
from serving.sim_answers import load_answers
from tests.integration.conftest import ADMIN_KEY, ENV, Upstreams, running

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
        },
        "routes": {
            "support": {"split": {"support-ft": 80, "support-prompted": 20}},
            "judge": {"split": {"judge": 1}},
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


async def test_accuracy_cost_latency_of_each_variant(
    served: tuple[str, TurnoutApp], tmp_path: Path
) -> None:
    url, app = served
    before = Counter(r.variant for r in app.gateway.records if r.forced)
    options = EvalOptions(
        dataset=DATASET,
        route="support",
        concurrency=4,
        base_url=url,
        api_key=ADMIN_KEY,
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
    difference = comparison["accuracy_difference"]
    assert difference["low"] <= -0.07 <= difference["high"]

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
    served: tuple[str, TurnoutApp], tmp_path: Path
) -> None:
    url, _ = served
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(DATASET.read_text().splitlines(keepends=True)[:40]))
    common: dict[str, Any] = {
        "dataset": subset,
        "route": "support",
        "variants": ["support-prompted"],
        "concurrency": 4,
        "base_url": url,
        "api_key": ADMIN_KEY,
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


def test_cli_with_a_config_runs_its_own_gateway(tmp_path: Path) -> None:
    """-c: a gateway built from the file in this process; `answers` is relative to the file;
    no admin key in the environment (eval gives its gateway one)."""
    folder = tmp_path / "conf"
    folder.mkdir()
    lines = DATASET.read_text().splitlines(keepends=True)[:30]
    (folder / "tickets.jsonl").write_text("".join(lines))
    config = eval_config("http://127.0.0.1:9", answers="tickets.jsonl")
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
    data = json.loads(out.read_text())
    row = data["variants"]["support-ft"]
    assert row["examples"] == 30
    assert row["correct"] == expected_correct("support-ft", folder / "tickets.jsonl")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key", "not-the-admin-key"], "needs the gateway's admin key"),
        (["--api-key", "not-the-admin-key", "--variants", "support-ft"], "admin key"),
        (["--api-key", ADMIN_KEY, "--variants", "support-ft,nope"], "unknown variant `nope`"),
        (["--api-key", ADMIN_KEY, "--route", "nope"], "unknown route `nope`"),
        (["--api-key", ADMIN_KEY, "--route", "nope", "--variants", "v"], "unknown route `nope`"),
    ],
)
def test_cli_stops_with_a_clear_error(
    served: tuple[str, TurnoutApp], tmp_path: Path, args: list[str], message: str
) -> None:
    url, _ = served
    argv = ["eval", str(DATASET), "--route", "support", "--base-url", url, *args]
    result = CliRunner().invoke(cli, [*argv, "--out", str(tmp_path / "r.json")], env=ENV)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r.json").exists()


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
