"""`turnout serve` as a real process for the reliability tests: its own interpreter (so the load
a test generates never competes with the gateway for one GIL), several workers when asked,
stopped with SIGINT and its output kept; and a lean HTTP/1.1 client to load it with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.processes import ROOT, TURNOUT, Served, free_port, wait_ready


@contextlib.contextmanager
def serve(
    tmp_path: Path,
    config: dict[str, Any],
    *,
    workers: int = 1,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Served]:
    """Serve `config` (written as JSON, which is YAML) until the block ends."""
    path = tmp_path / f"turnout-{os.urandom(4).hex()}.yaml"
    path.write_text(json.dumps(config))
    port = free_port() if port is None else port
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    environ |= {"TMPDIR": str(tmp_path), **(env or {})}
    argv = [TURNOUT, "serve", "-c", str(path), "--workers", str(workers), "--port", str(port)]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    served = Served(f"http://127.0.0.1:{port}", proc)
    try:
        wait_ready(served.url, served.proc)
        yield served
    finally:
        served.stop()


def workers_serving(output: str) -> int:
    """How many worker processes said they serve (each logs "serving routes" once)."""
    return output.count("serving routes")


@dataclass
class Reply:
    latency: float  # seconds from sending the request to the whole answer
    status: int
    body: Any  # the JSON answer (None when empty)
    headers: dict[str, str]  # names lowercased

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("retry-after")


class Client:
    """A lean HTTP/1.1 client over keep-alive connections, for load: at a few hundred requests
    a second httpx's connection pool, not the gateway, would be the bottleneck on two cores.
    Requests carry a JSON body (or none); answers must have a Content-Length."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self._address = (host, int(port))
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        data = b"" if body is None else json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: gateway\r\ncontent-length: {len(data)}\r\n"
            f"content-type: application/json\r\n{self._headers}{extra}\r\n"
        )
        started = time.monotonic()
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(*self._address)
        writer.write(head.encode() + data)
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        found = dict(line.split(": ", 1) for line in lines if line)
        answer = {name.lower(): value for name, value in found.items()}
        raw = await reader.readexactly(int(answer["content-length"]))
        latency = time.monotonic() - started
        if answer.get("connection") == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return Reply(latency, int(status_line.split()[1]), json.loads(raw) if raw else None, answer)

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
