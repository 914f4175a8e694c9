"""The tracking store: where it is, how to open it safely, and the names it holds.

URI resolution and the reachability check run before any training; :func:`client_for` opens a
store (a local sqlite one created or migrated under :func:`store_lock`); the tag names, the
run dir's ``mlflow.json`` and MLflow's batch limits are shared by every module of the package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.errors import UserError
from search.rundir.layout import ARCH_YAML, LAYERS_JSON

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [  # re-exported by search/tracking/__init__.py
    "DEFAULT_EXPERIMENT", "DEFAULT_OBJECTIVES", "DEFAULT_UI_URL", "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG", "RAY_KEYS", "STATE_FILE", "STORE_LOCK_TIMEOUT_S", "TAG_FAILURE",
    "TAG_FINAL", "TAG_INITIAL", "TAG_MODEL", "TAG_NODE", "TAG_ON_FRONT", "TAG_PARENT", "TAG_RANK", "TAG_ROLE",
    "TAG_RUN_DIR", "TAG_TRIAL_KEY", "TERMINAL", "UI_QUERY", "check_not_half_migrated",
    "check_reachable", "client_for", "ensure_experiment", "failure_reason", "find_parent",
    "flatten", "latest_search", "log_metrics", "log_params", "log_tags", "numeric", "quiet_mlflow",
    "read_state", "resolve_tracking_uri", "run_url", "search_all", "source_tags", "sqlite_path",
    "store_lock", "ui_base", "write_state",
]

DEFAULT_EXPERIMENT = "sparse-search"
DEFAULT_OBJECTIVES: dict[str, str] = {"val_accuracy": "max", "nonzero_params": "min"}
# `sparse-search ui` serves here by default; links in pareto.html point here for a local store.
DEFAULT_UI_URL = "http://127.0.0.1:5000"
# MLflow 3.17's UI opens every experiment in its GenAI view: its sidebar follows the URL's
# `workflowType` (else localStorage, default genai), not the experiment's kind tag (the bundled
# JS reads the tag only behind a feature flag that is off). The tag still marks the experiment
# as classic model training, so the UI never asks to choose a type; links carry the query.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "?workflowType=machine_learning"

STATE_FILE = "mlflow.json"  # in the run dir: tracking URI, experiment and parent run id
TAG_ROLE = "sparse_search.role"  # "search" (parent) | "trial" (child)
TAG_RUN_DIR = "sparse_search.run_dir"
TAG_TRIAL_KEY = "sparse_search.trial_key"
TAG_INITIAL = "sparse_search.initial"  # a trial of search.initial: the entry's label
TAG_FINAL = "sparse_search.final"  # "true" once the final metrics are logged
TAG_NODE = "sparse_search.node_id"  # the Ray node that ran the trial (results.csv: node)
TAG_MODEL = "sparse_search.model_uploaded"
TAG_ON_FRONT = "on_front"
TAG_RANK = "pareto_rank"
TAG_FAILURE = "failure_reason"
TAG_PARENT = "mlflow.parentRunId"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# Bookkeeping keys Ray adds to every result: not metrics worth a chart.
RAY_KEYS = frozenset({
    "timestamp", "pid", "time_this_iter_s", "time_total_s", "time_since_restore",
    "iterations_since_restore", "training_iteration", "done", "trial_id", "date", "hostname",
    "node_ip", "experiment_tag", "checkpoint_dir_name", "should_checkpoint",
})
_BATCH_TAGS = 100  # MLflow's limit on params + tags per log_batch
_BATCH_METRICS = 1000
_PARAM_LEN = 6000  # MLflow's longest param value


def quiet_mlflow() -> None:
    """No URL banners, progress bars, telemetry or git warnings; 2 HTTP retries, not 7.

    MLflow's default retries (backoff 2 s, 7 times) make every call to a dead server hang
    ~2 min; with these a dead server costs ~3 s, once, before the tracker goes offline.
    Environment defaults only (a user's own settings win); MLflow reads them per call.
    """
    for key, value in {
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_PYTHON_REFRESH": "quiet",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }.items():
        os.environ.setdefault(key, value)
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db``.

    The default is MLflow's own local layout: runs in ./mlflow.db, artifacts under ./mlruns.
    """
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    rest = uri.removeprefix("sqlite:///")
    if rest != uri and not rest.startswith(("/", ":memory:")) and sqlite_path(uri) is not None:
        # relative to where the user started: absolute now (the driver runs from its run dir)
        return f"sqlite:///{Path(rest).absolute()}"
    return uri


def check_reachable(uri: str, *, timeout: float = 5.0) -> None:
    """Raise UserError when the tracking store cannot be used (before any training starts)."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=timeout).close()  # any answer will do
        except urllib.error.HTTPError:
            return  # something answers: auth or proxies are MLflow's to report
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(
                f"MLflow tracking server {uri} is not reachable ({reason}): start it with "
                "`sparse-search ui`, or pass another --tracking-uri (or unset "
                "MLFLOW_TRACKING_URI to use ./mlflow.db)"
            ) from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).parent
        if not parent.is_dir():
            raise UserError(f"tracking URI {uri}: folder {parent} does not exist")
        db = sqlite_path(uri)
        if db is not None and db.exists():  # a new store: nothing to check, nothing to create
            check_sqlite_file(db)
            with store_lock(uri):  # not while a search of ours migrates it (a transient copy)
                check_not_half_migrated(db)
        elif not os.access(parent, os.W_OK):
            raise UserError(f"tracking URI {uri}: cannot create the store in {parent} "
                            "(no write permission or a read-only file system)")


def check_sqlite_file(db: Path) -> None:
    """UserError when ``db`` cannot serve as an MLflow store: not an SQLite database (a
    corrupt or foreign file: MLflow would fail only when the search ends), or not writable.
    A store locked by another process is not refused: MLflow waits for it."""
    import sqlite3

    if not os.access(db, os.W_OK) or not os.access(db.parent, os.W_OK):
        raise UserError(f"tracking store {db} is read-only (no write permission on it or its "
                        "folder, or a read-only file system): pass another --tracking-uri")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
            # MLflow's own open waits for it
            print(f"note: tracking store {db} is locked by another process: MLflow waits for "
                  "it (up to 30 s), then goes on or says what is wrong", file=sys.stderr)
            return
        # random bytes read as "file is not a database", "database disk image is
        # malformed", or an OperationalError ("unable to open"): all refused
        raise UserError(f"tracking store {db} is not a usable SQLite database ({e}): move it "
                        f"away (mv {db} {db}.broken) to start a new store there, or pass "
                        "another --tracking-uri") from None


def ui_base(tracking_uri: str) -> str:
    """The MLflow UI serving this store: the server itself, or `sparse-search ui`'s default."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI_URL


def run_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The runs list of an experiment, or one run's page, in the model-training view."""
    tail = f"/{run_id}" if run_id else ""
    return f"{base}/#/experiments/{experiment_id}/runs{tail}{UI_QUERY}"


def client_for(tracking_uri: str) -> MlflowClient:
    """An MlflowClient with its store open; a local sqlite store is created or migrated under
    :func:`store_lock`, and a half-migrated one is a UserError (:func:`check_not_half_migrated`)."""
    quiet_mlflow()
    from mlflow.tracking import MlflowClient

    db = sqlite_path(tracking_uri)
    with store_lock(tracking_uri):
        if db is not None:
            check_not_half_migrated(db)
        client = MlflowClient(tracking_uri)
        # MlflowClient opens the store (creating and migrating a new sqlite file) in __init__
        # today; touching it again is a cached lookup, and keeps the open inside the lock if a
        # later MLflow defers it.
        client._tracking_client.store  # noqa: B018
    return client


# ---------------------------------------------------------------------- local sqlite stores
# MLflow 3.17's SqlAlchemyStore creates and migrates a new database in its constructor with no
# lock (`_all_tables_exist` then `_initialize_tables`: create_all + alembic upgrade; only its
# jobs and workspace stores use `_safe_initialize_tables`' lock). Measured here (2 cores), 4
# processes opening one fresh sqlite:///mlflow.db at the same moment: bare MlflowClient, 24 of
# 32 opens failed in 8 rounds ("duplicate column name: step", "table runs already exists");
# the tracker of a16e413, 9 of 12 starts in 3 rounds; under this lock, 0 of 24 in 6 rounds
# (tests/search/test_tracking_store.py). Alembic's sqlite "batch" migrations (create
# _alembic_tmp_<table>, copy, drop, rename; each DDL statement commits alone) can also die
# half-way and leave the store unopenable. Writes once the store exists are MLflow's: each of
# its sessions sets `PRAGMA busy_timeout = 20000` (20 s of waiting on a locked database).
STORE_LOCK_TIMEOUT_S = 300.0  # a fresh store migrates in ~2-10 s on a loaded 2-core machine
_STORE_GUARD = threading.RLock()  # threads of one process queue here before the file lock
_STORE_HELD: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth) held by this process


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).absolute()


