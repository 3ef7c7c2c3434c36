"""The app factory uvicorn workers import: settings from the file named in TURNOUT_CONFIG."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gateway.app import TurnoutApp, create_app
from gateway.config_check import load_settings
from gateway.metrics import MULTIPROC_ENV

CONFIG_ENV = "TURNOUT_CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """Plain timestamped lines on stderr for Turnout's own loggers (every worker calls this)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # One line per upstream call would flood the log and cost time on every request.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def app_from_env() -> TurnoutApp:
    configure_logging()
    settings = load_settings(os.environ[CONFIG_ENV], os.environ)
    logging.getLogger("turnout").info(
        "serving routes %s over upstreams %s (pid %d)",
        ", ".join(settings.routes),
        ", ".join(f"{name} ({u.__struct_config__.tag})" for name, u in settings.upstreams.items()),
        os.getpid(),
    )
    return create_app(settings, os.environ)


@contextlib.contextmanager
def shared_metrics(workers: int) -> Iterator[None]:
    """With several workers, a fresh PROMETHEUS_MULTIPROC_DIR that they all write their metrics
    to (so one scrape of any worker shows them all), removed at exit.

    It is set before uvicorn spawns the workers: each imports prometheus_client afresh, which
    picks its value store from that variable at import. A directory the operator set already
    is used as it is; like prometheus_client says, it should be emptied between runs.
    """
    log = logging.getLogger("turnout")
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        if any(Path(given).glob("*.db")):
            log.warning("%s=%s holds files from an earlier run", MULTIPROC_ENV, given)
        yield
        return
    if workers == 1:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="turnout-metrics-") as path:
        os.environ[MULTIPROC_ENV] = path
        log.info("metrics of %d workers merged through %s", workers, path)
        try:
            yield
        finally:
            del os.environ[MULTIPROC_ENV]
