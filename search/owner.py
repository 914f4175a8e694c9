"""One owner per run dir: the commands that change a run dir (``run`` once it has made it,
``resume``, ``finalize``) hold an exclusive lock on it while they work in it (in the CLI: the
process's whole life).

The lock is ``flock`` on ``<run dir>/.owner.lock``. The kernel drops it when the process ends,
however it ends (SIGKILL included), so it is never stale and needs no clean-up; a second
command that would change the same run dir fails at once (exit 2) with who holds it, read from
the file: PID, host, start time and command. The commands that only read a run dir (``pareto``,
``export``, ``train``, ``sync``) never take it. The file is a dot file: the storage mirror
never copies it (:mod:`search.storage`), and a run dir on a URI is guarded on this machine by
its local copy's lock.

The owner also removes what a killed owner left behind that only an owner may remove:
Optuna's journal lock (``optuna.journal.lock``), which Optuna itself force-releases only after
30 s of warnings; nobody else can be using the journal while the run dir is owned.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from search.errors import UserError

OWNER_FILE = ".owner.lock"
JOURNAL_LOCK = "optuna.journal.lock"  # JournalFileSymlinkLock: <journal> + ".lock"

_HELD: dict[Path, Ownership] = {}  # run dir -> this process's lock on it


@dataclass
class Ownership:
    """This process's lock on one run dir: a context manager; released when every
    :func:`own` of it in this process is released (or when the process ends)."""

    path: Path
    file: IO[str]
    holds: int = 1  # own() calls of this process not yet released

    def release(self) -> None:
        self.holds -= 1
        if self.holds == 0:
            _HELD.pop(self.path, None)
            self.file.close()  # closing the last descriptor drops the flock

    def __enter__(self) -> Ownership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def own(path: Path, *, shown: str | None = None) -> Ownership:
    """Take run dir ``path`` for this process, or raise a UserError naming its owner;
    ``shown`` is how the error names the run dir (a URI for a run dir on storage). Taking a
    run dir this process already owns returns the same ownership, held once more."""
    path = Path(path).absolute()
    if path in _HELD:
        _HELD[path].holds += 1
        return _HELD[path]
    lock = path / OWNER_FILE
    try:
        f = lock.open("a+")
    except OSError as e:
        raise UserError(f"{shown or path}: cannot write in the run directory ({e.strerror})") \
            from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _parse(f.read())
        f.close()
        raise UserError(f"{shown or path} is in use by {holder}: two commands must not change "
                        "one run dir at once; wait for it to end, or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "command": " ".join(["sparse-search", *sys.argv[1:]])}) + "\n")
    f.flush()
    ownership = _HELD[path] = Ownership(path, f)
    _clear_stale_locks(path)
    return ownership


def _parse(text: str) -> str:
    """``PID n on HOST (started ..., `command`)`` from the lock file, or what is known."""
    try:
        who = json.loads(text)
        return (f"PID {who['pid']} on {who['host']} (started {who['started']}: "
                f"`{who['command']}`)")
    except (ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


def _clear_stale_locks(path: Path) -> None:
    """Optuna's journal lock of a killed owner: a symlink nobody holds now."""
    journal_lock = path / JOURNAL_LOCK
    if os.path.lexists(journal_lock):
        journal_lock.unlink()
