"""The shipped Grafana dashboard stays true to the metrics: every series, label and label value
its PromQL names is one the gateway really exports, every metric family is shown, and the layout
is one Grafana imports (unique ids, panels inside the 24-column grid, no overlaps)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_args

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Agreement, Metrics, Outcome
from gateway.records import Latency, RequestRecord, Usage

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "turnout" / "dashboards" / "turnout.json"
GRID_COLUMNS = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ("Cost", "Latency", "Tokens", "Reliability")  # in this order, top to bottom

# Metric families deliberately not on the dashboard: family name -> why. Keep it commented;
# a family listed here must exist and must not also be used (stale entries fail the test).
LEFT_OUT: dict[str, str] = {
    # (none: every family Turnout exports has at least one panel)
}

# Labels whose values are fixed by the code (not by the configuration): a literal matcher
# on one of them must name a value the gateway really produces.
ENUMERATED = ("status_class", "kind", "outcome", "agreement", "feature")
FEATURES = ("rate_limit", "budget", "auth", "assignment")  # Metrics.state_fallback's features
BUILTIN_VARIABLES = {"__rate_interval", "__range", "__interval", "__range_s", "__interval_ms"}

# --------------------------------------------------------------------------- what is exported

Labels = dict[str, set[str]]  # label name -> values seen


@dataclass(frozen=True)
class Exported:
    families: frozenset[str]  # family names (a counter's without _total)
    family_of: dict[str, str]  # series name (turnout_requests_total, …_bucket) -> family
    labels: dict[str, Labels]  # series name -> its labels and their values
    values: Labels  # label -> every value seen on any series (checked for ENUMERATED ones)


def _exercise(metrics: Metrics) -> None:
    """At least one sample of every family, and every value of the enumerated labels."""
    latency = Latency(total=1.5, upstream=1.4, overhead=0.1, ttft=0.3, tpot=0.02)
    usage = Usage(prompt=120, injected=40, completion=30, estimated=True)
    record = RequestRecord(
        request_id="r1", time=0.0, route="chat", variant="prompted", upstream="hosted",
        tuning="prompted", endpoint="chat", stream=True, status=200, latency=latency,
        usage=usage, cost_usd=0.002,
    )  # fmt: skip
    metrics.observe(record)
    for status in (101, 200, 302, 404, 429, 499, 500, 503):
        metrics.rejected(status, "chat", "tuned")
    for outcome in get_args(Outcome):
        metrics.attempt("hosted", outcome)
    for agreement in get_args(Agreement):
        metrics.shadowed("chat", agreement)
    for feature in FEATURES:
        metrics.state_fallback(feature)
    metrics.fallback("chat")
    metrics.circuit("tuned", True)


@cache
def exported() -> Exported:
    registry = CollectorRegistry()
    metrics = Metrics(
        registry, routes=["chat"], upstream_of={"tuned": "vllm", "prompted": "hosted"}
    )
    _exercise(metrics)
    families = frozenset(family.name for family in registry.collect())
    family_of: dict[str, str] = {}
    labels: dict[str, Labels] = defaultdict(lambda: defaultdict(set))
    values: Labels = defaultdict(set)
    text, _ = metrics.render()
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            family_of[sample.name] = family.name
            for name, value in sample.labels.items():
                labels[sample.name][name].add(value)
                values[name].add(value)
    return Exported(families, family_of, dict(labels), dict(values))


# --------------------------------------------------------------------------- PromQL, enough of it

TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\])
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
    """,
    re.VERBOSE,
)
AGGREGATIONS = {
    *("sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk"),
    *("quantile", "count_values", "limitk", "limit_ratio"),
}
FUNCTIONS = AGGREGATIONS | {
    *("rate", "irate", "increase", "delta", "idelta", "deriv", "resets", "changes"),
    *("histogram_quantile", "histogram_fraction", "histogram_count", "histogram_sum"),
    *("abs", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "sqrt", "exp", "ln"),
    *("vector", "scalar", "time", "timestamp", "absent", "absent_over_time", "sort"),
    *("sort_desc", "label_replace", "label_join", "predict_linear", "avg_over_time"),
    *("sum_over_time", "max_over_time", "min_over_time", "count_over_time", "last_over_time"),
    *("quantile_over_time", "present_over_time"),
    "label_values",  # Grafana's template query function, not PromQL's
}
GROUPINGS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
RANGED = {"rate", "irate", "increase", "delta", "idelta", "deriv", "resets", "changes"}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    metric: str
    at: int  # token index
    matchers: tuple[Matcher, ...]


