"""Configuration checks: valid examples, dotted paths for each kind of mistake, secrets."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config_check import (
    Problem,
    SettingsError,
    check_file,
    check_settings,
    load_settings,
    resolve_secret,
)
from gateway.settings import OpenAIUpstream, Settings, SimulatedUpstream, VllmUpstream

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUICKSTART = EXAMPLES / "quickstart.yaml"
PRODUCTION = EXAMPLES / "production.yaml"
SECRETS = {"OPENAI_API_KEY": "sk-live-value-123456", "TURNOUT_ADMIN_KEY": "admin-value-7890"}


def raw_of(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return copy.deepcopy(loaded)


def errors(raw: object, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The error problems of a check, as {path: message}."""
    settings, problems = check_settings(raw, environ or {})
    found = {p.path: p.message for p in problems if p.severity == "error"}
    assert (settings is None) == bool(found)
    return found


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "turnout.yaml"
    path.write_text(text)
    return path


# The examples


def test_quickstart_is_valid_with_no_problems() -> None:
    settings, problems = check_settings(raw_of(QUICKSTART), {})
    assert problems == []
    assert settings is not None
    assert isinstance(settings.upstreams["ft-sim"], SimulatedUpstream)
    assert settings.upstreams["ft-sim"].gpu is not None
    assert not settings.variants["support-ft"].is_prompted
    prompted = settings.variants["support-prompted"]
    assert prompted.is_prompted
    assert prompted.prompt is not None and len(prompted.prompt.examples) == 2
    assert prompted.price is not None and prompted.price.output_per_mtok == 0.60
    route = settings.routes["support"]
    assert route.split == {"support-ft": 80, "support-prompted": 20}
    assert route.sticky == "user"
    assert route.fallback == ["support-prompted"]
    assert settings.keys == []


def test_quickstart_loads_strictly() -> None:
    assert isinstance(load_settings(QUICKSTART, {}), Settings)


def test_production_has_only_missing_secret_warnings() -> None:
    problems = check_file(PRODUCTION, {}, strict=False)
    assert problems
    assert {p.severity for p in problems} == {"warning"}
    assert all(p.path.endswith("_key_env") and "is not set" in p.message for p in problems)


def test_production_loads_with_secrets_set() -> None:
    settings = load_settings(PRODUCTION, SECRETS)
    assert isinstance(settings.upstreams["ft-vllm"], VllmUpstream)
    assert isinstance(settings.upstreams["openai"], OpenAIUpstream)
    digest = hashlib.sha256(b"sk-test-app-a").hexdigest()
    assert settings.keys[0].sha256 == digest
    assert settings.keys[0].budget is not None and settings.keys[0].budget.usd == 50
    assert settings.state.redis_url == "redis://redis:6379/0"


def test_defaults_when_optional_sections_are_absent() -> None:
    settings, _ = check_settings(raw_of(QUICKSTART) | {"server": None}, {})
    assert settings is None  # an explicit null section is not a mapping
    raw = raw_of(QUICKSTART)
    del raw["server"]
    settings, _ = check_settings(raw, {})
    assert settings is not None
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.server.max_body_bytes == 4 * 1024 * 1024
    assert settings.state.redis_url is None and settings.admin_key_env is None


# One mistake at a time: the exact dotted path


def test_unknown_key_in_an_upstream() -> None:
    raw = raw_of(QUICKSTART)
    raw["upstreams"]["ft-sim"]["colour"] = "red"
    assert errors(raw) == {"upstreams.ft-sim.colour": "unknown field"}


def test_unknown_key_nested_in_an_entry() -> None:
    raw = raw_of(QUICKSTART)
    raw["variants"]["support-prompted"]["prompt"]["examples"][1]["tone"] = "dry"
    assert errors(raw) == {"variants.support-prompted.prompt.examples[1].tone": "unknown field"}


def test_bad_upstream_kind() -> None:
    raw = raw_of(QUICKSTART)
    raw["upstreams"]["hosted-sim"]["kind"] = "tgi"
    found = errors(raw)
    assert list(found) == ["upstreams.hosted-sim.kind"]
    assert "'tgi'" in found["upstreams.hosted-sim.kind"]
    assert "vllm, openai, simulated" in found["upstreams.hosted-sim.kind"]


