"""User-facing errors: one message, exit code 2, never a traceback."""

from __future__ import annotations

import sys

import typer


class UserError(Exception):
    """Bad input from the user (file, field, value, path). The CLI prints it and exits 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
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


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Click's usage errors (unknown command or option, bad value): click's own classes and,
    from typer 0.22 on, those of the click copy typer ships (which click's do not catch)."""
    import click

    types: list[type[BaseException]] = [click.exceptions.ClickException]
    vendored = getattr(typer, "TyperException", None)
    if isinstance(vendored, type) and issubclass(vendored, Exception):
        types.append(vendored)
    return tuple(types)


def run_cli(app: typer.Typer) -> None:
    """Run the typer app; user errors become ``error: ...`` on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if isinstance(e, _usage_error_types()) and hasattr(e, "show"):
            e.show()  # "Usage: ... Error: No such command 'dry-run'." as click prints it
            sys.exit(2)
        if isinstance(e, _user_error_types()):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