@dataclass(frozen=True)
class Grouping:
    keyword: str  # by, without, on, ignoring, group_left, group_right
    labels: tuple[str, ...]
    scope: tuple[str, ...]  # the series it groups: the aggregation's argument, or the whole expr


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    groupings: list[Grouping] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)
    variables: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def tokenize(expr: str) -> list[Token]:
    tokens, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position:]!r} in {expr!r}")
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(Token(kind, match.group()))
    return tokens


def _variable(text: str) -> str:
    return text.strip("$[]{}").split(":")[0]


def _closing(tokens: list[Token], start: int, opening: str, closing: str) -> int:
    depth = 0
    for index in range(start, len(tokens)):
        depth += {opening: 1, closing: -1}.get(tokens[index].text, 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced {opening!r} in {' '.join(t.text for t in tokens)}")


def _label_list(tokens: list[Token], start: int) -> tuple[tuple[str, ...], int]:
    """The labels of `( a, b )` opening at `start`, and the index after the `)`."""
    end = _closing(tokens, start, "(", ")")
    inner = tokens[start + 1 : end]
    assert all(t.kind == "ident" or t.text == "," for t in inner), inner
    return tuple(t.text for t in inner if t.kind == "ident"), end + 1


def parse(expr: str) -> Query:
    tokens = tokenize(expr)
    query, pending = Query(), []  # pending: (keyword, labels, token index) to scope later
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1].text if index + 1 < len(tokens) else ""
        if token.kind == "var":
            query.variables.add(_variable(token.text))
        elif token.text == "[":
            end = _closing(tokens, index, "[", "]")
            query.ranges.append("".join(t.text for t in tokens[index + 1 : end]))
            query.variables |= {_variable(t.text) for t in tokens[index:end] if t.kind == "var"}
            index = end
        elif token.text == "{":
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        elif token.kind == "ident" and token.text.lower() in GROUPINGS:
            labels: tuple[str, ...] = ()
            after = index + 1
            if following == "(":
                labels, after = _label_list(tokens, index + 1)
            pending.append((token.text.lower(), labels, index))
            index = after
            continue
        elif token.kind == "ident" and (
            following == "(" or (token.text in AGGREGATIONS and following.lower() in GROUPINGS)
        ):
            query.functions.append(token.text)
        elif token.kind == "ident" and token.text.lower() not in KEYWORDS:
            matchers: list[Matcher] = []
            if following == "{":
                end = _closing(tokens, index + 1, "{", "}")
                inner = [t for t in tokens[index + 2 : end] if t.text != ","]
                assert len(inner) % 3 == 0, f"bad matchers in {expr!r}"
                for label, op, value in zip(inner[::3], inner[1::3], inner[2::3], strict=True):
                    assert label.kind == "ident" and value.kind == "string", expr
                    matchers.append(Matcher(label.text, op.text, value.text[1:-1]))
                    query.variables |= {_variable(v) for v in re.findall(r"\$\w+", value.text)}
                query.selectors.append(Selector(token.text, index, tuple(matchers)))
                index = end + 1
                continue
            query.selectors.append(Selector(token.text, index, ()))
        index += 1
    for keyword, labels, at in pending:
        query.groupings.append(Grouping(keyword, labels, _scope(tokens, query, keyword, at)))
    return query


def _scope(tokens: list[Token], query: Query, keyword: str, at: int) -> tuple[str, ...]:
    """The series a grouping applies to: an aggregation's argument for by/without (`sum by (l)
    (…)` or `sum (…) by (l)`), every series of the expression for on/ignoring/group_*."""
    if keyword not in ("by", "without"):
        return tuple(sorted(query.metrics))
    if at > 0 and tokens[at - 1].text.lower() in AGGREGATIONS:
        start = _closing(tokens, at + 1, "(", ")") + 1  # past the label list
    else:
        assert tokens[at - 1].text == ")", "by/without must follow an aggregation"
        depth, start = 0, at - 1
        while True:  # back to the `(` that the `)` before `by` closes
            depth += {")": 1, "(": -1}.get(tokens[start].text, 0)
            if depth == 0:
                break
            start -= 1
        assert tokens[start - 1].text.lower() in AGGREGATIONS, "by/without without aggregation"
    end = _closing(tokens, start, "(", ")")
    return tuple(sorted({s.metric for s in query.selectors if start < s.at < end}))


