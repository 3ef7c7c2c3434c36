"""`turnout eval`, the pure parts: datasets, scorers and the aggregation into a result.

No I/O beyond reading a dataset file (`load_dataset`); the HTTP side, the progress bar, the
table and the charts are in `gateway/eval_cli.py`.

Dataset: JSON lines, one example per line, `{"messages": [...], "expected": ...}` or
`{"prompt": "...", "expected": ...}` (one user message), with an optional `id` (string or
integer; default: the line number) and an optional `params` object merged into the request
body (`temperature`, `max_tokens`, ...). Blank lines are skipped; other keys are ignored.

Accuracy counts every example sent: an error (a non-2xx answer or no answer at all) is an
incorrect answer, also counted apart. Latency and tokens are over the answers (2xx); cost is
over every request whose answer carried `x-turnout-cost-usd`. Every variant answers the same
examples, so each variant's accuracy is compared with the first's by a paired interval.

JSON has no NaN or infinity: a dataset line carrying one is refused, and the result maps any
non-finite number to null (`finite_json`).
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from router.stats import (
    Difference,
    Interval,
    bootstrap,
    diff_of_paired_proportions_ci,
    finite,
    mean,
    percentile,
    wilson,
)

Json = dict[str, Any]
ScorerName = Literal["exact", "normalised", "regex", "json-field", "judge"]
SCORERS: tuple[ScorerName, ...] = ("exact", "normalised", "regex", "json-field", "judge")
Scorer = Callable[[str, object], bool]  # (answer, expected) -> correct
RESERVED_PARAMS = ("model", "messages", "prompt", "stream", "stream_options")
PLACEHOLDER = "{expected}"
RESAMPLES = 1000
DEFAULT_MAX_ERROR_RATE = 0.5


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the line."""


# Datasets


@dataclass(frozen=True)
class Example:
    """One labelled example: what to send and the answer expected."""

    id: str
    messages: list[Json]
    expected: Any
    params: Json = field(default_factory=dict)
    line: int = 0

    @property
    def question(self) -> str:
        """The last user message's text ('' if there is none), as the judge is shown it."""
        return last_user_text(self.messages) or ""


def load_dataset(path: str | Path) -> list[Example]:
    """Read and parse a dataset file (see parse_dataset)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the dataset: {exc.strerror or exc}") from None
    return parse_dataset(data.splitlines(), source=str(path))


def parse_dataset(lines: Iterable[str | bytes], *, source: str = "dataset") -> list[Example]:
    """Examples from JSON lines; any bad line is a DatasetError naming its number."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        where = f"{source} line {number}"
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(f"{where}: not UTF-8 text") from None
        if not raw.strip():
            continue
        example = parse_example(raw, number, where)
        if example.id in seen:
            raise DatasetError(f"{where}: id {example.id!r} is also on line {seen[example.id]}")
        seen[example.id] = number
        examples.append(example)
    if not examples:
        raise DatasetError(f"{source}: no examples")
    return examples


def parse_example(text: str, number: int, where: str) -> Example:
    """One dataset line (see the module's docstring)."""
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except _NotFinite as exc:
        raise DatasetError(f"{where}: {exc} is not a JSON number (no NaN or infinity)") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {_kind(obj)}")
    if "expected" not in obj or obj["expected"] is None:
        raise DatasetError(f"{where}: `expected` is missing")
    messages = _messages_of(obj, where)
    ident = obj.get("id", number)
    if isinstance(ident, bool) or not isinstance(ident, str | int) or ident == "":
        raise DatasetError(f"{where}: `id` must be a non-empty string or an integer")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise DatasetError(f"{where}: `params` must be an object, got {_kind(params)}")
    reserved = sorted(set(params) & set(RESERVED_PARAMS))
    if reserved:
        raise DatasetError(f"{where}: `params` may not set {', '.join(reserved)}")
    return Example(str(ident), messages, obj["expected"], params, number)


class _NotFinite(ValueError):
    """NaN, Infinity or a number too large for a float: Python's json reads them, JSON has
    none (and the result, written as strict JSON, could not carry them)."""