def test_missing_upstream_kind() -> None:
    raw = raw_of(QUICKSTART)
    del raw["upstreams"]["hosted-sim"]["kind"]
    assert list(errors(raw)) == ["upstreams.hosted-sim.kind"]


def test_negative_weight() -> None:
    raw = raw_of(QUICKSTART)
    raw["routes"]["support"]["split"]["support-prompted"] = -20
    found = errors(raw)
    assert list(found) == ["routes.support.split.support-prompted"]
    assert "> 0" in found["routes.support.split.support-prompted"]


def test_zero_weight() -> None:
    raw = raw_of(QUICKSTART)
    raw["routes"]["support"]["split"]["support-ft"] = 0
    assert list(errors(raw)) == ["routes.support.split.support-ft"]


def test_split_naming_a_missing_variant() -> None:
    raw = raw_of(QUICKSTART)
    raw["routes"]["support"]["split"]["nope"] = 5
    assert errors(raw) == {"routes.support.split.nope": "unknown variant 'nope'"}


def test_fallback_and_shadow_naming_missing_variants() -> None:
    raw = raw_of(QUICKSTART)
    raw["routes"]["support"]["fallback"] = ["support-prompted", "gone"]
    raw["routes"]["support"]["shadow"] = {"variant": "ghost", "fraction": 0.1}
    assert errors(raw) == {
        "routes.support.fallback[1]": "unknown variant 'gone'",
        "routes.support.shadow.variant": "unknown variant 'ghost'",
    }


def test_variant_naming_a_missing_upstream() -> None:
    raw = raw_of(QUICKSTART)
    raw["variants"]["support-ft"]["upstream"] = "elsewhere"
    assert errors(raw) == {"variants.support-ft.upstream": "unknown upstream 'elsewhere'"}


@pytest.mark.parametrize("sticky", ["session", "header:", "header:x y", "USER", ""])
def test_bad_sticky(sticky: str) -> None:
    raw = raw_of(QUICKSTART)
    raw["routes"]["support"]["sticky"] = sticky
    assert list(errors(raw)) == ["routes.support.sticky"]


@pytest.mark.parametrize("sticky", ["user", "key", "header:x-session-id"])
def test_good_sticky(sticky: str) -> None:
    raw = raw_of(QUICKSTART)
    raw["routes"]["support"]["sticky"] = sticky
    assert errors(raw) == {}


@pytest.mark.parametrize(
    "url",
    [
        "ftp://vllm-0:8000",
        "vllm-0:8000",
        "/v1",
        "http://",
        "http://vllm-0:8000?x=1",
        "http://vllm-0:8000#top",
        "http://user:hunter2@vllm-0:8000",
        "http://vllm-0:99999",
    ],
)
def test_bad_url(url: str) -> None:
    raw = raw_of(PRODUCTION)
    raw["upstreams"]["ft-vllm"]["urls"][1] = url
    found = errors(raw, SECRETS)
    assert list(found) == ["upstreams.ft-vllm.urls[1]"]
    assert "hunter2" not in found["upstreams.ft-vllm.urls[1]"]


def test_bad_base_url() -> None:
    raw = raw_of(PRODUCTION)
    raw["upstreams"]["openai"]["base_url"] = "api.openai.com/v1"
    assert list(errors(raw, SECRETS)) == ["upstreams.openai.base_url"]


def test_vllm_url_with_v1_is_a_warning() -> None:
    raw = raw_of(PRODUCTION)
    raw["upstreams"]["ft-vllm"]["urls"][0] = "http://vllm-0:8000/v1"
    settings, problems = check_settings(raw, SECRETS)
    assert settings is not None
    assert [(p.path, p.severity) for p in problems] == [("upstreams.ft-vllm.urls[0]", "warning")]


@pytest.mark.parametrize("sha", ["abc", "G" * 64, "774E" + "0" * 60])
def test_bad_sha256(sha: str) -> None:
    raw = raw_of(PRODUCTION)
    raw["keys"][0]["sha256"] = sha
    assert list(errors(raw, SECRETS)) == ["keys[0].sha256"]


@pytest.mark.parametrize("section", ["upstreams", "variants", "routes"])
def test_missing_required_section(section: str) -> None:
    raw = raw_of(QUICKSTART)
    del raw[section]
    assert errors(raw)[section] == "required section missing"


