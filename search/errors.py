"""User-facing errors: one message, exit code 2, never a traceback (the CLI prints them;
see :func:`search.cli.run_cli`). No typer here: the library raises, the CLI decides."""

from __future__ import annotations

from trainables.errors import ConfigError


class UserError(ConfigError):
    """Bad input from the user (file, field, value, path). The CLI prints it and exits 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """What the CLI prints as one line with exit code 2: the one root of user-input errors."""
    return (ConfigError,)
