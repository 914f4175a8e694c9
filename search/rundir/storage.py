"""Where a run directory lives: a local folder, or any URI Ray Tune's storage takes.

``--storage`` (and every command given a run directory) takes a path, ``file://PATH`` (the same
as the path), or a URI pyarrow.fs resolves, as Ray Tune does with ``storage_path``:
``s3://BUCKET/PREFIX``, ``gs://BUCKET/PREFIX``, with options as a query string, e.g.
``s3://BUCKET/runs?endpoint_override=http://127.0.0.1:9000&region=us-east-1`` (an S3-protocol
server that is not AWS). Credentials come from the usual environment of that filesystem
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...).

A run dir on a URI is split in two:

- Ray Tune gets the URI itself (``storage_path``): its experiment state and every trial
  checkpoint go there directly, from whichever node writes them.
- Everything else (spec.yaml, the CSVs, trials/<key>/, the Optuna journal, mlflow.json,
  outcome.json, final/) is worked on in a local copy, the *cache* (``$SPARSE_SEARCH_RUNS_CACHE``,
  else ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/sparse-search/runs/<hash of the URI>/<run name>``),
  which a :class:`Mirror` copies to the URI: after every file the run dir writes
  (:func:`search.rundir.write_atomic` calls :func:`written`), before every snapshot Ray Tune takes of the experiment
  (:class:`search.rundir.storage_tune.PushBeforeSnapshot`), every few seconds and at the end. Ray's
  snapshot is uploaded after its ``save_to_dir``, so the URI never holds a snapshot newer than
  the journal and results it goes with: a resume from the URI alone (a fresh cache, another
  machine) finds every trial Ray thinks finished recorded.

Commands given a URI (``resume``, ``sync``, ``finalize``, ``train``, ``export``, ``pareto``)
download it into a fresh cache copy first (Ray's folder stays remote).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from search.errors import UserError, describe_os_error

log = logging.getLogger("sparse_search.storage")

CACHE_ENV = "SPARSE_SEARCH_RUNS_CACHE"
LOCK_FILE = ".mirror.lock"  # in a local copy while a command mirrors it (flock; never pushed)
REMOTE_ONLY = ("ray",)  # Ray Tune's experiment folder (rundir.EXPERIMENT_NAME): never copied
PUSH_INTERVAL_S = 5.0  # files written outside write_atomic (the journal, model.pt) reach the
# URI at least this often; a snapshot of Ray's always pushes first
_IO_THREADS = 8  # parallel object transfers (an object store answers each in ~10-100 ms)


@dataclass(frozen=True)
class Remote:
    """A folder on a pyarrow filesystem: ``uri`` as shown to users (query string kept),
    ``path`` on ``fs`` (``bucket/prefix`` for s3/gs)."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem
    path: str

    def child(self, *parts: str) -> Remote:
        base, sep, query = self.uri.partition("?")
        tail = "/".join(p.strip("/") for p in parts)
        return Remote(f"{base.rstrip('/')}/{tail}{sep}{query}", self.fs,
                      f"{self.path.rstrip('/')}/{tail}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def exists(self, rel: str = "") -> bool:
        from pyarrow.fs import FileType

        target = f"{self.path}/{rel}" if rel else self.path
        try:
            return self.fs.get_file_info(target).type != FileType.NotFound
        except OSError as e:
            raise UserError(f"{self.uri}: cannot reach the storage ({_first_line(e)})") from None


def is_uri(arg: str | Path) -> bool:
    """``arg`` names a remote location (``scheme://``, not ``file://``)."""
    s = str(arg)
    return "://" in s and urlsplit(s).scheme.lower() != "file"


def parse(arg: str | Path, *, what: str = "--storage") -> Path | Remote:
    """A local path (absolute) or a :class:`Remote`; a UserError (exit 2) names a malformed
    URI. Nothing is contacted here: :func:`check_reachable` does that."""
    s = str(arg)
    if "://" not in s:
        return Path(s).expanduser().resolve()
    parts = urlsplit(s)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise UserError(f"{what} {s}: a file:// URI names a local path (file:///abs/path)")
        return Path(unquote(parts.path)).expanduser().resolve()
    try:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(s)
    except Exception as e:  # ArrowInvalid, NotImplementedError, OSError (a missing driver)
        raise UserError(f"{what} {s}: not a storage URI ({_first_line(e)}); expected a path, "
                        "file://PATH, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX") from None
    path = path.strip("/")
    if not path:
        raise UserError(f"{what} {s}: no bucket named (s3://BUCKET/PREFIX)")
    return Remote(s.rstrip("/") if "?" not in s else s, fs, path)


def check_reachable(where: Path | Remote, *, what: str = "--storage") -> None:
    """The bucket (s3/gs: the URI's first component) exists and answers, or a local folder
    takes a file; a UserError (exit 2) otherwise. Leaves nothing behind."""
    if isinstance(where, Path):
        check_writable(where, what=what)
        return
    from pyarrow.fs import FileType

    bucket = where.path.split("/", 1)[0]
    try:
        info = where.fs.get_file_info(bucket)
    except OSError as e:
        raise UserError(f"{what} {where.uri}: cannot reach the storage ({_first_line(e)})") from None
    if info.type != FileType.Directory:
        raise UserError(f"{what} {where.uri}: bucket {bucket!r} does not exist or cannot be "
                        "listed with these credentials (create it first)")


PROBE_BYTES = 64 * 1024  # a run dir's first files (spec, journal, tables) are about this size


def check_writable(folder: Path, *, what: str = "--storage") -> None:
    """``folder`` (or the nearest existing folder above it, where it would be made) takes a
    file of :data:`PROBE_BYTES`: a read-only mount, a folder without write permission or a
    full disk is a UserError naming the path and the cause, before anything is created (the
    probe file is removed)."""
    import tempfile

    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".sparse-search-probe-") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{what} {folder}: cannot write in {existing} "
                        f"({describe_os_error(e, path=False)})") from None