def test_unknown_top_level_key() -> None:
    raw = raw_of(QUICKSTART)
    raw["upstream"] = {}
    assert errors(raw) == {"upstream": "unknown top-level key"}


def test_server_max_body_bytes_must_be_positive() -> None:
    raw = raw_of(QUICKSTART)
    raw["server"]["max_body_bytes"] = 0
    assert list(errors(raw)) == ["server.max_body_bytes"]


def test_keys_must_be_unique_and_name_known_routes() -> None:
    raw = raw_of(PRODUCTION)
    raw["keys"].append(dict(raw["keys"][0], routes=["support", "sales"]))
    assert errors(raw, SECRETS) == {
        "keys[1].routes[1]": "unknown route 'sales'",
        "keys[1].name": "'app-a' is also the name of keys[0]",
        "keys[1].sha256": "the same hash as keys[0]",
    }


def test_serve_section_requires_a_served_model() -> None:
    raw = raw_of(PRODUCTION)
    raw["variants"]["support-ft"]["model"] = "billing-lora"
    assert list(errors(raw, SECRETS)) == ["variants.support-ft.model"]
    raw["variants"]["support-ft"]["model"] = "meta-llama/Llama-3.1-8B-Instruct"
    assert errors(raw, SECRETS) == {}


def test_simulated_models_list_limits_variant_models() -> None:
    raw = raw_of(QUICKSTART)
    raw["upstreams"]["ft-sim"]["models"] = ["other-lora"]
    assert list(errors(raw)) == ["variants.support-ft.model"]
    raw["upstreams"]["ft-sim"]["models"] = ["other-lora", "support-lora"]
    assert errors(raw) == {}


def test_openai_variant_without_price_is_a_warning() -> None:
    raw = raw_of(PRODUCTION)
    del raw["variants"]["support-prompted"]["price"]
    settings, problems = check_settings(raw, SECRETS)
    assert settings is not None
    assert problems == [
        Problem(
            "variants.support-prompted.price",
            "no price on an openai upstream: its cost will read 0",
            "warning",
        )
    ]


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    problems = check_file(write(tmp_path, "- just\n- a list\n"), {}, strict=False)
    assert [p.path for p in problems] == ["(root)"]
    assert check_file(write(tmp_path, ""), {}, strict=False)[0].path == "(root)"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = "upstreams:\n  u:\n    kind: simulated\n   bad: [unclosed\n"
    problems = check_file(write(tmp_path, text), {}, strict=False)
    assert len(problems) == 1
    assert problems[0].path == "(yaml)"
    assert "line 4" in problems[0].message


def test_yaml_duplicate_key_is_an_error(tmp_path: Path) -> None:
    text = QUICKSTART.read_text() + "routes:\n  other: {split: {support-ft: 1}}\n"
    problems = check_file(write(tmp_path, text), {}, strict=False)
    assert len(problems) == 1
    assert "duplicate key 'routes'" in problems[0].message
    assert f"line {len(QUICKSTART.read_text().splitlines()) + 1}," in problems[0].message


def test_unreadable_file(tmp_path: Path) -> None:
    problems = check_file(tmp_path / "absent.yaml", {}, strict=False)
    assert [p.path for p in problems] == ["(file)"]


# Many mistakes at once: every one reported


def test_several_problems_are_all_reported() -> None:
    raw = raw_of(PRODUCTION)
    raw["colour"] = "blue"
    raw["server"]["port"] = 70000
    raw["upstreams"]["ft-vllm"]["colour"] = "red"
    raw["upstreams"]["openai"]["base_url"] = "https://api.openai.com/v1?key=x"
    raw["upstreams"]["broken"] = {"kind": "tgi"}
    raw["variants"]["support-ft"]["tuning"] = "lora"
    raw["variants"]["orphan"] = {"upstream": "missing", "model": "m"}
    raw["routes"]["support"]["split"] = {"support-prompted": -1, "nope": 3}
    raw["routes"]["support"]["sticky"] = "session"
    raw["routes"]["support"]["fallback"] = ["gone"]
    raw["routes"]["other"] = {"split": {"orphan": 1}, "shadow": {"variant": "ghost", "fraction": 2}}
    raw["keys"].append({"name": "app-b", "sha256": "xyz"})
    raw["keys"].append(dict(raw["keys"][0], routes=["sales"]))
    found = errors(raw, SECRETS)
    assert set(found) == {
        "colour",
        "server.port",
        "upstreams.ft-vllm.colour",
        "upstreams.openai.base_url",
        "upstreams.broken.kind",
        "variants.support-ft.tuning",
        "variants.orphan.upstream",
        "routes.support.split.support-prompted",
        "routes.support.split.nope",
        "routes.support.sticky",
        "routes.support.fallback[0]",
        "routes.other.shadow.fraction",
        "keys[1].sha256",
        "keys[2].routes[0]",
        "keys[2].name",
        "keys[2].sha256",
    }


