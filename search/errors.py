"""User-facing errors: one message, never a traceback (the CLI prints them; see
:func:`search.cli.run_cli`): bad input exits 2, the machine failing a search mid-way exits 1.
No typer here: the library raises, the CLI decides."""

from __future__ import annotations

import errno

from trainables.errors import ConfigError

# OSErrors that are the machine's, not the code's: a full disk or quota, a storage that is
# (or turned) read-only or unwritable, an I/O error of the device.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.EIO})


class UserError(ConfigError):
    """Bad input from the user (file, field, value, path). The CLI prints it and exits 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """What the CLI prints as one line with exit code 2: the one root of user-input errors."""
    return (ConfigError,)


class MachineError(Exception):
    """The machine stopped a search mid-way (no space left, a storage turned read-only): the
    CLI prints this one line (the path, the cause, the resume command) and exits 1."""


def machine_cause(e: BaseException) -> OSError | None:
    """The machine's OSError (:data:`MACHINE_ERRNOS`) behind ``e``, following the chain of
    causes and contexts (Ray Tune wraps what a callback raised), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in MACHINE_ERRNOS:
            return x
        todo += [x.__cause__, x.__context__]
    return None


def describe_os_error(e: OSError, *, path: bool = True) -> str:
    """The cause in words (``PATH: cause`` with ``path`` and a file name), for one line."""
    why = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
        (e.strerror or str(e)).lower()
    return f"{e.filename}: {why}" if path and e.filename else why
