"""Running the `turnout` command in tests: where it is, a free port, waiting until it serves."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TURNOUT = shutil.which("turnout", path=str(Path(sys.executable).parent)) or "turnout"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Until `url`'s /readyz answers 200; fails with the server's output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"turnout serve exited:\n{output}")
        assert time.monotonic() < deadline, "turnout serve did not become ready"
        time.sleep(0.1)


class Served:
    """A running `turnout serve`: its URL, process and (once stopped) everything it logged."""

    def __init__(self, url: str, proc: subprocess.Popen[str]) -> None:
        self.url = url
        self.proc = proc
        self.output: str | None = None

    def stop(self) -> str:
        """SIGINT the server, wait for it, and return everything it logged."""
        if self.output is not None:
            return self.output
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            output, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        self.output = output
        return output
