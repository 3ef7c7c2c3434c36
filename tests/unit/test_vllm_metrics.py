"""Tests for the vLLM metrics parser, on hand-written pages in two vLLM styles."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from router.vllm_metrics import ReplicaLoad, Sample, parse_line, parse_load, parse_samples

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _page(name: str) -> str:
    return (FIXTURES / f"vllm_metrics_{name}.txt").read_text()


def test_older_page_with_gpu_cache_usage() -> None:
    load = parse_load(_page("v0_gpu_cache"))
    assert load == ReplicaLoad(
        running=7.0,
        waiting=3.0,
        kv_cache=0.4375,
        running_adapters=frozenset({"support-lora", "billing-lora"}),
        waiting_adapters=frozenset({"sql-lora"}),
        max_loras=4,
    )
    assert load.adapters == {"support-lora", "billing-lora", "sql-lora"}


def test_newer_page_sums_engines_and_takes_each_engines_latest_lora_sample() -> None:
    load = parse_load(_page("v1_kv_cache"))
    assert load is not None
    assert (load.running, load.waiting) == (9.0, 2.0)
    assert load.kv_cache == pytest.approx(0.5)  # mean of the engines' 0.75 and 0.25
    assert load.running_adapters == {"support-lora", "legal-lora"}
    assert load.waiting_adapters == {"billing-lora"}
    assert load.max_loras == 2


def test_garbage_lines_are_skipped() -> None:
    load = parse_load(_page("garbled"))
    assert load is not None
    assert load.running == pytest.approx(1.5 + 2.5 + 1.0)  # NaN and broken lines ignored
    assert load.waiting == pytest.approx(0.4)
    assert load.kv_cache == pytest.approx(0.9)  # the newer name wins when both appear
    assert load.running_adapters == {"a", "b"}
    assert load.waiting_adapters == frozenset()
    assert load.max_loras is None


def test_not_a_vllm_page() -> None:
    assert parse_load("") is None
    assert parse_load("# HELP up Up\nup 1\nprocess_cpu_seconds_total 3.2\n") is None
    assert parse_load("<html>502 Bad Gateway</html>") is None


def test_page_without_lora_or_cache() -> None:
    load = parse_load("vllm:num_requests_waiting 2\n")
    assert load == ReplicaLoad(waiting=2.0)
    assert load.kv_cache is None and load.max_loras is None and load.adapters == frozenset()


def test_label_escapes_and_timestamps() -> None:
    sample = parse_line(r'm{a="x\"y\\z\nw",b="",c="{,}"} -2.5e-3 1700000000000')
    assert sample == Sample("m", {"a": 'x"y\\z\nw', "b": "", "c": "{,}"}, -0.0025)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.0", 1.0), ("+Inf", math.inf), ("-Inf", -math.inf), ("3e+09", 3e9), ("0", 0.0)],
)
def test_values(text: str, expected: float) -> None:
    sample = parse_line(f"m {text}")
    assert sample is not None and sample.value == expected


def test_nan_value_parses() -> None:
    sample = parse_line("m{} NaN")
    assert sample is not None and math.isnan(sample.value) and sample.labels == {}


@pytest.mark.parametrize(
    "line",
    [
        "m",
        "m 1 2 3",
        "m 1_000",
        "m abc",
        'm{a="1"}',
        'm{a="1} 2',
        "m{a=1} 2",
        'm{1a="x"} 2',
        '{a="x"} 2',
        "9m 1",
        "m-x 1",
    ],
)
def test_malformed_lines(line: str) -> None:
    assert parse_line(line) is None


def test_parse_samples_skips_comments_and_blanks() -> None:
    lines = ["# HELP m A metric.", "# TYPE m gauge", "", "   ", "m 1", "broken{", "n:x 2"]
    assert [(s.name, s.value) for s in parse_samples(lines)] == [("m", 1.0), ("n:x", 2.0)]


def test_latest_lora_sample_wins_whatever_its_position() -> None:
    page = "\n".join(
        [
            "vllm:num_requests_running 0",
            'vllm:lora_requests_info{max_lora="1",running_lora_adapters="new",'
            'waiting_lora_adapters=""} 20',
            'vllm:lora_requests_info{max_lora="1",running_lora_adapters="old",'
            'waiting_lora_adapters="x"} 10',
        ]
    )
    load = parse_load(page)
    assert load is not None
    assert load.running_adapters == {"new"} and load.waiting_adapters == frozenset()


def test_kv_cache_is_clamped() -> None:
    load = parse_load("vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 1.2\n")
    assert load is not None and load.kv_cache == 1.0
