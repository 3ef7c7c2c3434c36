"""The app factory uvicorn workers import: settings from the file named in TURNOUT_CONFIG."""

from __future__ import annotations

import os

from gateway.app import TurnoutApp, create_app
from gateway.config_check import load_settings


def app_from_env() -> TurnoutApp:
    path = os.environ["TURNOUT_CONFIG"]
    return create_app(load_settings(path, os.environ), os.environ)
