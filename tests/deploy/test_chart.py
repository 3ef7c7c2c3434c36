"""The Helm chart (helm/turnout), rendered offline and checked against what it must agree with.

Rendering uses helm-python-sdk, which binds Helm's own Go engine (v4) as a shared library:
no helm binary, cluster or network. Every manifest is validated against the Kubernetes API
schemas shipped in kubernetes-validate (strict: unknown fields are errors). The invariants:
the ConfigMap holds a configuration Turnout accepts, strictly, with exactly the secrets the
Deployment provides; each vLLM pod runs the command `serving.vllm_command.vllm_launch` builds
from that same configuration; secrets are only ever referenced; values are typed by the
schema and documented in values.yaml.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.config_check import check_settings
from gateway.settings import Settings, VllmUpstream
from serving.vllm_command import serve_args, vllm_launch

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "turnout"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
RELEASE, NAMESPACE = "turnout", "llm"
# The oldest Kubernetes the manifests are checked against: 1.33 is the first whose API has
# image volumes (vllm.adapters.image) in beta; kubernetes-validate ships 1.25 to 1.37.
KUBE_VERSION = "1.33.0"
# Custom resources: kubernetes-validate ships only the built-in API's schemas, so a CRD's
# object is checked by the tests below (its fields) rather than against a schema.
CUSTOM_KINDS = {"ServiceMonitor"}
# What the cluster's Secrets would hold: these must never appear in anything rendered.
CANARY_VALUES = {
    "OPENAI_API_KEY": "sk-canary-openai-3f9a0c1e5b",
    "TURNOUT_ADMIN_KEY": "canary-admin-key-77d1e2",
    "VLLM_KEY": "canary-vllm-key-0b4c9a",
}
# Names of Secrets and keys in them: these may appear only in secretKeyRef fields.
CANARY_REFS = {"secretName": "canary-secret-name-a1b2", "key": "canary-secret-key-c3d4"}
VLLM_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]


Manifest = dict[str, Any]


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text(encoding="utf-8"))
    return values


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template RELEASE CHART -n NAMESPACE` gives."""
    return _chart().render(values, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    docs: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Manifest], kind: str, name: str) -> Manifest:
    [doc] = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return doc


def gateway_config(docs: list[Manifest]) -> tuple[str, dict[str, Any]]:
    text: str = named(docs, "ConfigMap", RELEASE)["data"]["config.yaml"]
    config: dict[str, Any] = yaml.safe_load(text)
    return text, config


