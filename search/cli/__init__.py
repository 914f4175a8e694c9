"""The ``sparse-search`` command line: ``app`` (typer, in ``commands``) and ``main``, the
console script; each command's own module (``data``, ``export``) is imported when that
command runs.

Imported lazily: ``import search.cli.data`` does not build the whole app.
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

_PUBLIC = {"app": "search.cli.commands", "main": "search.cli.commands", "run_cli": "search.cli.commands",
           "export_run": "search.cli.export"}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
