"""Headless Chromium over the Chrome DevTools Protocol, for tests that load a page for real.

`launch(profile)` starts `chromium --headless=new` on a debugging port of its own choosing and
yields a `Browser`; `Browser.load(url)` opens the URL in a new page and records what happened:
exceptions, console and log errors, every URL the page requested. The process group is
killed on the way out, whatever happened. `find_chromium()` is None when none is installed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

BINARIES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class CdpError(RuntimeError):
    """A DevTools command answered with an error, or an awaited event never came."""


def find_chromium() -> str | None:
    for name in BINARIES:
        if path := shutil.which(name):
            return path
    return None


class Session:
    """One DevTools websocket: commands wait for their answer; events are kept in order."""

    def __init__(self, url: str) -> None:
        self._stack = contextlib.ExitStack()
        self._ws: ClientConnection = self._stack.enter_context(
            connect(url, max_size=None, proxy=None, open_timeout=10)
        )
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 10, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, method)
            if message.get("id") == ident:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def wait_for(self, method: str, timeout: float = 10) -> dict[str, Any]:
        """The first event `method` (already received or still to come)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event
            seen = len(self.events)
            self._receive(deadline, method)

    def named(self, method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.events if e["method"] == method]

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CdpError(f"timed out waiting for {waiting_for}")
        try:
            message: dict[str, Any] = json.loads(self._ws.recv(timeout=left))
        except TimeoutError:
            raise CdpError(f"timed out waiting for {waiting_for}") from None
        if "method" in message and "id" not in message:
            self.events.append(message)
        return message

    def close(self) -> None:
        self._stack.close()


@dataclass
class Page:
    """A loaded page: what it did while loading, and its session for further questions."""

    url: str
    session: Session
    requests: list[str] = field(default_factory=list)
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # log and console errors

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (awaited if it is a promise)."""
        answer = self.session.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise CdpError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")


class Browser:
    """A running headless Chromium, reached through its browser-level DevTools socket."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.port = int(ws_url.split(":")[2].split("/")[0])
        self._browser = Session(ws_url)
        self._sessions: list[Session] = []

    def load(self, url: str, timeout: float = 15) -> Page:
        """Open `url` in a fresh page and wait for its load event."""
        target = self._browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = Session(f"ws://127.0.0.1:{self.port}/devtools/page/{target}")
        self._sessions.append(session)
        for domain in ("Network", "Runtime", "Log", "Page"):
            session.call(f"{domain}.enable")
        session.events.clear()  # the about:blank page's own events
        navigated = session.call("Page.navigate", url=url)
        if navigated.get("errorText"):
            raise CdpError(f"navigating to {url}: {navigated['errorText']}")
        session.wait_for("Page.loadEventFired", timeout)
        session.call("Runtime.evaluate", expression="0")  # events before this are all in
        page = Page(url, session)
        page.requests = [e["request"]["url"] for e in session.named("Network.requestWillBeSent")]
        page.exceptions = session.named("Runtime.exceptionThrown")
        page.errors = [e["entry"] for e in session.named("Log.entryAdded")]
        page.errors = [e for e in page.errors if e.get("level") == "error"]
        page.errors += [
            e for e in session.named("Runtime.consoleAPICalled") if e.get("type") == "error"
        ]
        return page

    def close(self) -> None:
        for session in [*self._sessions, self._browser]:
            with contextlib.suppress(Exception):
                session.close()


def _devtools_url(proc: subprocess.Popen[str], lines: queue.Queue[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if found := LISTENING.search(line):
            return found.group(1)
    raise RuntimeError("chromium did not announce its DevTools port:\n" + "".join(seen[-20:]))


@contextlib.contextmanager
def launch(profile: Path, binary: str | None = None, timeout: float = 30) -> Iterator[Browser]:
    """Chromium with its own profile directory; killed (its whole process group) at the end."""
    command = [binary or find_chromium() or "chromium", *FLAGS, f"--user-data-dir={profile}"]
    proc = subprocess.Popen(
        [*command, "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:  # keeps reading stderr so that chromium never blocks on a full pipe
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    browser: Browser | None = None
    try:
        browser = Browser(_devtools_url(proc, lines, timeout))
        yield browser
    finally:
        if browser is not None:
            browser.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        reader.join(timeout=5)  # the pipe ends once the group is gone
        if proc.stderr is not None:
            proc.stderr.close()
