"""One root for every error a user's input can cause (a config, a file, a value).

:class:`ConfigError` is what the CLI prints as one ``error: ...`` line with exit code 2, never
a traceback. Every such error in the project derives from it: ``ArchError``, ``DataError`` and
``TrainConfigError`` here in trainables, ``UserError`` and ``SpecError`` in search. It is a
``ValueError``, as each of them was before.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad input; the message names the file or field, the value and what is allowed."""