def cache_dir(remote: Remote) -> Path:
    """The local copy of run dir ``remote``; its name is the run's (MLflow names the search
    after it)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser().absolute()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sparse-search" / "runs"
    digest = hashlib.sha256(remote.uri.encode()).hexdigest()[:16]
    return root.absolute() / digest / remote.name


def download(remote: Remote, local: Path) -> int:
    """Replace ``local`` with the files of ``remote`` (Ray's folder left out); returns how many.
    The URI is the truth: a stale local copy (another driver's, killed) is dropped first."""
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = remote.fs.get_file_info(FileSelector(remote.path, recursive=True))
    except FileNotFoundError:
        raise UserError(f"{remote.uri}: no such run directory") from None
    except OSError as e:
        raise UserError(f"{remote.uri}: cannot reach the storage ({_first_line(e)})") from None
    prefix = remote.path.rstrip("/") + "/"
    files = [i.path[len(prefix):] for i in infos
             if i.type == FileType.File and i.path.startswith(prefix)]
    files = [f for f in files if f.split("/", 1)[0] not in REMOTE_ONLY and f.split("/")[-1] != ""]
    if local.exists():
        _check_unused(local, remote)
        shutil.rmtree(local)
    local.mkdir(parents=True)

    def get(rel: str) -> None:
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with remote.fs.open_input_stream(f"{prefix}{rel}") as f:
            dest.write_bytes(f.readall())

    _each(get, files)
    return len(files)


def _check_unused(local: Path, remote: Remote) -> None:
    """A UserError when another process mirrors this local copy (a search running here)."""
    import fcntl

    lock = local / LOCK_FILE
    if not lock.exists():
        return
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{remote.uri}: a sparse-search on this machine is working in it "
                            f"(local copy {local}); wait for it to end, or set ${CACHE_ENV} "
                            "to another folder") from None
        fcntl.flock(f, fcntl.LOCK_UN)


def _each(fn: Any, items: Iterable[str]) -> None:
    items = list(items)
    if len(items) <= 1:
        for i in items:
            fn(i)
        return
    with ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="sparse-search-io") as pool:
        for f in [pool.submit(fn, i) for i in items]:
            f.result()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------- the mirror