def _no_constant(name: str) -> object:
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def _messages_of(obj: Json, where: str) -> list[Json]:
    if ("messages" in obj) == ("prompt" in obj):
        raise DatasetError(f"{where}: give exactly one of `messages` or `prompt`")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise DatasetError(f"{where}: `prompt` must be a non-empty string")
        return [{"role": "user", "content": prompt}]
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: `messages` must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DatasetError(f"{where}: messages[{i}] must be an object with a string `role`")
    return messages


def _kind(value: object) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The text of the last user message (text parts joined), or None if there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return None


def content_text(content: object) -> str:
    """A message's content as text: a string, or the `text` of its parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def expected_text(expected: object) -> str:
    """The expected value as text: a string as it is, anything else as compact JSON."""
    return expected if isinstance(expected, str) else json.dumps(expected, ensure_ascii=False)


# Scorers


@dataclass(frozen=True)
class ScorerSpec:
    """The scorer chosen on the command line and its options."""

    name: ScorerName = "normalised"
    pattern: str | None = None  # regex: the pattern with `{expected}` inserted (escaped)
    field: str | None = None  # json-field: a dotted path, `a.b` or `items.0.name`
    judge: str | None = None  # judge: the variant asked

    def check(self) -> None:
        """ValueError for options that do not fit the scorer."""
        if self.name not in SCORERS:
            raise ValueError(f"unknown scorer {self.name!r} (choose one of {', '.join(SCORERS)})")
        if self.pattern is not None:
            if self.name != "regex":
                raise ValueError("--pattern goes with --scorer regex")
            if PLACEHOLDER not in self.pattern:
                raise ValueError(f"--pattern must contain {PLACEHOLDER}")
            try:
                re.compile(self.pattern.replace(PLACEHOLDER, "x"))
            except re.error as exc:
                raise ValueError(f"--pattern is not a valid regex: {exc}") from None
        if (self.field is not None) != (self.name == "json-field"):
            raise ValueError("--scorer json-field needs --field (and only it takes one)")
        if self.field is not None and not all(self.field.split(".")):
            raise ValueError(f"--field {self.field!r} is not a dotted path such as a.b")
        if (self.judge is not None) != (self.name == "judge"):
            raise ValueError("--scorer judge needs --judge VARIANT (and only it takes one)")


def check_examples(examples: Sequence[Example], spec: ScorerSpec) -> None:
    """DatasetError (naming the line) for an expected value the scorer cannot use."""
    for example in examples:
        where = f"line {example.line}"
        if spec.name in ("exact", "normalised", "regex") and not isinstance(example.expected, str):
            raise DatasetError(f"{where}: `expected` must be a string for --scorer {spec.name}")
        if spec.name == "regex" and spec.pattern is None:
            try:
                re.compile(example.expected)
            except re.error as exc:
                raise DatasetError(f"{where}: `expected` is not a valid regex: {exc}") from None


def make_scorer(spec: ScorerSpec) -> Scorer:
    """The scoring function for every scorer but `judge` (which asks a variant)."""
    if spec.name == "exact":
        return score_exact
    if spec.name == "normalised":
        return score_normalised
    if spec.name == "regex":
        pattern = spec.pattern
        return lambda answer, expected: score_regex(answer, expected, pattern)
    if spec.name == "json-field":
        path = spec.field or ""
        return lambda answer, expected: score_json_field(answer, expected, path)
    raise ValueError(f"scorer {spec.name!r} has no scoring function of its own")


def score_exact(answer: str, expected: object) -> bool:
    """String equality, nothing forgiven."""
    return answer == expected


_STRIPPED = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026"


def normalise(text: str) -> str:
    """Casefolded, whitespace collapsed, surrounding punctuation and quotes stripped."""
    return " ".join(text.casefold().split()).strip(_STRIPPED)


def score_normalised(answer: str, expected: object) -> bool:
    return isinstance(expected, str) and normalise(answer) == normalise(expected)


def score_regex(answer: str, expected: object, pattern: str | None = None) -> bool:
    """The stripped answer fully matches `expected` as a regex, or `pattern` with the
    expected text inserted (escaped) at `{expected}`."""
    if not isinstance(expected, str):
        return False
    regex = expected if pattern is None else pattern.replace(PLACEHOLDER, re.escape(expected))
    return re.fullmatch(regex, answer.strip()) is not None


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)```", re.DOTALL)
_MISSING = object()


def parse_json_answer(answer: str) -> object:
    """The answer as JSON: the whole text, else the first ``` (or ```json) fenced block
    that parses; `_MISSING` when neither does."""
    candidates = [answer.strip(), *(m.group(1).strip() for m in _FENCE.finditer(answer))]
    for text in candidates:
        try:
            return json.loads(text)
        except ValueError:
            continue
    return _MISSING


def json_field(value: object, path: str) -> object:
    """The value at a dotted path (`a.b`, `items.0`); `_MISSING` if there is none."""
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def json_equal(value: object, expected: object) -> bool:
    """Equal JSON values (numbers by value, but True is not 1); a string expected also
    matches a number or boolean field written the same way (`"42"` matches 42)."""
    if isinstance(expected, str) and (_is_number(value) or isinstance(value, bool)):
        return json.dumps(value) == expected.strip()
    return _same_json(value, expected)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same_json(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def score_json_field(answer: str, expected: object, path: str) -> bool:
    """The answer parsed as JSON (a fenced ```json block tolerated) has `expected` at `path`."""
    parsed = parse_json_answer(answer)
    if parsed is _MISSING:
        return False
    value = json_field(parsed, path)
    return value is not _MISSING and json_equal(value, expected)


# The judge

JUDGE_SYSTEM = (
    "You grade answers. Compare the candidate answer with the reference answer to the "
    "question. Reply with one word first: yes if the candidate answer is correct (it says the "
    "same as the reference answer), no if it is not."
)


def judge_messages(question: str, expected: object, answer: str) -> list[Json]:
    """The fixed prompt the judge variant is asked."""
    user = (
        f"<question>\n{question}\n</question>\n\n"
        f"<reference>\n{expected_text(expected)}\n</reference>\n\n"
        f"<candidate>\n{answer}\n</candidate>\n\n"
        "Is the candidate answer correct? Answer yes or no."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_VERDICT = re.compile(r"^[\W_]*(yes|no)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """A leading yes (True) or no (False), after any punctuation or markup; else None."""
    match = _VERDICT.match(text)
    return None if match is None else match.group(1).lower() == "yes"


# Outcomes and their aggregation


@dataclass
class Outcome:
    """One example sent to one variant: what came back and whether it was right."""

    example_id: str
    variant: str
    status: int | None  # the HTTP status; None when no answer came (timeout, reset)
    answer: str | None
    correct: bool
    latency_s: float
    expected: Any = None
    cost_usd: float | None = None
    request_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    judge_verdict: bool | None = None
    judge_answer: str | None = None
    judge_cost_usd: float | None = None
    judge_request_id: str | None = None
    judge_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    examples: int
    correct: int
    accuracy: Interval
    errors: int
    latency_p50_s: Interval
    latency_p95_s: Interval
    cost_per_1k_usd: float | None
    cost_usd: float
    prompt_tokens_per_request: float | None
    completion_tokens_per_request: float | None
    tokens: int
    judge_cost_usd: float
    judge_unparsed: int  # the judge answered without a leading yes/no
    judge_errors: int = 0  # the judge call failed (no verdict)
    judged: int = 0  # answers the judge was asked about

    @property
    def error_rate(self) -> float:
        return self.errors / self.examples if self.examples else 0.0

    @property
    def judge_failure_rate(self) -> float:
        return (self.judge_unparsed + self.judge_errors) / self.judged if self.judged else 0.0


@dataclass(frozen=True)
class Comparison:
    """Accuracy of `variant` minus that of `baseline` (the first variant), over the examples
    both answered: `both` right, `only_baseline`, `only_variant`, `neither`."""

    baseline: str
    variant: str
    difference: Difference
    both: int = 0
    only_baseline: int = 0
    only_variant: int = 0
    neither: int = 0
    method: str = "paired"

    @property
    def pairs(self) -> int:
        return self.both + self.only_baseline + self.only_variant + self.neither


@dataclass(frozen=True)
class Summary:
    variants: list[VariantSummary]
    comparisons: list[Comparison]


def summarise(
    outcomes: Sequence[Outcome],
    variants: Sequence[str],
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> Summary:
    """Per variant (in the order given): accuracy with its 95% Wilson interval, errors,
    latency p50/p95 with bootstrap intervals, cost and tokens; then each variant's accuracy
    difference from the first over the examples both answered (Newcombe's paired interval:
    the variants answered the same examples, so their answers are not independent)."""
    by_variant = {name: [o for o in outcomes if o.variant == name] for name in variants}
    rows = [summarise_variant(name, by_variant[name], seed, resamples) for name in variants]
    comparisons = [
        compare_paired(variants[0], by_variant[variants[0]], name, by_variant[name])
        for name in variants[1:]
    ]
    return Summary(rows, comparisons)


def compare_paired(
    baseline: str, base_outcomes: Sequence[Outcome], variant: str, outcomes: Sequence[Outcome]
) -> Comparison:
    """The 2x2 table of right/wrong on the examples both variants answered (matched by
    example id), and the paired interval of `variant`'s accuracy minus `baseline`'s."""
    base_right = {o.example_id: o.correct for o in base_outcomes}
    cells = Counter(
        (base_right[o.example_id], o.correct) for o in outcomes if o.example_id in base_right
    )
    both, only_base = cells[True, True], cells[True, False]
    only_variant, neither = cells[False, True], cells[False, False]
    difference = diff_of_paired_proportions_ci(both, only_base, only_variant, neither)
    return Comparison(baseline, variant, difference, both, only_base, only_variant, neither)


def summarise_variant(
    name: str, outcomes: Sequence[Outcome], seed: int = 0, resamples: int = RESAMPLES
) -> VariantSummary:
    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency_s for o in ok]
    costs = [o.cost_usd for o in outcomes if o.cost_usd is not None]
    prompts = [float(o.prompt_tokens) for o in ok if o.prompt_tokens is not None]
    completions = [float(o.completion_tokens) for o in ok if o.completion_tokens is not None]
    correct = sum(1 for o in outcomes if o.correct)

    def boot(q: float) -> Interval:
        rng = random.Random(f"{seed}:{name}:latency-p{q:g}")
        return bootstrap(latencies, lambda v: percentile(v, q), rng, resamples)

    return VariantSummary(
        variant=name,
        examples=len(outcomes),
        correct=correct,
        accuracy=wilson(correct, len(outcomes)),
        errors=len(outcomes) - len(ok),
        latency_p50_s=boot(50),
        latency_p95_s=boot(95),
        cost_per_1k_usd=mean(costs) * 1000 if costs else None,
        cost_usd=math.fsum(costs),
        prompt_tokens_per_request=mean(prompts) if prompts else None,
        completion_tokens_per_request=mean(completions) if completions else None,
        tokens=int(sum(prompts) + sum(completions)),
        judge_cost_usd=math.fsum(o.judge_cost_usd or 0.0 for o in outcomes),
        judge_unparsed=sum(
            1 for o in outcomes if o.judge_answer is not None and o.judge_verdict is None
        ),
        judge_errors=sum(1 for o in outcomes if o.judge_error is not None),
        judged=sum(1 for o in outcomes if o.judge_answer is not None or o.judge_error is not None),
    )


# What makes a run fail (exit 1) once it is done


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_failure(summary: Summary, outcomes: Sequence[Outcome], max_rate: float) -> str | None:
    """Why the run failed when a variant's share of errored requests (non-2xx or no answer)
    exceeds `max_rate`: those variants and the commonest error among them; else None."""
    over = [row for row in summary.variants if row.error_rate > max_rate]
    if not over:
        return None
    names = {row.variant for row in over}
    errors = Counter(
        o.error for o in outcomes if o.variant in names and not o.ok and o.error is not None
    )
    shares = ", ".join(f"{r.variant} {r.errors} of {r.examples} ({r.error_rate:.0%})" for r in over)
    text = (
        f"too many requests failed (more than --max-error-rate {max_rate:.0%} of a variant's): "
        f"{shares}"
    )
    if errors:
        message, count = errors.most_common(1)[0]
        text += f"; most common error ({count}x): {_clip(message)}"
    return text


def judge_failure(
    summary: Summary,
    outcomes: Sequence[Outcome],
    max_rate: float,
    judge: str,
    judge_route: str,
    route: str,
) -> str | None:
    """Why the run failed when, for a variant, the judge gave no verdict (its answer had no
    leading yes/no, or the call failed) for more than `max_rate` of the answers it was asked
    about; else None."""
    over = [row for row in summary.variants if row.judged and row.judge_failure_rate > max_rate]
    if not over:
        return None
    names = {row.variant for row in over}
    shares = ", ".join(
        f"{r.variant} {r.judge_unparsed + r.judge_errors} of {r.judged} "
        f"({r.judge_unparsed} unparsed, {r.judge_errors} failed)"
        for r in over
    )
    text = (
        f"the judge `{judge}` gave no verdict for more than --max-error-rate {max_rate:.0%} "
        f"of the answers: {shares}"
    )
    sample = next(
        (
            o
            for o in outcomes
            if o.variant in names and o.judge_answer is not None and o.judge_verdict is None
        ),
        None,
    )
    if sample is not None and sample.judge_answer is not None:
        text += f"; it answered e.g. {_clip(sample.judge_answer, 60)!r}"
    errors = Counter(o.judge_error for o in outcomes if o.variant in names and o.judge_error)
    if errors:
        message, count = errors.most_common(1)[0]
        text += f"; most common judge error ({count}x): {_clip(message)}"
    if judge_route == route:
        text += (
            f". The judge is forced on --route `{route}`, where a variant usually carries the "
            "task's own system prompt: give --judge-route ROUTE, a route with a plain "
            "variant (no task prompt) to judge"
        )
    return text


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, infinity), however deep, made null: what
    `json.dumps(..., allow_nan=False)` accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def result_json(summary: Summary, outcomes: Sequence[Outcome], meta: Mapping[str, Any]) -> Json:
    """The JSON result: `meta` (route, scorer, dataset, ...), the per-variant figures, the
    (paired) comparisons with the first variant, the judge's cost and one row per example
    sent; non-finite numbers anywhere are null."""
    variants: Json = {}
    for row in summary.variants:
        variants[row.variant] = {
            "examples": row.examples,
            "correct": row.correct,
            "accuracy": row.accuracy.as_json(),
            "errors": row.errors,
            "latency_s": {
                "p50": row.latency_p50_s.as_json(),
                "p95": row.latency_p95_s.as_json(),
            },
            "cost_usd": row.cost_usd,
            "cost_per_1k_requests_usd": finite(row.cost_per_1k_usd),
            "prompt_tokens_per_request": finite(row.prompt_tokens_per_request),
            "completion_tokens_per_request": finite(row.completion_tokens_per_request),
            "tokens": row.tokens,
            "judge_cost_usd": row.judge_cost_usd,
            "judged": row.judged,
            "judge_unparsed": row.judge_unparsed,
            "judge_errors": row.judge_errors,
        }
    comparisons = [
        {
            "baseline": c.baseline,
            "variant": c.variant,
            "method": c.method,
            "accuracy_difference": c.difference.as_json(),
            "significant": c.difference.significant,
            "pairs": c.pairs,
            "both_correct": c.both,
            "only_baseline_correct": c.only_baseline,
            "only_variant_correct": c.only_variant,
            "neither_correct": c.neither,
        }
        for c in summary.comparisons
    ]
    result: Json = finite_json(
        {
            **meta,
            "level": 0.95,
            "variants": variants,
            "comparisons": comparisons,
            "judge_cost_usd": math.fsum(row.judge_cost_usd for row in summary.variants),
            "rows": [row_json(o) for o in outcomes],
        }
    )
    return result


def row_json(outcome: Outcome) -> Json:
    """One per-example row; judge fields only when a judge was asked."""
    fields = asdict(outcome)
    row = {"id": fields.pop("example_id"), **fields}
    if outcome.judge_answer is None and outcome.judge_error is None:
        for key in [k for k in row if k.startswith("judge_")]:
            del row[key]
    return row
