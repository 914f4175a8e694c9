"""The ``sparse-search`` command line: ``app`` (typer, in ``commands``) and ``main``, the
console script; each command's own module (``data``, ``export``) is imported when that
command runs.

Imported lazily: ``import search.cli.data`` does not build the whole app.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"app": "search.cli.commands", "main": "search.cli.commands", "run_cli": "search.cli.commands",
           "export_run": "search.cli.export"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'search.cli' has no attribute {name!r}")