class Mirror:
    """Copies a local run dir to its URI: only what changed since the last push (size, mtime),
    models and arch files before a trial's result.json, the tables last."""

    def __init__(self, local: Path, remote: Remote, *, interval_s: float = PUSH_INTERVAL_S) -> None:
        self.local, self.remote, self.interval_s = local, remote, interval_s
        self.error: str | None = None  # the last push that failed (None once one succeeds)
        self._sent: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_file: Any = None

    def _changed(self) -> list[tuple[str, tuple[int, int]]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.local):
            rel_dir = os.path.relpath(dirpath, self.local)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d not in REMOTE_ONLY]
            for name in filenames:
                if name.startswith(".") or name.endswith((".tmp", ".lock")):
                    continue  # write_atomic's siblings, Optuna's journal lock: transient
                rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                if self._sent.get(rel) != sig:
                    out.append((rel, sig))
        # A trial's model and arch before its result.json, which a resume trusts; the run's
        # own files (tables, journal, outcome) last.
        return sorted(out, key=lambda x: ("/" not in x[0], x[0].endswith(".json"), x[0]))

    def seen(self) -> None:
        """Everything local is on the URI already (just downloaded)."""
        with self._lock:
            self._sent = dict(self._changed())

    def push(self) -> int:
        """Upload what changed; raises OSError when the storage fails. Returns files sent."""
        with self._lock:
            changed = self._changed()
            if not changed:
                return 0
            # Items that must go in order (result.json after its model): the files of a trial
            # folder in parallel, then the top-level ones, in order.
            nested = [c for c in changed if "/" in c[0]]
            top = [c for c in changed if "/" not in c[0]]
            sigs = dict(changed)
            gone: set[str] = set()  # removed since the walk: nothing to send
            put = functools.partial(self._put, gone=gone)
            _each(put, [r for r, _ in nested if not r.endswith("/result.json")])
            _each(put, [r for r, _ in nested if r.endswith("/result.json")])
            for rel, _ in top:
                put(rel)
            self._sent.update({r: sig for r, sig in sigs.items() if r not in gone})
            self.error = None
            return len(changed)

    def _put(self, rel: str, gone: set[str]) -> None:
        try:
            data = (self.local / rel).read_bytes()
        except FileNotFoundError:
            gone.add(rel)
            return
        with self.remote.fs.open_output_stream(f"{self.remote.path}/{rel}") as f:
            f.write(data)

    def push_quietly(self) -> None:
        """Push; a failure is logged (once per kind) and retried at the next push."""
        try:
            self.push()
        except OSError as e:
            msg = _first_line(e)
            if msg != self.error:
                log.warning("could not copy the run dir to %s (%s); retrying", self.remote.uri, msg)
            self.error = msg

    def start(self) -> Mirror:
        import fcntl

        self._lock_file = (self.local / LOCK_FILE).open("a")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # see _check_unused
        _MIRRORS[self.local] = self
        self._thread = threading.Thread(target=self._loop, name="sparse-search-mirror",
                                        daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push_quietly()

    def close(self) -> str | None:
        """Stop, push the rest; the error (a line) when the URI did not get everything."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _MIRRORS.pop(self.local, None)
        try:
            self.push()
        except OSError as e:
            return (f"could not copy the run dir to {self.remote.uri} ({_first_line(e)}); "
                    f"everything is in {self.local}")
        finally:
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None
        return None


_MIRRORS: dict[Path, Mirror] = {}  # local run dir -> its mirror, while a command works in it


def written(path: Path) -> None:
    """``path`` was just replaced (search.rundir.write_atomic): push its run dir's mirror."""
    for root, mirror in list(_MIRRORS.items()):
        if path.is_relative_to(root):
            mirror.push_quietly()


def push_now(local: Path) -> None:
    """Push the mirror of run dir ``local`` if it has one (before Ray snapshots)."""
    mirror = _MIRRORS.get(Path(local))
    if mirror is not None:
        mirror.push_quietly()


def attach(run: Any) -> Mirror | None:
    """Start mirroring ``run`` (a :class:`search.rundir.RunDir`) to its URI; None for a local
    run dir. What is local now counts as sent (a fresh run dir, or just downloaded)."""
    if run.uri is None:
        return None
    remote = parse(run.uri, what="run directory")
    assert isinstance(remote, Remote)
    mirror = Mirror(run.path, remote)
    mirror.seen()
    return mirror.start()


def read_file(run_dir: str | Path, rel: str, *, what: str = "run directory") -> bytes:
    """One file of a run dir, local or on a URI, without copying the rest; a UserError (exit
    2) names what is missing."""
    where = parse(run_dir, what=what)
    if isinstance(where, Path):
        path = where / rel
        if not path.is_file():
            raise UserError(f"{path} is missing" if where.is_dir() else
                            f"{run_dir}: no such run directory")
        return path.read_bytes()
    check_reachable(where, what=what)
    if not where.exists(rel):
        raise UserError(f"{where.uri}: {rel} is missing" if where.exists() else
                        f"{where.uri}: no such run directory")
    try:
        with where.fs.open_input_stream(f"{where.path}/{rel}") as f:
            return f.readall()
    except OSError as e:
        raise UserError(f"{where.uri}: cannot read {rel} ({_first_line(e)})") from None