def test_the_tokenizer_tells_metrics_from_functions_labels_and_variables() -> None:
    query = parse(
        'histogram_quantile(0.99, sum by (le, route) (rate(x_bucket{route=~"$route", '
        'kind!="a|b"}[$__rate_interval]))) / on (route) group_left sum(rate(y_total[5m])) '
        "by (route) * 3600 > bool 1e3"
    )
    assert query.metrics == {"x_bucket", "y_total"}
    assert query.functions == ["histogram_quantile", "sum", "rate", "sum", "rate"]
    assert query.ranges == ["$__rate_interval", "5m"]
    assert query.variables == {"route", "__rate_interval"}
    assert query.selectors[0].matchers == (
        Matcher("route", "=~", "$route"),
        Matcher("kind", "!=", "a|b"),
    )
    groupings = {(g.keyword, g.labels, g.scope) for g in query.groupings}
    assert groupings == {
        ("by", ("le", "route"), ("x_bucket",)),
        ("on", ("route",), ("x_bucket", "y_total")),
        ("group_left", (), ("x_bucket", "y_total")),
        ("by", ("route",), ("y_total",)),
    }


# --------------------------------------------------------------------------- the dashboard


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def graphs() -> list[dict[str, Any]]:
    return [p for p in panels() if p["type"] != "row"]


def targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in graphs() for target in panel["targets"]]


def variables() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = dashboard()["templating"]["list"]
    return found


def _query_of(variable: dict[str, Any]) -> str:
    query = variable["query"]
    text: str = query["query"] if isinstance(query, dict) else query
    return text


def label_values(variable: dict[str, Any]) -> tuple[str, str]:
    """The series selector and the label of a `label_values(selector, label)` variable."""
    call = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", _query_of(variable))
    assert call is not None, f"variable {variable['name']}: not label_values(selector, label)"
    selector, label = call.groups()
    return selector, label


def queries() -> list[tuple[str, Query]]:
    """Every PromQL expression (panel targets and the selectors of template variables)."""
    found = [(f"panel {p['id']} {t['refId']}", parse(t["expr"])) for p, t in targets()]
    found += [
        (f"variable {v['name']}", parse(label_values(v)[0]))
        for v in variables()
        if v["type"] == "query"
    ]
    return found


def test_the_dashboard_is_the_turnout_overview() -> None:
    board = dashboard()
    assert board["uid"] == "turnout-overview"
    assert board["title"] == "Turnout"
    assert board["schemaVersion"] == 39
    assert "__inputs" not in board
    assert board["id"] is None  # imports as a new dashboard


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in panels()]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), sorted(ids)


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = []
    for panel in panels():
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert all(isinstance(v, int) for v in (x, y, w, h)), panel["id"]
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1, panel["id"]
        assert x + w <= GRID_COLUMNS, f"panel {panel['id']} overflows the grid"
        if panel["type"] == "row":
            assert (x, w, h) == (0, GRID_COLUMNS, 1), panel["id"]
        boxes.append((panel["id"], x, y, x + w, y + h))
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
            overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
            assert not overlap, f"panels {a} and {b} overlap"


def test_rows_answer_cost_first_then_latency_tokens_and_reliability() -> None:
    rows = sorted((p for p in panels() if p["type"] == "row"), key=lambda p: p["gridPos"]["y"])
    assert [next(w for w in ROWS if w in row["title"]) for row in rows] == list(ROWS)
    first, second = rows[0]["gridPos"]["y"], rows[1]["gridPos"]["y"]
    top = [q for p, t in targets() if first < p["gridPos"]["y"] < second for q in [t["expr"]]]
    used = set().union(*(parse(expr).metrics for expr in top))
    assert {"turnout_cost_usd_total", "turnout_requests_total"} <= used


