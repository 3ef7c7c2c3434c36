"""Property-based fuzz of the two parsers that take outside input before anything else runs:
the SSE splitter every upstream stream goes through (gateway/sse.py) and the configuration
loader (gateway/config_check.py over gateway/settings.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config_check import Problem, SettingsError, check_path, check_settings, load_settings
from gateway.settings import Settings
from gateway.sse import EventSplitter, event_data, iter_events

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    suppress_health_check=[HealthCheck.too_slow],
)

# --- SSE -------------------------------------------------------------------------------------

# Bytes rich in what SSE framing is made of, so boundaries, half-boundaries and mixed line ends
# are common; plus any byte at all.
_PIECES = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r\r", b"data:", b"data: ", b"[DONE]", b"{}"]
)
STREAMS = st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=40).map(b"".join)
BOUNDARIES = (b"\r\n\r\n", b"\n\n", b"\r\r")


def _cuts(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """`data` cut into chunks at arbitrary places (empty chunks included)."""
    positions = st.lists(st.integers(0, len(data)), max_size=12).map(sorted)
    return positions.map(
        lambda cuts: [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    )


def _feed(chunks: list[bytes]) -> tuple[list[bytes], bytes | None]:
    splitter = EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    return events, splitter.flush()


@FUZZ
@given(st.data(), STREAMS)
def test_sse_events_do_not_depend_on_how_the_bytes_arrive(data: st.DataObject, raw: bytes) -> None:
    """The same bytes, in one piece or sliced anywhere (down to single bytes), give the same
    events: a slow or fragmenting upstream cannot change what the client receives."""
    whole = _feed([raw])
    assert _feed(data.draw(_cuts(raw))) == whole
    assert _feed([raw[i : i + 1] for i in range(len(raw))]) == whole


@FUZZ
@given(STREAMS)
def test_sse_events_are_the_upstream_bytes_unchanged(raw: bytes) -> None:
    """Events are consecutive slices of the input, each one whole event (split alone, it is
    itself); what is left over comes back at EOF with a terminator added, or not at all if it
    is blank."""
    events, rest = _feed([raw])
    joined = b"".join(events)
    assert raw.startswith(joined)
    for event in events:
        assert event.endswith(BOUNDARIES)
        assert _feed([event]) == ([event], None)
    tail = raw[len(joined) :]
    assert _feed([tail])[0] == []
    if tail.strip():
        assert rest is not None and rest.startswith(tail) and rest.endswith(BOUNDARIES)
        assert len(rest) - len(tail) in (1, 2)
        assert _feed([rest]) == ([rest], None)
    else:
        assert rest is None


@FUZZ
@given(
    st.lists(
        st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
)
def test_sse_data_lines_join_back(lines: list[bytes], spaced: bool) -> None:
    """An event's `data:` lines, with or without the optional space, join back with newlines."""
    prefix = b"data: " if spaced else b"data:"
    event = b"".join(prefix + line + b"\n" for line in lines) + b"\n"
    expected = b"\n".join(
        line[1:] if not spaced and line.startswith(b" ") else line for line in lines
    )
    assert event_data(event) == expected


@FUZZ
@given(st.data(), STREAMS)
def test_sse_iterator_matches_the_splitter(data: st.DataObject, raw: bytes) -> None:
    """iter_events over any chunking = the splitter's events plus the flushed remainder."""
    chunks = data.draw(_cuts(raw))

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def collect() -> list[bytes]:
        return [event async for event in iter_events(source())]

    events, rest = _feed([raw])
    assert asyncio.run(collect()) == events + ([rest] if rest is not None else [])


# --- the configuration loader -----------------------------------------------------------------

VALID: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 8080, "max_body_bytes": 4096},
    "state": {"redis_url": None},
    "upstreams": {"sim": {"kind": "simulated", "ttft_ms": 5}},
    "variants": {"a": {"upstream": "sim", "model": "m"}, "b": {"upstream": "sim", "model": "n"}},
    "routes": {"r": {"split": {"a": 50, "b": 50}, "sticky": "user", "fallback": ["b"]}},
    "keys": [{"name": "app", "sha256": "0" * 64, "rpm": 10, "budget": {"usd": 1, "per": "day"}}],
}

# Mappings whose keys are names the file chooses (not fields).
NAME_MAPS = {("upstreams",), ("variants",), ("routes",), ("routes", "r", "split")}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=4
        ),
    ),
    max_leaves=25,
)


_YAML_BITS = ["a:", " b", "- c", "{", "}", "[", "]", ": ", "&x", "*x", "!!binary", "? ", "\n"]
_YAML_BITS += ["  ", "'", '"', "%", "\t", "<<: *x", "upstreams:", "routes:", "variants:", "!!set"]
YAML_TEXT = st.lists(st.sampled_from(_YAML_BITS), max_size=30).map("".join)


def _check(raw: object) -> tuple[Settings | None, list[Problem]]:
    """check_settings, which must never raise, and the invariants of what it returns."""
    result, problems = check_settings(raw, {})
    errors = [p for p in problems if p.severity == "error"]
    assert (result is None) == bool(errors), problems
    for problem in problems:
        assert isinstance(problem.path, str) and problem.path, problem
        assert isinstance(problem.message, str) and problem.message, problem
    return result, problems


@FUZZ
@given(JSONISH)
def test_any_decoded_document_is_checked_never_crashes(raw: object) -> None:
    """Whatever YAML decodes to, the check answers with settings or with problems, never an
    exception (a bad file must be reported, not crash `turnout check`)."""
    _check(raw)


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*at, index))
    return found


@FUZZ
@given(st.data())
def test_a_mutated_valid_file_is_checked_never_crashes(data: st.DataObject) -> None:
    """A valid file with one place replaced by anything, or an unknown key added there: checked
    without an exception, and an unknown key is always an error at its dotted path."""
    raw = copy.deepcopy(VALID)
    assert _check(raw)[0] is not None
    path = data.draw(st.sampled_from(_paths(raw)[1:]))
    parent: Any = raw
    for step in path[:-1]:
        parent = parent[step]
    if data.draw(st.booleans()) and isinstance(parent[path[-1]], dict):
        parent[path[-1]]["zz_unknown"] = data.draw(JSONISH)
        result, problems = _check(raw)
        if path not in NAME_MAPS:  # a section's own fields, where every key is known
            assert result is None
            assert any(p.path.endswith("zz_unknown") for p in problems), problems
    else:
        parent[path[-1]] = data.draw(JSONISH)
        _check(raw)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        YAML_TEXT,
        JSONISH.map(json.dumps),
        st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    )
)
def test_any_file_gives_problems_or_settings(text: str) -> None:
    """Any file content (bad YAML, tags, anchors, duplicates, JSON): problems with a path, or
    settings; `load_settings` raises only SettingsError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "turnout.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        result, problems = check_path(path, {}, strict=True)
        assert (result is None) == any(p.severity == "error" for p in problems)
        try:
            load_settings(path, {})
        except SettingsError as exc:
            assert exc.problems
        else:
            assert result is not None


def test_the_valid_example_round_trips_through_yaml(tmp_path: Path) -> None:
    """The fuzzers' starting point is a valid file, through YAML as much as through dicts."""
    path = tmp_path / "turnout.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_settings(path, {}).routes["r"].sticky == "user"
