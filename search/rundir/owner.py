"""One owner per run dir: the commands that change a run dir (``run`` once it has made it,
``resume``, ``finalize``) hold an exclusive lock on it while they work in it (in the CLI: the
process's whole life).

The lock is ``flock`` on ``<run dir>/.owner.lock``. The kernel drops it when the process ends,
however it ends (SIGKILL included), so it is never stale and needs no clean-up; a second
command that would change the same run dir fails at once (exit 2) with who holds it, read from
the file: PID, host, start time and command. The commands that only read a run dir (``pareto``,
``export``, ``train``, ``sync``) never take it. The file is a dot file: the storage mirror
never copies it (:mod:`search.rundir.storage`), and a run dir on a URI is guarded on this machine by
its local copy's lock.

A run dir on a storage URI (s3://, gs://) may be worked on from several machines, where no
flock reaches: its owner also holds a *lease*, ``.owner.json`` at the URI (who, and when it
was last renewed: every :data:`RENEW_S` seconds while the command runs; removed at its end).
The rule for a stale lease: one not renewed for :data:`LEASE_S` seconds belongs to an owner
that died (SIGKILL, a lost machine) or lost the storage, and so does one of this machine whose
process is gone; the next command takes it over, saying so in one line. A live one refuses
the command as a held flock does. Two commands taking a free
lease at the same instant both write it, wait :data:`SETTLE_S` and read it back: the last
writer keeps it, the other exits 2 (object stores offer no compare-and-swap through pyarrow).

The owner also removes what a killed owner left behind that only an owner may remove:
Optuna's journal lock (``optuna.journal.lock``), which Optuna itself force-releases only after
30 s of warnings, and a journal line cut short by a full disk; nobody else can be using the
journal while the run dir is owned.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from search.errors import UserError
from search.rundir.layout import JOURNAL_FILE

OWNER_FILE = ".owner.lock"
JOURNAL_LOCK = f"{JOURNAL_FILE}.lock"  # Optuna's JournalFileSymlinkLock: <journal> + ".lock"
LEASE_FILE = ".owner.json"  # at the root of a run dir on a URI
LEASE_S = 60.0  # a lease not renewed for this long is stale (seconds)
RENEW_S = 15.0  # how often the owner renews it: 4 tries inside LEASE_S
SETTLE_S = 1.0  # wait after writing a free lease before reading it back

log = logging.getLogger("sparse_search.owner")

_HELD: dict[Path, Ownership] = {}  # run dir -> this process's lock on it


@dataclass
class Lease:
    """This process's lease on a run dir at a storage URI, renewed by a daemon thread."""

    remote: Any  # search.rundir.storage.Remote: the run dir on its URI
    mine: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Lease:
        threading.Thread(target=self._renew, name="sparse-search-lease", daemon=True).start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                _write_lease(self.remote, {**self.mine, "renewed": time.time()})
            except OSError as e:  # the storage went away: the search goes on, the lease ages
                log.warning("could not renew the lease on %s (%s)", self.remote.uri, e)

    def release(self) -> None:
        self._stop.set()
        try:
            if (_read_lease(self.remote) or {}).get("token") == self.mine["token"]:
                self.remote.fs.delete_file(f"{self.remote.path}/{LEASE_FILE}")
        except OSError as e:  # it goes stale in LEASE_S: harmless
            log.warning("could not remove the lease on %s (%s)", self.remote.uri, e)


@dataclass
class Ownership:
    """This process's lock on one run dir (and its lease on a URI): a context manager;
    released when every :func:`own` of it in this process is released (or at exit)."""

    path: Path
    file: IO[str]
    holds: int = 1  # own() calls of this process not yet released
    lease: Lease | None = None

    def release(self) -> None:
        self.holds -= 1
        if self.holds == 0:
            _HELD.pop(self.path, None)
            if self.lease is not None:
                self.lease.release()
            self.file.close()  # closing the last descriptor drops the flock

    def __enter__(self) -> Ownership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def own_run(run: Any) -> Ownership:
    """:func:`own` a :class:`search.rundir.RunDir`: its local folder, and its lease when it
    lives on a URI."""
    from search.rundir import storage as st

    return own(run.path, shown=run.location,
               remote=None if run.uri is None else st.parse(run.uri, what="run directory"))