def test_every_panel_is_described_and_has_a_unit_and_the_datasource_variable() -> None:
    for panel in graphs():
        assert panel.get("description", "").strip(), f"panel {panel['id']} has no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['id']} has no unit"
        assert panel["datasource"] == DATASOURCE, panel["id"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["id"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["id"]
            assert target["expr"].strip(), panel["id"]


def test_template_variables() -> None:
    by_name = {v["name"]: v for v in variables()}
    source = by_name["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for name in ("route", "variant"):
        variable = by_name[name]
        assert variable["multi"] and variable["includeAll"], name
        assert variable["datasource"] == DATASOURCE, name
        assert variable["definition"] == _query_of(variable), name
    exports = exported()
    for variable in variables():
        if variable["type"] != "query":
            continue
        selector, label = label_values(variable)
        (metric,) = parse(selector).metrics
        assert metric in exports.labels, f"{variable['name']}: {metric} is not exported"
        assert label in exports.labels[metric], f"{variable['name']}: {metric} has no {label}"
    defined = {v["name"] for v in variables()} | BUILTIN_VARIABLES
    for where, query in queries():
        assert query.variables <= defined, f"{where}: undefined {query.variables - defined}"


def test_expressions_use_only_exported_series() -> None:
    exports = exported()
    for where, query in queries():
        for metric in query.metrics:
            hint = " (a counter's series ends in _total)" if metric in exports.families else ""
            assert metric in exports.labels, f"{where}: {metric} is not exported{hint}"


def test_expressions_use_only_known_functions() -> None:
    for where, query in queries():
        unknown = set(query.functions) - FUNCTIONS
        assert not unknown, f"{where}: unknown functions {unknown}"


def test_matchers_name_real_labels_and_values() -> None:
    exports = exported()
    for where, query in queries():
        for selector in query.selectors:
            labels = exports.labels.get(selector.metric, {})  # unexported: the test above
            for matcher in selector.matchers:
                assert matcher.label in labels, f"{where}: {selector.metric} has no {matcher.label}"
                if matcher.label in ENUMERATED and "$" not in matcher.value:
                    known = exports.values[matcher.label]
                    if re.fullmatch(r"[\w|]+", matcher.value):
                        unknown = set(matcher.value.split("|")) - known
                        assert not unknown, f"{where}: {matcher.label} is never {unknown}"
                    else:
                        assert any(re.fullmatch(matcher.value, v) for v in known), where


def test_groupings_name_labels_every_grouped_series_has() -> None:
    exports = exported()
    for where, query in queries():
        for grouping in query.groupings:
            assert grouping.scope, f"{where}: {grouping.keyword} groups nothing"
            present = [set(exports.labels.get(metric, {})) for metric in grouping.scope]
            if grouping.keyword in ("group_left", "group_right"):
                # the labels it copies from the "one" side: on one side at least
                missing = set(grouping.labels) - set().union(*present)
                assert not missing, f"{where}: {grouping.keyword} {missing} on no series"
                continue
            for metric, labels in zip(grouping.scope, present, strict=True):
                missing = set(grouping.labels) - labels
                assert not missing, f"{where}: {grouping.keyword} {missing} not on {metric}"
            if any(m.endswith("_bucket") for m in grouping.scope) and grouping.keyword == "by":
                assert "le" in grouping.labels, f"{where}: a _bucket sum must keep le"


def test_rate_windows_are_the_rate_interval() -> None:
    for panel, target in targets():
        query = parse(target["expr"])
        assert set(query.functions) & RANGED or not query.ranges, panel["id"]
        for window in query.ranges:
            # $__range only in an instant query: "over the dashboard's whole time range".
            allowed = {"$__rate_interval"} | ({"$__range"} if target.get("instant") else set())
            assert window in allowed, f"panel {panel['id']}: window [{window}]"


def test_every_family_is_exercised_so_its_labels_are_known() -> None:
    exports = exported()
    seen = set(exports.family_of.values())
    assert exports.families <= seen, f"record a sample of {exports.families - seen} in _exercise"


def test_every_family_is_on_the_dashboard_or_deliberately_left_out() -> None:
    exports = exported()
    used = {exports.family_of[m] for _, q in queries() for m in q.metrics if m in exports.family_of}
    assert set(LEFT_OUT) <= exports.families, f"stale LEFT_OUT {set(LEFT_OUT) - exports.families}"
    assert not set(LEFT_OUT) & used, f"LEFT_OUT but used: {set(LEFT_OUT) & used}"
    missing = exports.families - used - set(LEFT_OUT)
    assert not missing, f"not on the dashboard (add a panel or a LEFT_OUT reason): {missing}"


def test_left_out_families_say_why() -> None:
    for family, reason in LEFT_OUT.items():
        assert reason.strip(), family
