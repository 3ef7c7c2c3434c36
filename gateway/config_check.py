"""Loading and checking configuration: every problem in a file, each at its dotted path."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from gateway.eval import DatasetError
from gateway.settings import (
    Key,
    OpenAIUpstream,
    Records,
    Route,
    Routing,
    Rule,
    Server,
    Settings,
    SimulatedUpstream,
    State,
    Upstream,
    Variant,
    VllmUpstream,
    When,
)
from gateway.upstreams.h1 import encode_headers
from serving.sim_answers import load_answers
from serving.vllm_command import OWN_FLAGS

_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STICKY_HEADER = re.compile(r"^header:[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_KINDS = ", ".join(
    str(t.__struct_config__.tag) for t in (VllmUpstream, OpenAIUpstream, SimulatedUpstream)
)


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with a configuration, at a dotted path such as `upstreams.u.colour`."""

    path: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SettingsError(Exception):
    """A configuration that cannot be used; `problems` lists why, one per line in str()."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


class _Parts(msgspec.Struct, kw_only=True):
    """The sections that converted, plus every entry name present (valid or not)."""

    upstreams: dict[str, Upstream] = {}
    variants: dict[str, Variant] = {}
    routes: dict[str, Route] = {}
    keys: dict[int, Key] = {}
    server: Server = Server()
    state: State = State()
    records: Records = Records()
    routing: Routing = Routing()
    admin_key_env: str | None = None
    names: dict[str, set[str]] = {}

    def settings(self) -> Settings:
        return Settings(
            upstreams=self.upstreams,
            variants=self.variants,
            routes=self.routes,
            server=self.server,
            state=self.state,
            admin_key_env=self.admin_key_env,
            keys=list(self.keys.values()),
            records=self.records,
            routing=self.routing,
        )


def resolve_secret(env_name: str | None, environ: Mapping[str, str]) -> str | None:
    """The secret held by the named environment variable, or None if unnamed, unset or empty."""
    if env_name is None:
        return None
    return environ.get(env_name) or None


def check_settings(
    raw: object,
    environ: Mapping[str, str],
    *,
    strict: bool = False,
    base_dir: str | Path | None = None,
) -> tuple[Settings | None, list[Problem]]:
    """Check a YAML-decoded configuration; return the Settings (None on any error) and every
    problem found: the first in each entry, then every cross-check.

    A missing or empty secret variable is a warning, or an error when `strict`. Relative file
    paths the configuration reads (a simulated upstream's `answers`) are resolved against
    `base_dir` (check_path passes the file's directory), else left relative to the cwd.
    """
    if not isinstance(raw, dict):
        return None, [Problem("(root)", f"expected a mapping of sections, got {_describe(raw)}")]
    problems: list[Problem] = []
    parts = _convert_sections(raw, problems)
    _resolve_paths(parts, base_dir)
    problems += _check_simulated(parts)
    problems += _check_serve(parts)
    problems += _check_headers(parts)
    problems += _check_variants(parts)
    problems += _check_routes(parts)
    problems += _check_keys(parts)
    problems += _check_urls(parts)
    problems += _check_bounds(parts)
    problems += _check_secrets(parts, environ, strict)
    if any(problem.severity == "error" for problem in problems):
        return None, problems
    return parts.settings(), problems


def check_path(
    path: str | Path, environ: Mapping[str, str], *, strict: bool
) -> tuple[Settings | None, list[Problem]]:
    """Read a YAML file and check it; like check_settings, with file and syntax problems."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem("(file)", f"cannot read the file: {exc}")]
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        return None, [_yaml_problem(exc)]
    return check_settings(raw, environ, strict=strict, base_dir=Path(path).absolute().parent)


def check_file(path: str | Path, environ: Mapping[str, str], strict: bool) -> list[Problem]:
    """Every problem in a configuration file, for `turnout check`."""
    return check_path(path, environ, strict=strict)[1]


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Load a configuration for `serve`, strictly (a missing secret is an error).

    Raises SettingsError listing the errors if there is any.
    """
    settings, problems = check_path(path, os.environ if environ is None else environ, strict=True)
    if settings is None:
        raise SettingsError([problem for problem in problems if problem.severity == "error"])
    return settings


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}'", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    reason = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return Problem("(yaml)", f"invalid YAML: {reason}")
    return Problem(
        "(yaml)", f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {reason}"
    )


def _describe(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "nothing (null)"
    return names.get(type(value), f"a {type(value).__name__}")


def _translate(exc: msgspec.ValidationError, prefix: str) -> Problem:
    """Turn msgspec's `... - at `$.a[0]`` into a Problem at `prefix.a[0]`."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    message, path = match["message"], prefix + (match["at"] or "")
    for pattern, text in (
        (_UNKNOWN_FIELD, "unknown field"),
        (_MISSING_FIELD, "required field missing"),
    ):
        field = pattern.match(message)
        if field is not None:
            message, path = text, f"{path}.{field['field']}"
    if path.startswith("upstreams.") and path.endswith(".kind"):
        message += f" (expected one of: {_KINDS})"
    return Problem(path, message)


def _convert(raw: object, type_: Any, path: str, problems: list[Problem]) -> Any:
    """msgspec.convert, or None with the first error appended to `problems`."""
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        problems.append(_translate(exc, path))
        return None


def _convert_sections(raw: dict[Any, Any], problems: list[Problem]) -> _Parts:
    fields = set(Settings.__struct_fields__)
    problems += [Problem(str(k) or '""', "unknown top-level key") for k in raw if k not in fields]
    parts = _Parts()
    parts.upstreams, parts.names["upstreams"] = _convert_entries(
        raw, "upstreams", Upstream, problems
    )
    parts.variants, parts.names["variants"] = _convert_entries(raw, "variants", Variant, problems)
    parts.routes, parts.names["routes"] = _convert_entries(raw, "routes", Route, problems)
    parts.keys = _convert_keys(raw.get("keys", []), problems)
    parts.server = _convert(raw.get("server", {}), Server, "server", problems) or Server()
    parts.state = _convert(raw.get("state", {}), State, "state", problems) or State()
    parts.records = _convert(raw.get("records", {}), Records, "records", problems) or Records()
    parts.routing = _convert(raw.get("routing", {}), Routing, "routing", problems) or Routing()
    parts.admin_key_env = _convert(raw.get("admin_key_env"), str | None, "admin_key_env", problems)
    return parts


def _convert_keys(raw: object, problems: list[Problem]) -> dict[int, Key]:
    """Convert the keys list item by item; return the valid ones by their index."""
    if not isinstance(raw, list):
        problems.append(Problem("keys", f"expected a list, got {_describe(raw)}"))
        return {}
    keys: dict[int, Key] = {}
    for i, value in enumerate(raw):
        key = _convert(value, Key, f"keys[{i}]", problems)
        if key is not None:
            keys[i] = key
    return keys


def _convert_entries(
    raw: dict[Any, Any], section: str, type_: Any, problems: list[Problem]
) -> tuple[dict[str, Any], set[str]]:
    """Convert `section` entry by entry; return the valid entries and every entry's name."""
    if section not in raw:
        problems.append(Problem(section, "required section missing"))
        return {}, set()
    entries = raw[section]
    if not isinstance(entries, dict) or not entries:
        what = "no entries" if entries == {} else _describe(entries)
        problems.append(Problem(section, f"expected a mapping of names to entries, got {what}"))
        return {}, set()
    out: dict[str, Any] = {}
    for name, value in entries.items():
        if not isinstance(name, str) or not name:
            problems.append(Problem(f"{section}.{name}", "a name must be a non-empty string"))
            continue
        entry = _convert(value, type_, f"{section}.{name}", problems)
        if entry is not None:
            out[name] = entry
    return out, {name for name in entries if isinstance(name, str)}


def _resolve_paths(parts: _Parts, base_dir: str | Path | None) -> None:
    """A simulated upstream's relative `answers` path, made relative to `base_dir`."""
    if base_dir is None:
        return
    for name, upstream in parts.upstreams.items():
        if isinstance(upstream, SimulatedUpstream) and upstream.answers is not None:
            path = Path(upstream.answers).expanduser()
            if not path.is_absolute():
                answers = str(Path(base_dir) / path)
                parts.upstreams[name] = msgspec.structs.replace(upstream, answers=answers)


def _check_headers(parts: _Parts) -> Iterator[Problem]:
    """An upstream's extra `headers` must be sendable and leave the request's framing alone."""
    for name, upstream in parts.upstreams.items():
        if not isinstance(upstream, OpenAIUpstream):
            continue
        for header, value in upstream.headers.items():
            try:
                encode_headers({header: value})
            except ValueError as exc:
                yield Problem(f"upstreams.{name}.headers.{header}", str(exc))


def _check_serve(parts: _Parts) -> Iterator[Problem]:
    """A vLLM `serve` section: adapter names vLLM's `--lora-modules name=path` can carry, a
    base name no adapter shares, and no flag in `extra_args` that the section already sets."""
    for name, upstream in parts.upstreams.items():
        if not isinstance(upstream, VllmUpstream) or upstream.serve is None:
            continue
        serve, path = upstream.serve, f"upstreams.{name}.serve"
        for adapter, spec in serve.adapter_paths().items():
            if not _ADAPTER_NAME.fullmatch(adapter):
                yield Problem(f"{path}.adapters.{adapter}",
                              "names may use letters, digits and . _ - / : only")  # fmt: skip
            if not spec.path.strip():
                yield Problem(f"{path}.adapters.{adapter}", "needs a path or URI")
        if serve.base_name in serve.adapters:
            yield Problem(f"{path}.served_model_name", "an adapter has the same name")
        for i, arg in enumerate(serve.extra_args):
            flag = arg.split("=", 1)[0]
            if flag in OWN_FLAGS:
                yield Problem(f"{path}.extra_args[{i}]", f"{flag} is set from the section's keys")


def _check_simulated(parts: _Parts) -> Iterator[Problem]:
    """A simulated upstream's `accuracy` (0..1, served models) and `answers` (a file that
    reads and parses as an eval dataset)."""
    for name, upstream in parts.upstreams.items():
        if not isinstance(upstream, SimulatedUpstream):
            continue
        path = f"upstreams.{name}"
        for model, share in upstream.accuracy.items():
            if not 0.0 <= share <= 1.0:
                yield Problem(f"{path}.accuracy.{model}", f"must be from 0 to 1, got {share:g}")
            elif upstream.models and model not in upstream.models:
                yield Problem(
                    f"{path}.accuracy.{model}",
                    f"'{model}' is not served by this upstream"
                    f" (it serves: {', '.join(upstream.models)})",
                )
        if upstream.answers is None:
            if upstream.accuracy:
                yield Problem(f"{path}.accuracy", "has no effect without `answers`", "warning")
            continue
        try:
            load_answers(upstream.answers)
        except OSError as exc:
            yield Problem(
                f"{path}.answers", f"cannot read {upstream.answers}: {exc.strerror or exc}"
            )
        except DatasetError as exc:
            yield Problem(f"{path}.answers", str(exc))


def _check_variants(parts: _Parts) -> Iterator[Problem]:
    for name, variant in parts.variants.items():
        path = f"variants.{name}"
        if variant.upstream not in parts.names["upstreams"]:
            yield Problem(f"{path}.upstream", f"unknown upstream '{variant.upstream}'")
        upstream = parts.upstreams.get(variant.upstream)
        if isinstance(upstream, OpenAIUpstream) and variant.price is None:
            yield Problem(
                f"{path}.price", "no price on an openai upstream: its cost will read 0", "warning"
            )
        served = _served_models(upstream)
        if served is not None and variant.model not in served:
            yield Problem(
                f"{path}.model",
                f"'{variant.model}' is not served by upstream '{variant.upstream}'"
                f" (it serves: {', '.join(served)})",
            )


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9._:/-]+")


def _served_models(upstream: Upstream | None) -> list[str] | None:
    """The model names an upstream is configured to serve, or None if it serves any."""
    if isinstance(upstream, VllmUpstream) and upstream.serve is not None:
        return [upstream.serve.base_name, *upstream.serve.adapters]
    if isinstance(upstream, SimulatedUpstream) and upstream.models:
        return list(upstream.models)
    return None


def _check_routes(parts: _Parts) -> Iterator[Problem]:
    variants = parts.names["variants"]
    for name, route in parts.routes.items():
        path = f"routes.{name}"
        for variant, weight in route.split.items():
            if variant not in variants:
                yield Problem(f"{path}.split.{variant}", f"unknown variant '{variant}'")
            if not (math.isfinite(weight) and weight > 0):
                yield Problem(f"{path}.split.{variant}", f"weight must be > 0, got {weight:g}")
        if route.sticky is not None and not _valid_sticky(route.sticky):
            yield Problem(f"{path}.sticky", "must be user, key or header:<name>")
        for i, variant in enumerate(route.fallback):
            if variant not in variants:
                yield Problem(f"{path}.fallback[{i}]", f"unknown variant '{variant}'")
            elif variant in route.fallback[:i]:
                yield Problem(f"{path}.fallback[{i}]", f"'{variant}' is listed twice", "warning")
        if route.shadow is not None and route.shadow.variant not in variants:
            yield Problem(f"{path}.shadow.variant", f"unknown variant '{route.shadow.variant}'")
        for i, rule in enumerate(route.rules):
            yield from _check_rule(f"{path}.rules[{i}]", rule, variants)
        metrics = [metric.name for metric in route.feedback]
        for i, metric_name in enumerate(metrics):
            if metric_name in metrics[:i]:
                yield Problem(f"{path}.feedback[{i}].name", f"'{metric_name}' is declared twice")


def _check_rule(path: str, rule: Rule, variants: set[str]) -> Iterator[Problem]:
    if (rule.variant is None) == (rule.split is None):
        yield Problem(path, "a rule names exactly one of `variant` or `split`")
    for name in [rule.variant] if rule.variant else list(rule.split or {}):
        if name not in variants:
            yield Problem(
                f"{path}.variant" if rule.variant else f"{path}.split.{name}",
                f"unknown variant '{name}'",
            )
    for name, weight in (rule.split or {}).items():
        if not (math.isfinite(weight) and weight > 0):
            yield Problem(f"{path}.split.{name}", f"weight must be > 0, got {weight:g}")
    if rule.when == When():
        yield Problem(f"{path}.when", "a rule needs at least one condition", "warning")


def _valid_sticky(sticky: str) -> bool:
    return sticky in ("user", "key") or _STICKY_HEADER.match(sticky) is not None


def _check_keys(parts: _Parts) -> Iterator[Problem]:
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, key in parts.keys.items():
        for j, route in enumerate(key.routes or []):
            if route not in parts.names["routes"]:
                yield Problem(f"keys[{i}].routes[{j}]", f"unknown route '{route}'")
        if key.name in names:
            yield Problem(
                f"keys[{i}].name", f"'{key.name}' is also the name of keys[{names[key.name]}]"
            )
        if key.sha256 in hashes:
            yield Problem(f"keys[{i}].sha256", f"the same hash as keys[{hashes[key.sha256]}]")
        names.setdefault(key.name, i)
        hashes.setdefault(key.sha256, i)


def _check_urls(parts: _Parts) -> Iterator[Problem]:
    for name, upstream in parts.upstreams.items():
        if isinstance(upstream, VllmUpstream):
            for i, url in enumerate(upstream.urls):
                yield from _url_problems(f"upstreams.{name}.urls[{i}]", url, server_root=True)
        elif isinstance(upstream, OpenAIUpstream):
            yield from _url_problems(f"upstreams.{name}.base_url", upstream.base_url)
    redis_url = parts.state.redis_url
    if redis_url is not None and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        yield Problem("state.redis_url", "must start with redis://, rediss:// or unix://")


def _url_problems(path: str, url: str, *, server_root: bool = False) -> Iterator[Problem]:
    """Problems with an http(s) URL; never echoes the URL, which may hold credentials."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        yield Problem(path, "not a valid URL")
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        yield Problem(path, "must be an absolute http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        yield Problem(path, "must not hold credentials: name an environment variable instead")
    if "?" in url or "#" in url or any(c.isspace() for c in url):
        yield Problem(path, "must not have a query string, fragment or whitespace")
    if server_root and parts.path.rstrip("/").endswith("/v1"):
        yield Problem(path, "a vLLM URL is the server root: Turnout adds /v1/...", "warning")


def _check_bounds(parts: _Parts) -> Iterator[Problem]:
    """Request bounds that cannot work as written: a vLLM upstream allowing more tokens than
    its context holds, or schemas larger than any request body the server accepts."""
    body_limit = parts.server.max_body_bytes
    for name, upstream in parts.upstreams.items():
        bounds, path = upstream.bounds, f"upstreams.{name}.bounds"
        model_len = (
            upstream.serve.max_model_len
            if isinstance(upstream, VllmUpstream) and upstream.serve is not None
            else None
        )
        tokens = bounds.max_tokens
        if model_len is not None and tokens is not None and tokens > model_len:
            yield Problem(
                f"{path}.max_tokens",
                f"{tokens} is more than serve.max_model_len ({model_len}): vLLM "
                "would refuse such requests",
                "warning",
            )
        if bounds.max_schema_bytes > body_limit:
            yield Problem(
                f"{path}.max_schema_bytes",
                f"{bounds.max_schema_bytes} is more than server.max_body_bytes ({body_limit}): "
                "the body limit bites first",
                "warning",
            )


def _check_secrets(parts: _Parts, environ: Mapping[str, str], strict: bool) -> Iterator[Problem]:
    named = [("admin_key_env", parts.admin_key_env)]
    for name, upstream in parts.upstreams.items():
        if isinstance(upstream, VllmUpstream | OpenAIUpstream):
            named.append((f"upstreams.{name}.api_key_env", upstream.api_key_env))
    for path, env_name in named:
        if env_name is None:
            continue
        if not _ENV_NAME.match(env_name):
            yield Problem(path, "not an environment variable name: the file names the variable")
        elif not environ.get(env_name):
            state = "is empty" if env_name in environ else "is not set"
            yield Problem(
                path, f"environment variable {env_name} {state}", "error" if strict else "warning"
            )
