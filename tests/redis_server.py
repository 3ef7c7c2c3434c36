"""A private redis-server for tests: 127.0.0.1 on a free port, no persistence, killed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_S = 10.0


class RedisServer:
    """A running private redis-server: its URL, and a way to freeze it (SIGSTOP) for a while."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, argv: list[str]) -> None:
        self.process = process
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._argv = argv

    def kill(self) -> None:
        """SIGKILL the server: open connections are reset, new ones refused, its data lost."""
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        """Start a fresh (empty) server on the same port, after `kill()`, once it answers PING."""
        if self.process.poll() is None:
            self.kill()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # the port may linger for a moment after the kill
            process = subprocess.Popen(
                self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if _wait_ready(process, self.port):
                self.process = process
                return
            _stop(process)
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not restart on port {self.port}")
            time.sleep(0.05)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the server process: connections stay open, nothing answers, until resumed."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def private_redis(binary: str = "redis-server") -> Iterator[RedisServer]:
    """Start `binary` on a free loopback port and yield it once it answers PING."""
    path = shutil.which(binary)
    if path is None:
        raise FileNotFoundError(f"{binary} is not on PATH")
    with tempfile.TemporaryDirectory(prefix="turnout-redis-") as workdir:
        server = _start(path, Path(workdir))
        try:
            yield server
        finally:
            _stop(server.process)


def _start(path: str, workdir: Path) -> RedisServer:
    for _ in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        argv = [
            *(path, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(workdir), "--logfile", "redis.log"),
        ]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _wait_ready(process, port):
            return RedisServer(process, port, argv)
        _stop(process)
    log = workdir / "redis.log"
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"redis-server did not start:\n{tail}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_ready(process: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if _pings(port):
            return True
        time.sleep(0.02)
    return False


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)  # a paused server would ignore SIGTERM
        process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