def container(doc: Manifest, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    assert len(found) == 1, f"{len(found)} containers named {name}"
    return found[0]


def secret_env(c: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Env var name -> its secretKeyRef, for the variables a container reads from Secrets."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def checked_settings(docs: list[Manifest]) -> Settings:
    """The gateway's configuration, checked by Turnout strictly (a missing secret is an
    error) in the environment the Deployment gives it, each secret a canary value."""
    gateway = container(named(docs, "Deployment", RELEASE), "gateway")
    env = {name: CANARY_VALUES.get(name, "canary-other") for name in secret_env(gateway)}
    _, config = gateway_config(docs)
    settings, problems = check_settings(config, env, strict=True)
    assert [str(p) for p in problems if p.severity == "error"] == []
    assert settings is not None
    return settings


def leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, (*path, str(i)))
    else:
        yield path, node


@pytest.fixture(scope="module")
def default_docs() -> list[Manifest]:
    return manifests(render())


@pytest.fixture(scope="module")
def full_docs() -> list[Manifest]:
    return manifests(render(full_values()))


# --- Kubernetes API schemas -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "full"])
def test_every_manifest_is_a_valid_kubernetes_object(which: str, request: Any) -> None:
    docs: list[Manifest] = request.getfixturevalue(f"{which}_docs")
    assert docs
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")


def test_the_validator_is_strict() -> None:
    """A field Kubernetes does not know is an error (else the test above proves little)."""
    doc = copy.deepcopy(named(manifests(render()), "Deployment", RELEASE))
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_helm_lint_finds_nothing_to_fix() -> None:
    for values in (None, full_values()):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        # Severity 1 is information ("icon is recommended"); 2 warnings, 3 errors.
        assert [m for m in report["messages"] if m["severity"] >= 2] == []
        assert report["errors"] == []


# --- The gateway's configuration ---------------------------------------------------------------


def test_default_values_serve_the_builtin_demo(default_docs: list[Manifest]) -> None:
    settings = checked_settings(default_docs)
    demo = yaml.safe_load((CHART / "files" / "demo-config.yaml").read_text(encoding="utf-8"))
    assert set(settings.upstreams) == set(demo["upstreams"])
    assert set(settings.routes) == set(demo["routes"])
    assert settings.state.redis_url == f"redis://{RELEASE}-redis:6379/0"
    assert settings.state.replicas == 2  # replicaCount 2 x 1 worker


def test_full_values_config_is_valid_with_the_deployments_secrets(
    full_docs: list[Manifest],
) -> None:
    settings = checked_settings(full_docs)
    assert set(settings.upstreams) == {"support-vllm", "code-vllm", "openai"}
    assert settings.admin_key_env == "TURNOUT_ADMIN_KEY"
    # Redis is the bundled one; limits while it is away are shared by maxReplicas x workers.
    assert settings.state.redis_url == f"redis://{RELEASE}-redis:6379/0"
    assert settings.state.replicas == 12 * 2
    gateway = container(named(full_docs, "Deployment", RELEASE), "gateway")
    assert secret_env(gateway) == {
        name: {"name": ref["secretName"], "key": ref["key"]}
        for name, ref in full_values()["secretEnv"].items()
    }


def test_checksum_annotation_follows_the_config(full_docs: list[Manifest]) -> None:
    text, _ = gateway_config(full_docs)
    pod = named(full_docs, "Deployment", RELEASE)["spec"]["template"]
    checksum = pod["metadata"]["annotations"]["checksum/config"]
    assert checksum == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    changed = full_values()
    changed["config"]["routes"]["review"]["split"] = {"review-ft": 10, "review-prompted": 90}
    other = named(manifests(render(changed)), "Deployment", RELEASE)["spec"]["template"]
    assert other["metadata"]["annotations"]["checksum/config"] != checksum


def test_an_upstream_with_its_own_urls_is_left_alone() -> None:
    values = full_values()
    urls = ["http://vllm-a.example.internal:8000"]
    values["config"]["upstreams"]["code-vllm"]["urls"] = urls
    del values["vllm"]["upstreams"]["code-vllm"]
    docs = manifests(render(values))
    assert checked_settings(docs).upstreams["code-vllm"].urls == urls  # type: ignore[union-attr]
    names = {d["metadata"]["name"] for d in of_kind(docs, "StatefulSet")}
    assert names == {f"{RELEASE}-redis", f"{RELEASE}-vllm-support-vllm"}


# --- vLLM: the same `serve` section, rendered by the chart and by serving/vllm_command.py --------


def vllm_upstreams(settings: Settings) -> dict[str, VllmUpstream]:
    return {
        name: u
        for name, u in settings.upstreams.items()
        if isinstance(u, VllmUpstream) and u.serve is not None
    }


def test_vllm_pods_run_exactly_the_command_turnout_builds(full_docs: list[Manifest]) -> None:
    """command + args == vllm_launch(upstream, i, python="python3").argv for every pod i:
    python3 -m vllm.entrypoints.openai.api_server --model BASE --host H --port P, then
    serve_args(serve) in its order. Helm maps are key-sorted, so adapters are listed in key
    order, the order Turnout itself reads them from the rendered ConfigMap."""
    upstreams = vllm_upstreams(checked_settings(full_docs))
    assert set(upstreams) == {"support-vllm", "code-vllm"}
    for name, upstream in upstreams.items():
        assert upstream.serve is not None
        sts = named(full_docs, "StatefulSet", f"{RELEASE}-vllm-{name}")
        c = container(sts, "vllm")
        argv = [*c["command"], *c["args"]]
        assert c["command"] == VLLM_COMMAND
        assert c["args"][:2] == ["--model", upstream.serve.base_model]
        assert c["args"][6:] == serve_args(upstream.serve)
        for replica in range(len(upstream.urls)):
            assert argv == list(vllm_launch(upstream, replica, python="python3").argv)


def test_vllm_args_name_every_adapter_loaded_at_start(full_docs: list[Manifest]) -> None:
    values = full_values()["config"]["upstreams"]
    expected = {
        "support-vllm": (
            {"support-lora=/adapters/support-lora", "billing-lora=/adapters/billing-lora"},
            {"triage-lora"},  # at_start: false, loaded at run time through the gateway
        ),
        "code-vllm": ({"review-lora=/adapters/review-lora"}, set()),
    }
    for name, (at_start, later) in expected.items():
        assert set(values[name]["serve"]["adapters"]) == {a.split("=")[0] for a in at_start} | later
        args = container(named(full_docs, "StatefulSet", f"{RELEASE}-vllm-{name}"), "vllm")["args"]
        start = args.index("--lora-modules") + 1
        modules = args[start : start + len(at_start)]
        assert set(modules) == at_start
        assert all(not a.startswith(f"{n}=") for a in args for n in later)
        assert "--enable-lora" in args


def test_vllm_urls_name_each_pod_of_its_statefulset(full_docs: list[Manifest]) -> None:
    settings = checked_settings(full_docs)
    for name, upstream in vllm_upstreams(settings).items():
        full = f"{RELEASE}-vllm-{name}"
        sts = named(full_docs, "StatefulSet", full)
        svc = named(full_docs, "Service", full)
        port = container(sts, "vllm")["ports"][0]["containerPort"]
        assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == full
        assert svc["spec"]["ports"][0]["port"] == port
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert upstream.urls == [
            f"http://{full}-{i}.{full}.{NAMESPACE}.svc:{port}"
            for i in range(sts["spec"]["replicas"])
        ]
    assert len(settings.upstreams["support-vllm"].urls) == 2  # type: ignore[union-attr]
    assert len(settings.upstreams["code-vllm"].urls) == 1  # type: ignore[union-attr]


def test_vllm_containers_get_gpus_env_probes_and_adapters(full_docs: list[Manifest]) -> None:
    values = full_values()
    expected_gpus = {"support-vllm": "1", "code-vllm": "2"}  # default 1; tensor_parallel_size 2
    for name, gpus in expected_gpus.items():
        sts = named(full_docs, "StatefulSet", f"{RELEASE}-vllm-{name}")
        c = container(sts, "vllm")
        assert c["image"].startswith("vllm/vllm-openai:")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        env = {e["name"]: e for e in c["env"]}
        runtime = values["config"]["upstreams"][name]["serve"].get("runtime_lora_updating", True)
        assert ("VLLM_ALLOW_RUNTIME_LORA_UPDATING" in env) is runtime
        if runtime:
            assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
        key_env = values["config"]["upstreams"][name].get("api_key_env")
        refs = secret_env(c)
        if key_env:
            ref = values["secretEnv"][key_env]
            assert refs["VLLM_API_KEY"] == {"name": ref["secretName"], "key": ref["key"]}
        else:
            assert "VLLM_API_KEY" not in refs
        [mount] = [m for m in c["volumeMounts"] if m["name"] == "adapters"]
        assert mount == {"name": "adapters", "mountPath": "/adapters", "readOnly": True}
    volumes = {
        name: {
            v["name"]: v
            for v in named(full_docs, "StatefulSet", f"{RELEASE}-vllm-{name}")["spec"]["template"][
                "spec"
            ]["volumes"]
        }["adapters"]
        for name in expected_gpus
    }
    assert volumes["support-vllm"]["persistentVolumeClaim"] == {
        "claimName": "support-adapters",
        "readOnly": True,
    }
    assert volumes["code-vllm"]["image"]["reference"] == "registry.example.com/adapters/review:1"


def test_a_gpu_count_that_disagrees_with_the_pods_is_refused() -> None:
    values = full_values()
    values["vllm"]["upstreams"]["code-vllm"]["gpus"] = 4  # the config bills 2 per replica
    with pytest.raises(helm.HelmRenderError, match=r"gpu\.count \(2\) must equal"):
        render(values)


def test_overrides_for_an_unknown_upstream_are_refused() -> None:
    values = full_values()
    values["vllm"]["upstreams"]["typo-vllm"] = {"replicas": 3}
    with pytest.raises(helm.HelmRenderError, match=r"vllm\.upstreams\.typo-vllm"):
        render(values)


# --- Secrets -------------------------------------------------------------------------------------


def test_secrets_are_only_referenced_never_rendered() -> None:
    values = full_values()
    values["secretEnv"]["OPENAI_API_KEY"] = dict(CANARY_REFS)
    values["vllm"]["hfToken"] = dict(CANARY_REFS)
    rendered = render(values)
    everything = "\n".join(rendered.values())
    for secret in CANARY_VALUES.values():
        assert secret not in everything
    docs = manifests(rendered)
    for doc in of_kind(docs, "ConfigMap"):
        text = yaml.safe_dump(doc)
        assert not any(ref in text for ref in CANARY_REFS.values())
    referenced = 0
    for doc in docs:
        for path, leaf in leaves(doc):
            if isinstance(leaf, str) and any(ref in leaf for ref in CANARY_REFS.values()):
                assert path[-2:] in {("secretKeyRef", "name"), ("secretKeyRef", "key")}, path
                referenced += 1
    assert referenced == 2 * (1 + 2)  # OPENAI_API_KEY in the gateway, HF_TOKEN in 2 vLLMs


def test_a_config_naming_a_secret_without_a_reference_is_refused() -> None:
    values = full_values()
    del values["secretEnv"]["OPENAI_API_KEY"]
    message = r"upstreams\.openai\.api_key_env names OPENAI_API_KEY"
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_a_secret_value_cannot_be_given_as_a_value() -> None:
    values = full_values()
    values["secretEnv"]["OPENAI_API_KEY"]["value"] = CANARY_VALUES["OPENAI_API_KEY"]
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_a_redis_url_with_a_password_is_refused_without_echoing_it() -> None:
    values = full_values()
    values["redis"] = {"enabled": False, "url": "redis://:canary-redis-pass@redis.internal:6379/0"}
    with pytest.raises(helm.HelmRenderError, match="must not hold credentials") as info:
        render(values)
    assert "canary-redis-pass" not in str(info.value)


# --- Redis ---------------------------------------------------------------------------------------


def test_external_redis_replaces_the_bundled_one() -> None:
    values = full_values()
    values["redis"] = {"enabled": False, "url": "rediss://redis.internal:6380/2"}
    docs = manifests(render(values))
    assert checked_settings(docs).state.redis_url == "rediss://redis.internal:6380/2"
    assert [d["metadata"]["name"] for d in of_kind(docs, "StatefulSet")] == [
        f"{RELEASE}-vllm-code-vllm",
        f"{RELEASE}-vllm-support-vllm",
    ]
    assert not [d for d in of_kind(docs, "NetworkPolicy") if "redis" in d["metadata"]["name"]]


def test_bundled_redis_persists_when_asked(full_docs: list[Manifest]) -> None:
    sts = named(full_docs, "StatefulSet", f"{RELEASE}-redis")
    assert container(sts, "redis")["image"] == "redis:7-alpine"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    svc = named(full_docs, "Service", f"{RELEASE}-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379


def test_several_gateway_processes_without_shared_state_are_refused() -> None:
    values: dict[str, Any] = {"redis": {"enabled": False}}
    with pytest.raises(helm.HelmRenderError, match="need shared state"):
        render(values)
    values["replicaCount"] = 1
    assert checked_settings(manifests(render(values))).state.redis_url is None
    values = {"redis": {"enabled": False}, "allowPerPodState": True}
    assert checked_settings(manifests(render(values))).state.redis_url is None


# --- The gateway's pods and optional objects ------------------------------------------------------


def test_gateway_pods_are_locked_down_and_probed(default_docs: list[Manifest]) -> None:
    deployment = named(default_docs, "Deployment", RELEASE)
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, "gateway")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert {"mountPath": "/etc/turnout", "name": "config", "readOnly": True} in c["volumeMounts"]
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    service = named(default_docs, "Service", RELEASE)
    assert service["spec"]["selector"] == selector
    assert selector["app.kubernetes.io/component"] == "gateway"


def test_optional_objects_exist_only_when_enabled(
    default_docs: list[Manifest], full_docs: list[Manifest]
) -> None:
    # Defaults: PDB on; HPA, ServiceMonitor and dashboard off.
    assert len(of_kind(default_docs, "PodDisruptionBudget")) == 1
    assert of_kind(default_docs, "HorizontalPodAutoscaler") == []
    assert of_kind(default_docs, "ServiceMonitor") == []
    assert [d["metadata"]["name"] for d in of_kind(default_docs, "ConfigMap")] == [RELEASE]
    assert "replicas" in named(default_docs, "Deployment", RELEASE)["spec"]
    # Full: all on; the HPA owns the replica count.
    [hpa] = of_kind(full_docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == RELEASE
    assert "replicas" not in named(full_docs, "Deployment", RELEASE)["spec"]
    [monitor] = of_kind(full_docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    service = named(full_docs, "Service", RELEASE)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    # Off again.
    values = full_values()
    values["autoscaling"]["enabled"] = False
    values["serviceMonitor"]["enabled"] = False
    values["podDisruptionBudget"] = {"enabled": False}
    values["grafanaDashboard"]["enabled"] = False
    docs = manifests(render(values))
    for kind in ("HorizontalPodAutoscaler", "ServiceMonitor", "PodDisruptionBudget"):
        assert of_kind(docs, kind) == []
    assert [d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")] == [RELEASE]


def test_grafana_dashboard_ships_the_dashboard_file(full_docs: list[Manifest]) -> None:
    board = named(full_docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["namespace"] == "monitoring"
    shipped = (CHART / "dashboards" / "turnout.json").read_text(encoding="utf-8")
    assert board["data"]["turnout.json"] == shipped.rstrip("\n")


def test_notes_say_where_to_call_and_what_is_missing() -> None:
    notes = render(full_values())[f"{RELEASE}/templates/NOTES.txt"]
    assert f"svc/{RELEASE} 8080:8080" in notes
    assert "Routes (what clients send as `model`): review, support" in notes
    assert "OPENAI_API_KEY <- secret turnout-openai, key api-key" in notes
    assert "DEMO" in render()[f"{RELEASE}/templates/NOTES.txt"]


# --- Values: the schema and the comments ---------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": -1},
        {"replicaCount": "3"},
        {"workers": 0},
        {"redis": {"url": "http://redis:6379"}},
        {"vllm": {"gpus": "two"}},
        {"vllm": {"replicas": 0}},  # an upstream needs at least one URL
        {"config": {"upstreams": {"u": {"kind": "tgi"}}}},
        {"config": {"colour": "blue"}},
        {"secretEnv": {"lower-case!": {"secretName": "s", "key": "k"}}},
        {"replicaCunt": 2},
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        _chart().validate_schema(bad)


def test_schema_accepts_the_defaults_and_the_full_example() -> None:
    _chart().validate_schema({})
    _chart().validate_schema(full_values())


_KEY = re.compile(r"^(?P<indent>\s*)(?:- )?(?P<key>[A-Za-z0-9_.\-/\"]+):(?:\s|$)")


def test_every_value_in_values_yaml_has_a_comment() -> None:
    """Each key line has a comment on the line(s) just above it or at its end."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    missing = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#") or not _KEY.match(line):
            continue
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("#") and " # " not in line:
            missing.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert missing == []
    keys = sum(1 for line in lines if _KEY.match(line) and not line.lstrip().startswith("#"))
    assert keys > 50  # the pattern does find the keys
