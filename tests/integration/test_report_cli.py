"""`turnout report` from a running gateway and from a JSON-lines record file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.integration.conftest import ADMIN_KEY, ENV, Upstreams, base_config, running

TURNOUT = str(Path(sys.executable).parent / "turnout")
USER = [{"role": "user", "content": "hi"}]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV}
    return subprocess.run(
        [TURNOUT, "report", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_report_from_a_gateway_and_from_its_record_file(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    config: dict[str, Any] = base_config(upstreams)
    config["records"] = {"file": str(tmp_path / "records.jsonl")}
    config["routes"]["ab"] = {"split": {"ok": 1, "prompted": 1}}
    (tmp_path / "turnout.yaml").write_text(yaml.safe_dump(config))
    with running(config) as (url, _):
        for i in range(12):
            body = {"model": "ab", "messages": USER, "user": f"u{i}"}
            assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
        direct = httpx.get(
            url + "/turnout/report", params={"route": "ab"},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        ).json()  # fmt: skip
        live = _run("--url", url, "--route", "ab", "--json")
        table = _run("--url", url, "--route", "ab")
    assert live.returncode == 0, live.stderr
    from_gateway = json.loads(live.stdout)
    assert from_gateway["routes"]["ab"]["requests"] == 12 == direct["routes"]["ab"]["requests"]
    assert "verdict:" in table.stdout and "too few data" in table.stdout
    files = ["--records", str(tmp_path / "records.jsonl"), "-c", str(tmp_path / "turnout.yaml")]
    offline = _run(*files, "--route", "ab", "--json")
    assert offline.returncode == 0, offline.stderr
    from_file = json.loads(offline.stdout)["routes"]["ab"]
    assert from_file["requests"] == 12
    for name, row in from_gateway["routes"]["ab"]["variants"].items():
        assert from_file["variants"][name]["requests"] == row["requests"]
        assert from_file["variants"][name]["cost_per_request_usd"] == row["cost_per_request_usd"]


def test_report_needs_a_source_and_a_key(upstreams: Upstreams) -> None:
    assert _run().returncode != 0
    with running(base_config(upstreams)) as (url, _):
        denied = subprocess.run(
            [TURNOUT, "report", "--url", url], capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if k != "TURNOUT_ADMIN_KEY"},
        )  # fmt: skip
    assert denied.returncode == 1 and "403" in denied.stdout + denied.stderr