@contextlib.contextmanager
def store_lock(uri: str, *, timeout: float = STORE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``<db file>.lock`` for a local sqlite store; no-op for others.

    Serializes what must not run twice at once across processes: creating and migrating the
    store (opening it), and looking up / creating an experiment. Re-entrant within a process.
    A folder where the lock file cannot be created (read-only) is used unlocked.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    path = db.with_name(db.name + ".lock")
    with _STORE_GUARD:
        fd, depth = _STORE_HELD.get(path, (-1, 0))
        if depth == 0:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                yield
                return
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise UserError(
                            f"another process has held {path} for over {timeout:.0f} s (it "
                            f"creates or migrates {db}): is it stuck? (`fuser {path}` names it)"
                        ) from None
                    time.sleep(0.05)
        _STORE_HELD[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _STORE_HELD.pop(path)
            if depth > 1:
                _STORE_HELD[path] = (fd, depth - 1)
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def check_not_half_migrated(db: Path) -> None:
    """UserError naming the ``_alembic_tmp_*`` tables an interrupted migration left in ``db``.

    Alembic migrates a sqlite table by copying it into ``_alembic_tmp_<table>`` and renaming
    the copy; a migration killed (or raced) in between leaves the copy, and every later open
    then fails with "table _alembic_tmp_<table> already exists". The message gives the repair.
    """
    if not db.is_file():
        return
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return  # not ours to diagnose: MLflow's open will say what is wrong
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        left = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
        if not left:
            return

        def rows(table: str) -> int:
            return con.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]

        steps = []
        for tmp in left:
            table = tmp.removeprefix("_alembic_tmp_")
            if table in tables and rows(table) >= rows(tmp):
                steps.append(f"DROP TABLE {tmp};")  # the original is intact: drop the copy
            elif table in tables:
                steps.append(f"DROP TABLE {table}; ALTER TABLE {tmp} RENAME TO {table};")
            else:  # the original was dropped before the copy was renamed
                steps.append(f"ALTER TABLE {tmp} RENAME TO {table};")
    except sqlite3.Error:
        return
    finally:
        con.close()
    raise UserError(
        f"tracking store {db} is half-migrated: an interrupted schema migration left "
        f"{', '.join(left)} (two processes created the store at once, with a sparse-search "
        f"older than its store lock, or one was killed while migrating). Repair: stop every "
        f"process using it, back it up (cp {db} {db}.bak), then run "
        f"`sqlite3 {db} \"{' '.join(steps)}\"` and `mlflow db upgrade sqlite:///{db}`; "
        "or, if its history is not worth keeping, move it away and start again"
    )


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """A new experiment's artifact folder on a local sqlite store: ``mlruns/<name>`` beside the
    database (MLflow's default, ``./mlruns`` of the cwd when the store opens, follows a driver
    that runs from its run dir or a job's vanishing working_dir). None: the store decides."""
    if (db := sqlite_path(tracking_uri)) is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-") or "experiment"
    return str(db.resolve().parent / "mlruns" / slug)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (or restored from deletion) as a classic one.

    On a local sqlite store the look-up and creation run under :func:`store_lock`; against a
    server, a process that loses the race to create it ("already exists") looks it up again.
    """
    from mlflow.exceptions import MlflowException

    with store_lock(client.tracking_uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                                                artifact_location=artifact_location(
                                                    client.tracking_uri, name))
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    """Every run matching ``filter_string`` (all pages)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_trial_files(client: MlflowClient, run_id: str, *, error: str | None, arch: Any,
                    layers: Any) -> None:
    """A finished trial's text artifacts: error.txt, arch.yaml, layers.json (or layers.txt)."""
    if error:
        client.log_text(run_id, error, "error.txt")
    if arch is not None:
        client.log_text(run_id, arch.to_yaml(), ARCH_YAML)
    if layers is not None:
        if isinstance(layers, str):
            client.log_text(run_id, layers, "layers.txt")
        else:
            client.log_text(run_id, json.dumps(layers, indent=1, default=str), LAYERS_JSON)


def find_parent(client: MlflowClient, *, run_dir: Path, tracking_uri: str,
                experiment_id: str, location: str | None = None) -> Run | None:
    """The active parent run of the search in ``run_dir``: the one its mlflow.json names (when
    it names this store), else the one tagged with this run dir in ``experiment_id`` (its
    ``location``, a storage URI, for a run dir that lives on one; the local path before)."""
    state = read_state(run_dir)
    if state.get("parent_run_id") and state.get("tracking_uri") == tracking_uri:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(state["parent_run_id"])
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            return run
    for run in search_all(client, [experiment_id], f"tags.`{TAG_ROLE}` = 'search'"):
        if run.data.tags.get(TAG_RUN_DIR) in {str(run_dir), location}:
            return run
    return None


def latest_search(client: MlflowClient, experiment: str | None) -> Run:
    """The most recent parent run, in ``experiment`` or (None) in any experiment."""
    if experiment is None:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise UserError(f"--experiment {experiment!r} does not exist (experiments: {names})")
        exp_ids = [exp.experiment_id]
    runs = client.search_runs(exp_ids, f"tags.`{TAG_ROLE}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp_ids else []
    if not runs:
        where = f"experiment {experiment!r}" if experiment else "the tracking store"
        raise UserError(f"no sparse-search search found in {where}")
    return runs[0]


def write_state(run_dir: Path, state: Mapping[str, Any]) -> None:
    """Write the run dir's mlflow.json atomically (a kill never leaves half a file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(run_dir / STATE_FILE)


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """The run dir's mlflow.json (empty when missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``a/b/c`` keys (lists stay values), as Ray Tune flattens configs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The real-number entries of a result (bools, strings, dicts and Ray bookkeeping dropped)."""
    out = {}
    for k, v in metrics.items():
        if k in RAY_KEYS or isinstance(v, bool):
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def failure_reason(error: str) -> str:
    """One line for a tag: the last line of a traceback is the exception and its message."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else "unknown error"
    return reason[:500]



def source_tags() -> dict[str, str]:
    """The parent run's code tags: package versions, and the git commit of this source tree."""
    return {**_versions(), **_git_tags()}


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "ray", "optuna", "mlflow", "sparse-search"):
        try:
            out[f"sparse_search.version.{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[f"sparse_search.version.{dist}"] = "not installed"
    return out


def _git_tags() -> dict[str, str]:
    """The commit of the sparse-search source tree, when it is a git checkout."""
    src = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": sha, "sparse_search.git_dirty": str(bool(dirty.strip())).lower()}


# ---------------------------------------------------------------------- batched writes
def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Params in batches of MLflow's limit; keys and values cut to MLflow's longest."""
    from mlflow.entities import Param

    items = [Param(k[:250], str(v)[:_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), _BATCH_TAGS):
        client.log_batch(run_id, params=items[i:i + _BATCH_TAGS])


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                tags: Mapping[str, str] | None = None) -> None:
    """Metrics at ``step`` in batches of MLflow's limit; ``tags`` ride with the first batch."""
    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, int(step)) for k, v in metrics.items()]
    run_tags = [RunTag(k, v) for k, v in (tags or {}).items()]
    for i in range(0, max(len(items), 1), _BATCH_METRICS):
        client.log_batch(run_id, metrics=items[i:i + _BATCH_METRICS],
                         tags=run_tags if i == 0 else [])
