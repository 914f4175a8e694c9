"""User-facing errors: one message, exit code 2, never a traceback (the CLI prints them;
see :func:`search.cli.run_cli`). No typer here: the library raises, the CLI decides."""

from __future__ import annotations

import sys

from trainables.errors import ConfigError


class UserError(ConfigError):
    """Bad input from the user (file, field, value, path). The CLI prints it and exits 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    # Imported lazily so `sparse-search --help` stays fast (no torch import).
    from trainables.arch import ArchError

    types: list[type[BaseException]] = [UserError, ArchError]
    # Only modules already imported can have raised their error type: importing them here
    # would pull in torch (seconds) just to print a message.
    for module, name in (("search.spec", "SpecError"), ("trainables.data", "DataError"),
                         ("trainables.train", "TrainConfigError")):
        mod = sys.modules.get(module)
        if mod is not None:
            types.append(getattr(mod, name))
    return tuple(types)


def run_cli(app: object) -> None:
    """Kept for callers of the old location; the CLI's runner lives in :mod:`search.cli`."""
    from search.cli import run_cli as run

    run(app)  # type: ignore[arg-type]