def own(path: Path, *, shown: str | None = None, remote: Any = None) -> Ownership:
    """Take run dir ``path`` for this process, or raise a UserError naming its owner;
    ``shown`` is how the error names the run dir (a URI for a run dir on storage), ``remote``
    the run dir on its URI (a :class:`search.rundir.storage.Remote`: its lease is taken too). Taking
    a run dir this process already owns returns the same ownership, held once more."""
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
        try:
            holder = _holder(json.loads(f.read()))
        except ValueError:  # empty or half-written: its owner has just opened it
            holder = _holder(None)
        f.close()
        raise UserError(f"{shown or path} is in use by {holder}: two commands must not change "
                        "one run dir at once; wait for it to end, or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_me()) + "\n")
    f.flush()
    lease = None
    if remote is not None:
        try:
            lease = take_lease(remote, shown=shown or remote.uri)
        except BaseException:
            f.close()
            raise
    ownership = _HELD[path] = Ownership(path, f, lease=lease)
    _clear_stale_locks(path)
    return ownership


def take_lease(remote: Any, *, shown: str) -> Lease:
    """The lease on run dir ``remote`` (a URI) for this process, or a UserError naming the
    live owner; a stale lease (not renewed for :data:`LEASE_S` s) is taken over."""
    held = _read_lease(remote)
    now = time.time()
    if held is not None:
        age = now - float(held.get("renewed", 0))
        dead_here = held.get("host") == socket.gethostname() and not _alive(held.get("pid"))
        if age < LEASE_S and not dead_here:
            raise UserError(_in_use(shown, held, age))
        why = "its process is gone" if dead_here else \
            f"not renewed for {age:.0f} s (stale after {LEASE_S:.0f} s)"
        print(f"note: {shown}: taking over the lease of {_holder(held)}: {why}",
              file=sys.stderr)
    mine = {**_me(), "token": uuid.uuid4().hex, "renewed": now}
    _write_lease(remote, mine)
    time.sleep(SETTLE_S)
    now_held = _read_lease(remote)
    if now_held is None or now_held.get("token") != mine["token"]:
        raise UserError(_in_use(shown, now_held or {}, 0.0))
    return Lease(remote, mine).start()


def _alive(pid: Any) -> bool:
    """A process of this machine with that PID exists (a lease of this host is checked
    at once, without waiting for it to go stale)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _in_use(shown: str, held: dict[str, Any], age: float) -> str:
    return (f"{shown} is in use by {_holder(held)} (its lease renewed {age:.0f} s "
            "ago): two commands must not change one run dir at once; wait for it to end, or "
            f"stop it (a lease not renewed for {LEASE_S:.0f} s is taken over)")


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["sparse-search", *sys.argv[1:]])}


def _read_lease(remote: Any) -> dict[str, Any] | None:
    try:
        with remote.fs.open_input_stream(f"{remote.path}/{LEASE_FILE}") as f:
            held = json.loads(f.readall())
    except FileNotFoundError:
        return None
    except ValueError:  # half-written by a dying owner: as good as stale
        return {"renewed": 0}
    except OSError as e:
        raise UserError(f"{remote.uri}: cannot reach the storage ({e})") from None
    return held if isinstance(held, dict) else {"renewed": 0}


def _write_lease(remote: Any, lease: dict[str, Any]) -> None:
    with remote.fs.open_output_stream(f"{remote.path}/{LEASE_FILE}") as f:
        f.write(json.dumps(lease).encode())


def _holder(who: Any) -> str:
    """``PID n on HOST (started ..., `command`)`` from an owner's record (the lock file's or
    the lease's, as :func:`_me` wrote it), or what is known."""
    try:
        return (f"PID {who['pid']} on {who['host']} (started {who['started']}: "
                f"`{who['command']}`)")
    except (KeyError, TypeError):
        return "another process (it has not written its name yet)"


def _clear_stale_locks(path: Path) -> None:
    """Optuna's journal lock of a killed owner: a symlink nobody holds now; and the journal's
    last line when a full disk cut it short."""
    journal_lock = path / JOURNAL_LOCK
    if os.path.lexists(journal_lock):
        journal_lock.unlink()
    repair_journal(path / JOURNAL_FILE)


def repair_journal(journal: Path) -> bool:
    """Drop a last line cut short (the disk filled while Optuna appended it): Optuna reads
    every later line past it and then fails on it (JSONDecodeError), so a resume appending
    after it could never read its study again. True when something was dropped."""
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return False
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if keep == data:
        return False
    with journal.open("r+b") as f:
        f.truncate(len(keep))
    print(f"note: {journal}: dropped its last line, cut short ({len(data) - len(keep)} bytes: "
          "the disk filled while it was written)", file=sys.stderr)
    return True
