"""Contract: router/ is pure decision code and imports no I/O, framework or gateway module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parents[2] / "router"
FORBIDDEN = frozenset(
    {"litestar", "httpx", "redis", "msgspec", "anyio", "asyncio", "gateway", "serving"}
)


def forbidden_imports(source: str) -> list[str]:
    """Top-level names of forbidden modules imported anywhere in `source`."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend(name for name in names if name.split(".")[0] in FORBIDDEN)
    return found


def _modules() -> list[Path]:
    return sorted(ROUTER.rglob("*.py"))


def test_router_has_modules() -> None:
    assert ROUTER / "__init__.py" in _modules()


@pytest.mark.parametrize("path", _modules(), ids=lambda path: path.name)
def test_router_module_is_pure(path: Path) -> None:
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "source",
    [
        "import httpx",
        "import redis.asyncio as r",
        "from litestar import Litestar",
        "from msgspec.json import decode",
        "def f():\n    import asyncio",
        "from gateway.errors import BadRequest",
        "import os, serving.simulated",
        "import anyio",
    ],
)
def test_checker_catches_forbidden_imports(source: str) -> None:
    assert forbidden_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "import hashlib",
        "from collections.abc import Sequence",
        "from . import selection",
        "import httpx_like",
    ],
)
def test_checker_allows_other_imports(source: str) -> None:
    assert forbidden_imports(source) == []
