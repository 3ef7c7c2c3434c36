"""Request bounds (router.bounds) and their configuration (upstreams.<name>.bounds)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.config_check import check_settings
from gateway.proxy import upstream_bounds
from gateway.settings import DEFAULT_MAX_TOKENS, Bounds, Upstream
from router.bounds import RequestBounds, nesting_depth, tightest, violation

BOUNDS = RequestBounds(
    max_n=4, max_tokens=1000, max_logprobs=5, max_schema_bytes=200, max_schema_depth=4
)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ("s", 0), ([], 1), ({}, 1), ([[1]], 2), ({"a": {"b": [1]}}, 3), ([1, [2, [3]]], 3)],
)
def test_nesting_depth(value: Any, depth: int) -> None:
    assert nesting_depth(value, 100) == depth


def test_nesting_depth_stops_past_the_limit_without_recursion() -> None:
    deep = nested(100_000)  # far past the interpreter's recursion limit
    assert nesting_depth(deep, 10) == 11


def test_within_bounds_passes() -> None:
    body = {
        "n": 4,
        "best_of": 4,
        "max_tokens": 1000,
        "max_completion_tokens": 1000,
        "min_tokens": 0,
        "top_logprobs": 5,
        "logprobs": True,
        "prompt_logprobs": 0,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        "guided_regex": "[a-z]+",
    }
    assert violation(body, BOUNDS) is None
    assert violation({}, BOUNDS) is None
    assert violation({"n": None, "logprobs": False, "response_format": None}, BOUNDS) is None


@pytest.mark.parametrize(
    ("name", "value", "code"),
    [
        ("n", 5, "integer_above_max_value"),
        ("n", 0, "integer_below_min_value"),
        ("best_of", 5, "integer_above_max_value"),
        ("max_tokens", 1001, "integer_above_max_value"),
        ("max_completion_tokens", 10**12, "integer_above_max_value"),
        ("min_tokens", 1001, "integer_above_max_value"),
        ("top_logprobs", 6, "integer_above_max_value"),
        ("logprobs", 6, "integer_above_max_value"),  # /v1/completions: an integer
        ("prompt_logprobs", -1, "integer_below_min_value"),  # vLLM: -1 = the whole vocabulary
        ("n", 2.0, "invalid_type"),
        ("best_of", "3", "invalid_type"),
        ("top_logprobs", True, "invalid_type"),
    ],
)
def test_out_of_bounds_names_the_parameter(name: str, value: Any, code: str) -> None:
    found = violation({name: value}, BOUNDS)
    assert found is not None
    assert (found.param, found.code) == (name, code)
    assert name in found.message


@pytest.mark.parametrize(
    "name",
    ["response_format", "guided_json", "guided_choice", "structured_outputs"],
)
def test_schema_too_deep(name: str) -> None:
    found = violation({name: nested(5)}, BOUNDS)
    assert found is not None
    assert (found.param, found.code) == (name, "schema_too_deep")
    assert violation({name: nested(4)}, BOUNDS) is None


@pytest.mark.parametrize(
    "name", ["response_format", "guided_json", "guided_regex", "guided_grammar"]
)
def test_schema_too_large_by_encoded_size(name: str) -> None:
    fits = "x" * (BOUNDS.max_schema_bytes - 2)  # a JSON string: two quotes more
    assert len(json.dumps(fits)) == BOUNDS.max_schema_bytes
    assert violation({name: fits}, BOUNDS) is None
    found = violation({name: fits + "x"}, BOUNDS)
    assert found is not None
    assert (found.param, found.code) == (name, "schema_too_large")


def test_tightest_takes_each_smallest_limit() -> None:
    other = RequestBounds(
        max_n=8, max_tokens=500, max_logprobs=20, max_schema_bytes=100, max_schema_depth=64
    )
    assert tightest([BOUNDS, other]) == RequestBounds(
        max_n=4, max_tokens=500, max_logprobs=5, max_schema_bytes=100, max_schema_depth=4
    )
    assert tightest([BOUNDS]) == BOUNDS
    with pytest.raises(ValueError):
        tightest([])


def test_defaults_are_the_documented_ones() -> None:
    assert Bounds() == Bounds(
        max_n=8, max_tokens=None, max_logprobs=20, max_schema_bytes=65_536, max_schema_depth=32
    )


def _upstream(raw: dict[str, Any]) -> Upstream:
    upstream: Upstream = msgspec.convert(raw, Upstream)
    return upstream


def test_unset_max_tokens_is_the_default_or_a_vllm_context_length() -> None:
    hosted = _upstream({"kind": "openai", "base_url": "http://h/v1"})
    assert upstream_bounds(hosted).max_tokens == DEFAULT_MAX_TOKENS == 32_768
    vllm = {"kind": "vllm", "urls": ["http://v"], "serve": {"base_model": "b"}}
    assert upstream_bounds(_upstream(vllm)).max_tokens == DEFAULT_MAX_TOKENS
    vllm["serve"] = {"base_model": "b", "max_model_len": 4096}
    assert upstream_bounds(_upstream(vllm)).max_tokens == 4096
    vllm["bounds"] = {"max_tokens": 1000, "max_n": 2}
    assert upstream_bounds(_upstream(vllm)) == RequestBounds(
        max_n=2, max_tokens=1000, max_logprobs=20, max_schema_bytes=65_536, max_schema_depth=32
    )


def _config(bounds: dict[str, Any], **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": {"u": {"kind": "vllm", "urls": ["http://127.0.0.1:9"], "bounds": bounds}},
        "variants": {"v": {"upstream": "u", "model": "m"}},
        "routes": {"r": {"split": {"v": 1}}},
    }


@pytest.mark.parametrize(
    ("bounds", "path"),
    [
        ({"max_n": 0}, "upstreams.u.bounds.max_n"),
        ({"max_n": 1000}, "upstreams.u.bounds.max_n"),
        ({"max_tokens": -1}, "upstreams.u.bounds.max_tokens"),
        ({"max_tokens": "lots"}, "upstreams.u.bounds.max_tokens"),
        ({"max_logprobs": -1}, "upstreams.u.bounds.max_logprobs"),
        ({"max_schema_bytes": 10}, "upstreams.u.bounds.max_schema_bytes"),
        ({"max_schema_depth": 1}, "upstreams.u.bounds.max_schema_depth"),
        ({"max_schema_depth": 100_000}, "upstreams.u.bounds.max_schema_depth"),
        ({"max_best_of": 4}, "upstreams.u.bounds.max_best_of"),
    ],
)
def test_checker_rejects_nonsense_bounds(bounds: dict[str, Any], path: str) -> None:
    settings, problems = check_settings(_config(bounds), {})
    assert settings is None
    assert [p.path for p in problems if p.severity == "error"] == [path]


def test_checker_warns_about_bounds_that_cannot_bite() -> None:
    config = _config({"max_tokens": 8192, "max_schema_bytes": 1_000_000}, max_body_bytes=65_536)
    config["upstreams"]["u"]["serve"] = {"base_model": "b", "max_model_len": 4096}
    config["variants"]["v"]["model"] = "b"
    settings, problems = check_settings(config, {})
    assert settings is not None
    assert sorted((p.path, p.severity) for p in problems) == [
        ("upstreams.u.bounds.max_schema_bytes", "warning"),
        ("upstreams.u.bounds.max_tokens", "warning"),
    ]


@pytest.mark.parametrize(
    ("server", "path"),
    [
        ({"max_header_bytes": 100}, "server.max_header_bytes"),
        ({"header_timeout_s": 0}, "server.header_timeout_s"),
        ({"receive_timeout_s": -1}, "server.receive_timeout_s"),
        ({"write_timeout_s": 10_000}, "server.write_timeout_s"),
        ({"keep_alive_s": 0}, "server.keep_alive_s"),
    ],
)
def test_checker_rejects_nonsense_connection_limits(server: dict[str, Any], path: str) -> None:
    settings, problems = check_settings(_config({}, **server), {})
    assert settings is None
    assert [p.path for p in problems if p.severity == "error"] == [path]
