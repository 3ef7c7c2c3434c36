"""The app factory uvicorn workers import: settings from the file named in TURNOUT_CONFIG."""

from __future__ import annotations

import logging
import os

from gateway.app import TurnoutApp, create_app
from gateway.config_check import load_settings

CONFIG_ENV = "TURNOUT_CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """Plain timestamped lines on stderr for Turnout's own loggers (every worker calls this)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


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