def test_invalid_entries_are_not_reported_again_as_missing() -> None:
    raw = raw_of(QUICKSTART)
    raw["upstreams"]["ft-sim"]["colour"] = "red"
    raw["variants"]["support-prompted"]["price"] = {"input_per_mtok": -1}
    assert list(errors(raw)) == [
        "upstreams.ft-sim.colour",
        "variants.support-prompted.price.input_per_mtok",
    ]


# Secrets


def test_missing_secret_is_a_warning_unless_strict() -> None:
    raw = raw_of(PRODUCTION)
    environ = {"TURNOUT_ADMIN_KEY": "admin-value-7890"}
    settings, problems = check_settings(raw, environ)
    assert settings is not None
    assert problems == [
        Problem(
            "upstreams.openai.api_key_env",
            "environment variable OPENAI_API_KEY is not set",
            "warning",
        )
    ]
    settings, problems = check_settings(raw, environ | {"OPENAI_API_KEY": ""}, strict=True)
    assert settings is None
    assert problems == [
        Problem("upstreams.openai.api_key_env", "environment variable OPENAI_API_KEY is empty")
    ]


def test_secret_values_never_appear_in_messages() -> None:
    raw = raw_of(PRODUCTION)
    raw["upstreams"]["openai"]["headers"] = {"x-team": 5}
    raw["routes"]["support"]["sticky"] = "session"
    environ = {"OPENAI_API_KEY": SECRETS["OPENAI_API_KEY"]}
    _, problems = check_settings(raw, environ, strict=True)
    text = "\n".join(str(p) for p in problems)
    assert "TURNOUT_ADMIN_KEY" in text
    assert "upstreams.openai.headers" in text and "routes.support.sticky" in text
    assert SECRETS["OPENAI_API_KEY"] not in text


def test_a_secret_written_in_place_of_a_variable_name_is_not_echoed() -> None:
    raw = raw_of(PRODUCTION)
    raw["upstreams"]["openai"]["api_key_env"] = "sk-proj-abcdef123456"
    found = errors(raw, SECRETS)
    assert list(found) == ["upstreams.openai.api_key_env"]
    assert "sk-proj" not in found["upstreams.openai.api_key_env"]


def test_resolve_secret() -> None:
    assert resolve_secret(None, SECRETS) is None
    assert resolve_secret("ABSENT", SECRETS) is None
    assert resolve_secret("EMPTY", {"EMPTY": ""}) is None
    assert resolve_secret("OPENAI_API_KEY", SECRETS) == SECRETS["OPENAI_API_KEY"]


# load_settings


def test_load_settings_raises_listing_every_error(tmp_path: Path) -> None:
    raw = raw_of(QUICKSTART)
    raw["upstreams"]["ft-sim"]["colour"] = "red"
    raw["routes"]["support"]["split"]["nope"] = 5
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, yaml.safe_dump(raw)), {})
    assert [p.path for p in caught.value.problems] == [
        "upstreams.ft-sim.colour",
        "routes.support.split.nope",
    ]
    assert str(caught.value).splitlines() == [
        "upstreams.ft-sim.colour: unknown field",
        "routes.support.split.nope: unknown variant 'nope'",
    ]


def test_load_settings_refuses_a_missing_secret() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(PRODUCTION, {"OPENAI_API_KEY": SECRETS["OPENAI_API_KEY"]})
    assert str(caught.value) == "admin_key_env: environment variable TURNOUT_ADMIN_KEY is not set"


def test_load_settings_reports_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, "routes: {a: [\n"), {})
    assert caught.value.problems[0].path == "(yaml)"
