"""`turnout eval`'s pure parts: datasets, scorers, aggregation; and the simulated upstream that
knows a task (its answers, usage and configuration checks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config_check import check_path, check_settings
from gateway.eval import (
    DatasetError,
    Example,
    Outcome,
    ScorerSpec,
    check_examples,
    error_failure,
    finite_json,
    judge_failure,
    judge_messages,
    load_dataset,
    make_scorer,
    normalise,
    parse_dataset,
    parse_verdict,
    result_json,
    score_exact,
    score_json_field,
    score_normalised,
    score_regex,
    summarise,
)
from gateway.settings import SimulatedUpstream
from gateway.tokens import TokenCounter
from router.stats import diff_of_proportions_ci
from serving.sim_answers import UNSURE, load_answers, token_pieces
from serving.simulated import SimProfile, create_simulated_app

# Datasets


def test_dataset_lines_of_both_shapes_with_ids_and_params() -> None:
    lines = [
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}],'
        ' "expected": "a1", "id": "x"}',
        "",
        '{"prompt": "q2", "expected": {"k": 1}, "params": {"max_tokens": 5}}',
        '   {"prompt": "q3", "expected": "a3", "id": 7, "label": "ignored"}  ',
    ]
    examples = parse_dataset(lines)
    assert [e.id for e in examples] == ["x", "3", "7"]  # default id: the line number
    assert [e.line for e in examples] == [1, 3, 4]
    assert examples[0].question == "q1"
    assert examples[1].messages == [{"role": "user", "content": "q2"}]
    assert examples[1].expected == {"k": 1}
    assert examples[1].params == {"max_tokens": 5}
    assert examples[2].params == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ("[1, 2]", "line 2: expected a JSON object, got a list"),
        ('{"prompt": "q"}', "line 2: `expected` is missing"),
        ('{"prompt": "q", "expected": null}', "line 2: `expected` is missing"),
        ('{"expected": "a"}', "line 2: give exactly one of `messages` or `prompt`"),
        ('{"prompt": "q", "messages": [], "expected": "a"}', "give exactly one of"),
        ('{"prompt": "", "expected": "a"}', "line 2: `prompt` must be a non-empty string"),
        ('{"messages": [], "expected": "a"}', "line 2: `messages` must be a non-empty list"),
        ('{"messages": [{"content": "q"}], "expected": "a"}', "messages[0] must be an object"),
        ('{"prompt": "q", "expected": "a", "id": true}', "line 2: `id` must be"),
        ('{"prompt": "q", "expected": "a", "id": "one"}', "line 2: id 'one' is also on line 1"),
        ('{"prompt": "q", "expected": "a", "params": [1]}', "line 2: `params` must be an object"),
        (
            '{"prompt": "q", "expected": "a", "params": {"stream": true, "model": "m"}}',
            "line 2: `params` may not set model, stream",
        ),
    ],
)
def test_bad_dataset_lines_are_named_by_number(line: str, message: str) -> None:
    first = '{"prompt": "q0", "expected": "a", "id": "one"}'
    with pytest.raises(DatasetError, match=r"^data line") as caught:
        parse_dataset([first, line], source="data")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ('{"prompt": "q", "expected": NaN}', "NaN"),
        ('{"prompt": "q", "expected": {"x": [Infinity]}}', "Infinity"),
        ('{"prompt": "q", "expected": -Infinity}', "-Infinity"),
        ('{"prompt": "q", "expected": 1e999}', "1e999"),
        ('{"prompt": "q", "expected": "a", "params": {"temperature": NaN}}', "NaN"),
    ],
)
def test_non_finite_numbers_are_refused_with_the_line(line: str, name: str) -> None:
    """Python's json reads NaN and Infinity (and 1e999 as infinity); JSON has none, and the
    result must stay strict JSON."""
    json.loads(line)  # accepted by the standard library: the dataset reader must say no
    with pytest.raises(DatasetError) as caught:
        parse_dataset(['{"prompt": "q0", "expected": "a"}', line], source="data")
    assert str(caught.value) == f"data line 2: {name} is not a JSON number (no NaN or infinity)"


def test_dataset_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "q", "expected": "a"}\n\xff\xfe\n')
    with pytest.raises(DatasetError, match=r"d.jsonl line 2: not UTF-8"):
        load_dataset(path)
    path.write_text("\n  \n")
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="cannot read the dataset"):
        load_dataset(tmp_path / "missing.jsonl")


def test_examples_must_suit_the_scorer() -> None:
    examples = parse_dataset(['{"prompt": "q", "expected": "a"}', '{"prompt": "r", "expected": 3}'])
    with pytest.raises(DatasetError, match="line 2: `expected` must be a string"):
        check_examples(examples, ScorerSpec("exact"))
    check_examples(examples, ScorerSpec("json-field", field="a"))  # any JSON value will do
    bad_regex = parse_dataset(['{"prompt": "q", "expected": "(unclosed"}'])
    with pytest.raises(DatasetError, match="line 1: `expected` is not a valid regex"):
        check_examples(bad_regex, ScorerSpec("regex"))
    check_examples(bad_regex, ScorerSpec("regex", pattern="{expected}"))  # inserted escaped


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ScorerSpec("json-field"), "needs --field"),
        (ScorerSpec("exact", field="a"), "needs --field"),
        (ScorerSpec("json-field", field="a..b"), "not a dotted path"),
        (ScorerSpec("judge"), "needs --judge"),
        (ScorerSpec("exact", judge="j"), "needs --judge"),
        (ScorerSpec("exact", pattern="{expected}"), "--pattern goes with --scorer regex"),
        (ScorerSpec("regex", pattern="^a$"), "must contain {expected}"),
        (ScorerSpec("regex", pattern="({expected}"), "not a valid regex"),
        (ScorerSpec("fuzzy"), "unknown scorer"),  # type: ignore[arg-type]
    ],
)
def test_scorer_options_are_checked(spec: ScorerSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec.check()


# Scorers


def test_exact_forgives_nothing() -> None:
    assert score_exact("billing", "billing")
    assert not score_exact("billing ", "billing")
    assert not score_exact("Billing", "billing")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("  Billing.", "billing"),
        ('"billing"', "billing"),
        ("\u201cBilling\u201d!", "billing"),
        ("**bug**", "bug"),
        ("Account\n", "account"),
        ("new   york\tcity", "New York City"),
        ("STRASSE", "straße"),  # casefold, not lower
        ("'e-mail'", "E-mail"),
    ],
)
def test_normalised_matches(answer: str, expected: str) -> None:
    assert score_normalised(answer, expected)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("billing issue", "billing"), ("e mail", "e-mail"), ("bug", "bugs"), ("", "x")],
)
def test_normalised_keeps_inner_words_and_punctuation(answer: str, expected: str) -> None:
    assert not score_normalised(answer, expected)


def test_normalise_edge_cases() -> None:
    assert normalise("  ...  ") == ""
    assert normalise("C++") == "c"  # surrounding punctuation goes, as documented
    assert not score_normalised("billing", 3)


def test_regex_fullmatches_the_stripped_answer() -> None:
    assert score_regex(" billing\n", "bill(ing)?")
    assert not score_regex("billing and bug", "billing")  # fullmatch, not search
    assert score_regex("(?i)x", r"\(\?i\)x")
    assert score_regex("Billing.", "billing", r"(?i)\s*{expected}\.?")
    # the expected text is inserted escaped: "C++" is literal
    assert score_regex("I'd say C++", "C++", r".*{expected}")
    assert not score_regex("I'd say CCC", "C++", r".*{expected}")
    assert not score_regex("a", 1)


@pytest.mark.parametrize(
    ("answer", "field", "expected", "correct"),
    [
        ('{"label": "bug"}', "label", "bug", True),
        ('{"label": "bug"}', "label", "billing", False),
        ('  {"a": {"b": [1, {"c": true}]}} ', "a.b.1.c", True, True),
        ('{"a": {"b": [1, {"c": 1}]}}', "a.b.1.c", True, False),  # True is not 1
        ('{"n": 42}', "n", "42", True),  # a string expected matches a number written alike
        ('{"n": 42.0}', "n", 42, True),
        ('{"ok": false}', "ok", "false", True),
        ('{"o": {"x": [1, 2]}}', "o", {"x": [1, 2]}, True),
        ('{"o": {"x": [1, 2]}}', "o", {"x": [1, 2], "y": 3}, False),
        ('{"label": "bug"}', "missing", "bug", False),
        ('{"items": [1]}', "items.3", 1, False),
        ("not json at all", "label", "bug", False),
        ('Here you go:\n```json\n{"label": "bug"}\n```\nanything else?', "label", "bug", True),
        ('```\n{"label": "bug"}\n```', "label", "bug", True),
        ('```json\n{broken\n```\n```json\n{"label": "bug"}\n```', "label", "bug", True),
        ('{"label": null}', "label", "null", False),
    ],
)
def test_json_field(answer: str, field: str, expected: Any, correct: bool) -> None:
    assert score_json_field(answer, expected, field) is correct
    assert make_scorer(ScorerSpec("json-field", field=field))(answer, expected) is correct


def test_make_scorer_picks_the_function() -> None:
    assert make_scorer(ScorerSpec("exact"))("a", "a")
    assert make_scorer(ScorerSpec("normalised"))("A.", "a")
    assert make_scorer(ScorerSpec("regex", pattern="{expected}!"))("a.!", "a.")
    with pytest.raises(ValueError, match="no scoring function"):
        make_scorer(ScorerSpec("judge", judge="j"))


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("yes", True),
        ("Yes.", True),
        ("  YES, the answer matches", True),
        ("**No** - it says bug", False),
        ('"no"', False),
        ("No", False),
        ("Not quite", None),
        ("nope", None),
        ("yesterday", None),
        ("The answer is yes", None),  # only a leading verdict counts
        ("", None),
    ],
)
def test_judge_verdict_is_a_leading_yes_or_no(text: str, verdict: bool | None) -> None:
    assert parse_verdict(text) is verdict


def test_judge_prompt_carries_question_reference_and_candidate() -> None:
    messages = judge_messages("Why was I charged twice?", {"label": "billing"}, "bug")
    assert messages[0]["role"] == "system"
    assert "yes" in messages[0]["content"] and "no" in messages[0]["content"]
    user = messages[1]["content"]
    assert "<question>\nWhy was I charged twice?\n</question>" in user
    assert '<reference>\n{"label": "billing"}\n</reference>' in user
    assert "<candidate>\nbug\n</candidate>" in user


# Aggregation


def outcome(variant: str, correct: bool, **fields: Any) -> Outcome:
    fields.setdefault("status", 200)
    fields.setdefault("latency_s", 1.0)
    fields.setdefault("answer", "x")
    return Outcome(example_id=fields.pop("id", "e"), variant=variant, correct=correct, **fields)


def test_summary_figures_checked_by_hand() -> None:
    outcomes = [
        outcome(
            "a", True, id="1", latency_s=1, cost_usd=0.001, prompt_tokens=10, completion_tokens=2
        ),
        outcome(
            "a", True, id="2", latency_s=3, cost_usd=0.003, prompt_tokens=20, completion_tokens=4
        ),
        outcome(
            "a", True, id="3", latency_s=2, cost_usd=0.002, prompt_tokens=30, completion_tokens=6
        ),
        outcome("a", False, id="4", status=502, answer=None, latency_s=9.0, error="502: upstream"),
        outcome("b", True, id="1", latency_s=0.5, cost_usd=0.0),
        outcome("b", False, id="2", latency_s=0.5, cost_usd=0.0),
        outcome("b", False, id="3", status=None, answer=None, latency_s=60.0, error="ReadTimeout"),
        outcome("b", False, id="4", latency_s=0.5, cost_usd=0.0),
    ]
    summary = summarise(outcomes, ["a", "b"], resamples=200)
    a, b = summary.variants
    assert (a.examples, a.correct, a.errors) == (4, 3, 1)
    # Wilson, 3 of 4, z=1.96: centre (0.75 + 0.4802) / 1.9604, half-width 0.32689
    assert a.accuracy.estimate == 0.75
    assert a.accuracy.low == pytest.approx(0.30064, abs=1e-4)
    assert a.accuracy.high == pytest.approx(0.95442, abs=1e-4)
    # latency over the three answers only: 1, 2, 3
    assert a.latency_p50_s.estimate == 2.0
    assert a.latency_p95_s.estimate == pytest.approx(2.9)
    assert 1.0 <= a.latency_p50_s.low <= 2.0 <= a.latency_p50_s.high <= 3.0
    assert a.cost_per_1k_usd == pytest.approx(2.0)  # mean of 0.001..0.003, x 1000
    assert a.cost_usd == pytest.approx(0.006)
    assert a.prompt_tokens_per_request == 20.0
    assert a.completion_tokens_per_request == 4.0
    assert a.tokens == 72
    assert (b.examples, b.correct, b.errors) == (4, 1, 1)
    assert b.latency_p50_s.estimate == 0.5
    assert b.cost_per_1k_usd == 0.0
    assert b.prompt_tokens_per_request is None
    [comparison] = summary.comparisons
    assert (comparison.baseline, comparison.variant) == ("a", "b")
    assert comparison.method == "paired"
    # by example: 1 right in both, 2 and 3 right in a only, 4 wrong in both
    assert (comparison.both, comparison.only_baseline) == (1, 2)
    assert (comparison.only_variant, comparison.neither, comparison.pairs) == (0, 1, 4)
    assert comparison.difference.estimate == pytest.approx(-0.5)
    assert comparison.difference.low < -0.5 < comparison.difference.high
    assert not comparison.difference.significant  # 4 examples each say little


def test_a_large_difference_is_significant() -> None:
    outcomes = [outcome("a", i < 90, id=str(i)) for i in range(100)] + [
        outcome("b", i < 50, id=str(i)) for i in range(100)
    ]
    summary = summarise(outcomes, ["a", "b"], resamples=50)
    difference = summary.comparisons[0].difference
    assert difference.estimate == pytest.approx(-0.4)
    assert difference.significant and difference.high < 0


def test_the_comparison_is_paired_by_example() -> None:
    """70 vs 78 of 100, the same 68 right in both: the paired interval sees that the variants
    mostly agree and finds the difference; treating them as independent samples would not."""
    right_a = set(range(70))
    right_b = set(range(68)) | set(range(70, 80))
    outcomes = [outcome("a", i in right_a, id=f"e{i}") for i in range(100)]
    outcomes += [outcome("b", i in right_b, id=f"e{i}") for i in reversed(range(100))]
    [comparison] = summarise(outcomes, ["a", "b"], resamples=10).comparisons
    assert (comparison.both, comparison.only_baseline, comparison.only_variant) == (68, 2, 10)
    assert comparison.neither == 20
    difference = comparison.difference
    assert difference.estimate == pytest.approx(0.08)
    assert difference.significant and 0 < difference.low < 0.08 < difference.high
    independent = diff_of_proportions_ci(70, 100, 78, 100)
    assert not independent.significant and independent.width > difference.width


def test_a_variant_missing_examples_is_compared_on_the_shared_ones() -> None:
    outcomes = [outcome("a", True, id="1"), outcome("a", False, id="2"), outcome("b", True, id="2")]
    [comparison] = summarise(outcomes, ["a", "b"], resamples=10).comparisons
    assert (comparison.pairs, comparison.only_variant) == (1, 1)


def test_error_failure_names_the_variants_and_the_commonest_error() -> None:
    outcomes = [outcome("ok", True, id=str(i)) for i in range(10)]
    outcomes += [
        outcome("bad", False, id=str(i), status=502, answer=None, error="502: upstream down")
        for i in range(6)
    ]
    outcomes += [outcome("bad", False, id="6", status=None, answer=None, error="ReadError")]
    outcomes += [outcome("bad", True, id=str(i)) for i in range(7, 10)]
    summary = summarise(outcomes, ["ok", "bad"], resamples=10)
    assert summary.variants[1].error_rate == pytest.approx(0.7)
    text = error_failure(summary, outcomes, 0.5)
    assert text == (
        "too many requests failed (more than --max-error-rate 50% of a variant's): "
        "bad 7 of 10 (70%); most common error (6x): 502: upstream down"
    )
    assert error_failure(summary, outcomes, 0.7) is None  # exceeding, not reaching, fails
    assert error_failure(summary, outcomes, 1.0) is None
    all_failed = summarise(outcomes[10:17], ["bad"], resamples=10)
    assert error_failure(all_failed, outcomes, 0.99) is not None


def test_judge_failure_counts_unparsed_and_failed_verdicts() -> None:
    outcomes = [
        outcome("v", False, id="1", judge_answer="billing"),
        outcome("v", False, id="2", judge_answer="bug"),
        outcome("v", False, id="3", judge_error="500: boom"),
        outcome("v", True, id="4", judge_answer="Yes", judge_verdict=True),
        outcome("v", False, id="5", status=500, answer=None, error="500: x"),  # not judged
    ]
    summary = summarise(outcomes, ["v"], resamples=10)
    row = summary.variants[0]
    assert (row.judged, row.judge_unparsed, row.judge_errors) == (4, 2, 1)
    text = judge_failure(summary, outcomes, 0.5, "j", "support", "support")
    assert text is not None
    assert text.startswith(
        "the judge `j` gave no verdict for more than --max-error-rate 50% of the answers: "
        "v 3 of 4 (2 unparsed, 1 failed); it answered e.g. 'billing'; "
        "most common judge error (1x): 500: boom. The judge is forced on --route `support`"
    )
    assert "--judge-route" in text
    other_route = judge_failure(summary, outcomes, 0.5, "j", "judges", "support")
    assert other_route is not None and "--judge-route" not in other_route
    assert judge_failure(summary, outcomes, 0.75, "j", "support", "support") is None
    unjudged = summarise([outcome("v", True)], ["v"], resamples=10)
    assert judge_failure(unjudged, [], 0.0, "j", "r", "r") is None


def test_finite_json_makes_every_non_finite_number_null() -> None:
    value = {"a": [1.0, math.nan, {"b": math.inf}], "c": (-math.inf, 2), "d": "NaN", "e": True}
    assert finite_json(value) == {
        "a": [1.0, None, {"b": None}],
        "c": [None, 2],
        "d": "NaN",
        "e": True,
    }


def test_result_json_has_rows_and_no_nan() -> None:
    outcomes = [
        outcome("a", True, id="t1", cost_usd=0.5, request_id="r1", expected="x"),
        outcome(
            "b", False, id="t1", status=500, answer=None, error="500: boom", judge_cost_usd=0.1
        ),
        outcome("b", True, id="t2", judge_answer="Yes", judge_verdict=True, judge_cost_usd=0.2),
        outcome("b", False, id="t3", judge_answer="Maybe", judge_cost_usd=0.3),
        outcome("b", False, id="t4", judge_error="500: judge down", latency_s=math.nan),
    ]
    summary = summarise(outcomes, ["a", "b", "c"], resamples=20)
    result = result_json(summary, outcomes, {"route": "r", "weird": math.inf})
    text = json.dumps(result, allow_nan=False)  # no NaN anywhere
    assert json.loads(text)["route"] == "r"
    assert result["variants"]["c"]["examples"] == 0
    assert result["variants"]["c"]["accuracy"]["estimate"] is None
    assert result["variants"]["b"]["judge_cost_usd"] == pytest.approx(0.6)
    assert result["variants"]["b"]["judge_unparsed"] == 1
    assert result["variants"]["b"]["judge_errors"] == 1
    assert result["variants"]["b"]["judged"] == 3
    assert result["judge_cost_usd"] == pytest.approx(0.6)
    assert [c["variant"] for c in result["comparisons"]] == ["b", "c"]
    assert [c["method"] for c in result["comparisons"]] == ["paired", "paired"]
    assert result["comparisons"][0]["pairs"] == 1  # only t1 was sent to both a and b
    assert result["comparisons"][1]["accuracy_difference"]["estimate"] is None  # c: no pairs
    assert result["weird"] is None
    assert result["rows"][4]["latency_s"] is None
    first = result["rows"][0]
    assert list(first)[:3] == ["id", "variant", "status"]
    assert first | {"latency_s": 0} == first | {
        "id": "t1",
        "variant": "a",
        "answer": "x",
        "correct": True,
        "cost_usd": 0.5,
        "request_id": "r1",
        "expected": "x",
        "latency_s": 0,
    }
    assert not any(k.startswith("judge_") for k in first)  # no judge asked
    assert result["rows"][2]["judge_verdict"] is True


# The simulated upstream that knows a task

TICKETS: list[dict[str, Any]] = [
    {"prompt": "I was charged twice", "expected": "billing"},
    {"messages": [{"role": "user", "content": "The app crashes"}], "expected": "bug"},
    {"prompt": "Reset my password", "expected": "account"},
    {"prompt": "Schön, danke — ümlauts?", "expected": "Größe ✓ 日本語"},
]


def write_answers(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def test_token_pieces_join_to_the_text_one_per_token() -> None:
    counter = TokenCounter()
    for text in ["billing", "Größe ✓ 日本語 🎉", "", "a  b\n"]:
        pieces = token_pieces(counter, text)
        assert "".join(pieces) == text
        assert len(pieces) == counter.text(text)


def test_answers_are_deterministic_and_follow_accuracy(tmp_path: Path) -> None:
    many = [{"prompt": f"ticket {i}", "expected": ["a", "b", "c"][i % 3]} for i in range(600)]
    answers = load_answers(write_answers(tmp_path / "a.jsonl", many))
    messages = [[{"role": "user", "content": f"ticket {i}"}] for i in range(600)]
    got = [answers.answer(m, "m", {"m": 0.8}, None) for m in messages]
    assert got == [answers.answer(m, "m", {"m": 0.8}, None) for m in messages]
    right = sum(1 for row, text in zip(many, got, strict=True) if text == row["expected"])
    assert 0.75 < right / 600 < 0.85
    assert all(text in ("a", "b", "c") for text in got)  # wrong answers are other labels
    assert answers.answer(messages[0], "other", {"m": 0.0}, None) == "a"  # unlisted: right
    never = [answers.answer(m, "m", {"m": 0.0}, None) for m in messages[:30]]
    assert all(text != row["expected"] for text, row in zip(never, many, strict=False))
    assert answers.answer([{"role": "user", "content": "unknown"}], "m", {}, None) is None
    seeded = [answers.answer(m, "m", {"m": 0.5}, 1) for m in messages]
    assert seeded != [answers.answer(m, "m", {"m": 0.5}, 2) for m in messages]


def test_a_single_label_file_answers_unsure_when_wrong(tmp_path: Path) -> None:
    answers = load_answers(write_answers(tmp_path / "a.jsonl", TICKETS[:1]))
    assert (
        answers.answer([{"role": "user", "content": "I was charged twice"}], "m", {"m": 0}, 0)
        == UNSURE
    )


def test_sim_profile_refuses_a_bad_accuracy() -> None:
    with pytest.raises(ValueError, match="accuracy of 'm' must be in"):
        SimProfile(accuracy={"m": 1.5})


async def chat(app: Any, body: dict[str, Any]) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def test_the_simulator_answers_known_questions_with_consistent_usage(tmp_path: Path) -> None:
    path = write_answers(tmp_path / "a.jsonl", TICKETS)
    app = create_simulated_app(SimProfile(ttft_ms=0, tokens_per_s=math.inf, answers=str(path)))
    counter = TokenCounter()
    for row in TICKETS:
        messages = row.get("messages") or [
            {"role": "system", "content": "You classify tickets."},
            {"role": "user", "content": "an example"},
            {"role": "assistant", "content": "bug"},
            {"role": "user", "content": row["prompt"]},
        ]
        data = await chat(app, {"model": "m", "messages": messages})
        text = data["choices"][0]["message"]["content"]
        assert text == row["expected"]
        assert data["choices"][0]["finish_reason"] == "stop"
        assert data["usage"]["completion_tokens"] == counter.text(text)
    # max_tokens cuts a known answer ("length"), usage counting what was sent
    question = [{"role": "user", "content": TICKETS[3]["prompt"]}]
    data = await chat(app, {"model": "m", "messages": question, "max_tokens": 2})
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 2
    # an unknown question gets pseudo-words, as before
    data = await chat(app, {"model": "m", "messages": [{"role": "user", "content": "hello?"}]})
    assert data["usage"]["completion_tokens"] == 16


async def test_the_simulator_streams_a_known_answer(tmp_path: Path) -> None:
    path = write_answers(tmp_path / "a.jsonl", TICKETS)
    app = create_simulated_app(SimProfile(ttft_ms=0, tokens_per_s=math.inf, answers=str(path)))
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": TICKETS[3]["prompt"]}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        response = await client.post("/v1/chat/completions", json=body)
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == TICKETS[3]["expected"]
    assert events[-1]["usage"]["completion_tokens"] == TokenCounter().text(text)


# Checking the new simulated-upstream fields


def sim_config(**upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"sim": {"kind": "simulated", **upstream}},
        "variants": {"v": {"upstream": "sim", "model": "m"}},
        "routes": {"r": {"split": {"v": 1}}},
    }


def found(config: dict[str, Any], **kwargs: Any) -> dict[str, tuple[str, str]]:
    _, problems = check_settings(config, {}, **kwargs)
    return {p.path: (p.severity, p.message) for p in problems}


def test_existing_simulated_configs_stay_valid() -> None:
    settings, problems = check_settings(sim_config(), {})
    assert settings is not None and problems == []
    upstream = settings.upstreams["sim"]
    assert isinstance(upstream, SimulatedUpstream)
    assert (upstream.answers, upstream.accuracy) == (None, {})


def test_accuracy_is_checked_at_a_dotted_path(tmp_path: Path) -> None:
    path = str(write_answers(tmp_path / "a.jsonl", TICKETS))
    problems = found(sim_config(answers=path, accuracy={"m": 1.2, "n": -0.1, "ok": 0.5}))
    assert problems["upstreams.sim.accuracy.m"][1] == "must be from 0 to 1, got 1.2"
    assert problems["upstreams.sim.accuracy.n"][0] == "error"
    assert "upstreams.sim.accuracy.ok" not in problems
    served = found(sim_config(models=["m"], answers=path, accuracy={"m": 0.5, "typo": 0.5}))
    assert served == {
        "upstreams.sim.accuracy.typo": (
            "error",
            "'typo' is not served by this upstream (it serves: m)",
        )
    }
    useless = found(sim_config(accuracy={"m": 0.5}))
    assert useless == {"upstreams.sim.accuracy": ("warning", "has no effect without `answers`")}


def test_answers_file_must_exist_and_parse(tmp_path: Path) -> None:
    missing = found(sim_config(answers=str(tmp_path / "nope.jsonl")))
    assert missing["upstreams.sim.answers"][1].startswith("cannot read")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "expected": "a"}\n{"prompt": "q2"}\n')
    problems = found(sim_config(answers=str(bad)))
    assert "line 2: `expected` is missing" in problems["upstreams.sim.answers"][1]


def test_answers_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    write_answers(folder / "tickets.jsonl", TICKETS)
    config = folder / "turnout.yaml"
    config.write_text(json.dumps(sim_config(answers="tickets.jsonl", accuracy={"m": 0.9})))
    settings, problems = check_path(config, {}, strict=True)
    assert problems == [] and settings is not None
    upstream = settings.upstreams["sim"]
    assert isinstance(upstream, SimulatedUpstream)
    assert upstream.answers == str(folder / "tickets.jsonl")
    # from a dict, a relative path is the cwd's (the file is not in it)
    assert "upstreams.sim.answers" in found(sim_config(answers="tickets.jsonl"))
    assert found(sim_config(answers="tickets.jsonl"), base_dir=folder) == {}


def test_examples_reference_the_dataset() -> None:
    root = Path(__file__).resolve().parents[2] / "examples"
    settings, problems = check_path(root / "eval.yaml", {"TURNOUT_ADMIN_KEY": "k"}, strict=True)
    assert problems == [] and settings is not None
    examples = load_dataset(root / "support-eval.jsonl")
    assert len(examples) == 200
    assert {e.expected for e in examples} == {"billing", "bug", "account", "other"}
    assert len({e.question for e in examples}) == 200
    assert isinstance(examples[0], Example)
