"""MLflow tracking of a search: one parent run per search, one nested child run per trial.

How the tuner drives it (every call is cheap and never raises once started: a tracking failure
warns once, turns the tracker offline and the search goes on; ``sparse-search sync RUN_DIR``
uploads what MLflow missed from the run directory later)::

    check_reachable(uri)                      # before any training: a dead server is a UserError
    tracker = SearchTracker(uri, experiment, run_dir=..., spec_dict=..., spec_yaml_text=...,
                            search_name=..., objectives=spec.objectives,
                            max_params_ref=spec.constraints.max_params)
    tracker.start(resume=resuming)            # creates or re-attaches to the parent run
    RunConfig(callbacks=[..., TrackingCallback(tracker)])   # after the callback writing trials/
    ... after each finished trial: tracker.update_front(df_all, front_keys, step, counters)
    tracker.finish("FINISHED")                # also run on exit: children left RUNNING -> KILLED

What lands where:
- parent run (tag ``sparse_search.role=search``): spec.yaml, spec_resolved.yaml, flat spec params,
  version/git tags; metrics ``hypervolume``, ``front_size`` and the counters stepped by trials
  finished; artifacts ``pareto.csv``, ``pareto.png``, ``pareto.html`` (refreshed at most every
  ``front_interval_s`` seconds, and at the end).
- child run per trial (named by ``ArchConfig.canonical()``, tag ``sparse_search.trial_key``):
  flat config as params, per-epoch metrics (one ``log_batch`` per report), final metrics,
  ``arch.yaml`` and ``layers.json``; tags ``pareto_rank``/``on_front`` kept current and
  ``failure_reason`` for failed or killed trials.
- model weights (``model.pt``) are uploaded for Pareto-front members only, at each front
  refresh: a search trains hundreds of models and only the front is worth exporting; every
  trial's weights stay in ``run_dir/trials/<key>/model.pt``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import html
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
import yaml

from search.errors import UserError
from search.pareto import hypervolume_2d, pareto_ranks

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from trainables.arch import ArchConfig

log = logging.getLogger("sparse_search.tracking")

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
_LIVE: dict[str, SearchTracker] = {}  # run dir -> the started tracker of this process

T = TypeVar("T")


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
    if cli_value:
        return cli_value
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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
            with store_lock(uri):  # not while a search of ours migrates it (a transient copy)
                check_not_half_migrated(db)


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
                return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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
    src = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": sha, "sparse_search.git_dirty": str(bool(dirty.strip())).lower()}


def _tracked(method: Callable[..., T]) -> Callable[..., T | None]:
    """Run a tracker call unless offline; a failure turns the tracker offline (strict: raise)."""

    @functools.wraps(method)
    def wrapper(self: SearchTracker, *args: Any, **kwargs: Any) -> T | None:
        if self.offline or self.client is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            if self.strict:
                raise
            self._go_offline(method.__name__.lstrip("_"), e)
            return None

    return wrapper


class SearchTracker:
    """Records one search in MLflow; see the module docstring for the calls and what they log.

    ``objectives`` maps metric -> "max"/"min" (the spec's objectives) for the Pareto ranks;
    ``max_params_ref`` is the hypervolume's parameter reference (the budget; None: 1e7).
    ``strict`` makes tracking errors raise instead of turning the tracker offline (sync).

    ``failure`` is None while tracking works; after the first failed MLflow call (the store
    could not be opened or migrated at ``start``, the server went away...) it is one line,
    "MLflow tracking at <uri> failed in <call> (<error>)", and the tracker is ``offline``. The
    search goes on; its driver reads ``failure`` at the end to print ``error: ...`` and exit
    non-zero, since the MLflow record of the search is incomplete until ``sparse-search sync``.
    The failure is also printed to stderr at once, one line, whether logging is set up or not.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_dir: str | Path,
        spec_dict: Mapping[str, Any],
        spec_yaml_text: str,
        search_name: str,
        objectives: Mapping[str, str] | None = None,
        max_params_ref: float | None = None,
        front_interval_s: float = 30.0,
        ui_url: str | None = None,
        strict: bool = False,
    ) -> None:
        if front_interval_s < 0:
            raise ValueError(f"{front_interval_s=} must be >= 0")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_dir = Path(run_dir).resolve()
        self.spec_dict = dict(spec_dict)
        self.spec_yaml_text = spec_yaml_text
        self.search_name = search_name
        self.objectives = dict(objectives or DEFAULT_OBJECTIVES)
        self.max_params_ref = max_params_ref
        self.front_interval_s = front_interval_s
        self.ui_url = (ui_url or ui_base(tracking_uri)).rstrip("/")
        self.strict = strict
        self.client: MlflowClient | None = None
        self.offline = False
        self.failure: str | None = None  # why tracking stopped (see the class docstring)
        self.finished = False
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.parent_status_at_start: str | None = None  # the parent's status when re-attached
        self._children: dict[str, str] = {}  # trial key -> child run id
        self._status: dict[str, str] = {}  # trial key -> child run status as last set
        self._final: set[str] = set()  # children whose final metrics are logged
        self._names: dict[str, str] = {}  # trial key -> arch.canonical()
        self._archs: dict[str, ArchConfig] = {}
        self._front_tags: dict[str, tuple[str, str]] = {}  # trial key -> (rank, on_front) sent
        self._models: dict[str, Path] = {}  # trial key -> model.pt given at trial_finished
        self._uploaded: set[str] = set()  # trial keys whose model.pt is a child artifact
        self._pending: tuple[pd.DataFrame, set[str]] | None = None
        self._last_push = -math.inf

    # ------------------------------------------------------------------ lifecycle
    def init_args(self) -> dict[str, Any]:
        """Constructor arguments: what a pickled TrackingCallback carries instead of a client."""
        return {
            "tracking_uri": self.tracking_uri, "experiment": self.experiment,
            "run_dir": str(self.run_dir), "spec_dict": self.spec_dict,
            "spec_yaml_text": self.spec_yaml_text, "search_name": self.search_name,
            "objectives": self.objectives, "max_params_ref": self.max_params_ref,
            "front_interval_s": self.front_interval_s, "ui_url": self.ui_url,
        }

    def start(self, *, resume: bool = False) -> SearchTracker:
        """Create the parent run, or on ``resume`` re-attach to this run dir's parent.

        A store that cannot be opened leaves the tracker offline with ``failure`` set (strict:
        raises)."""
        try:
            self.client = client_for(self.tracking_uri)
        except Exception as e:
            if self.strict:
                raise
            self._go_offline("start", e)
        else:
            self._start(resume)
        if self.parent_run_id is None and not (self.run_dir / STATE_FILE).exists():
            # Never reached MLflow: the state file still tells `sync` which store and
            # experiment this search meant (a resume's file, with its parent, is left alone).
            with contextlib.suppress(OSError):
                self._write_state()
        if self.parent_run_id is not None:
            _LIVE[str(self.run_dir)] = self
            atexit.register(self._at_exit)
        return self

    @_tracked
    def _start(self, resume: bool) -> None:
        client = self.client
        self.experiment_id = ensure_experiment(client, self.experiment)
        parent = self._find_parent() if resume else None
        if parent is not None:
            self.parent_run_id = parent.info.run_id
            self.parent_status_at_start = parent.info.status
            if parent.info.status != "RUNNING":
                client.update_run(self.parent_run_id, status="RUNNING")
            self._load_children()
        else:
            self._create_parent()
        self._write_state()

    def _find_parent(self) -> Run | None:
        state = read_state(self.run_dir)
        if state.get("parent_run_id") and state.get("tracking_uri") == self.tracking_uri:
            from mlflow.exceptions import MlflowException

            try:
                run = self.client.get_run(state["parent_run_id"])
            except MlflowException:
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                self.experiment_id = run.info.experiment_id
                return run
        for run in search_all(self.client, [self.experiment_id], f"tags.`{TAG_ROLE}` = 'search'"):
            if run.data.tags.get(TAG_RUN_DIR) == str(self.run_dir):
                return run
        return None

    def _create_parent(self) -> None:
        tags = {
            TAG_ROLE: "search",
            TAG_RUN_DIR: str(self.run_dir),
            "sparse_search.search_name": self.search_name,
            "sparse_search.spec_name": str(self.spec_dict.get("name", self.search_name)),
            "mlflow.source.name": "sparse-search",
            "mlflow.source.type": "LOCAL",
            "mlflow.note.content": (
                f"sparse-search `{self.search_name}` (run dir `{self.run_dir}`): one child run per "
                "trial; the Pareto front is tagged `on_front=true` and drawn in the artifacts "
                "pareto.html / pareto.png / pareto.csv."
            ),
            **_versions(),
            **_git_tags(),
        }
        run = self.client.create_run(self.experiment_id, run_name=self.search_name, tags=tags)
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, flatten(self.spec_dict))
        self.client.log_text(self.parent_run_id, self.spec_yaml_text, "spec.yaml")
        resolved = json.loads(json.dumps(self.spec_dict, default=str))  # tuples, paths -> plain
        self.client.log_text(self.parent_run_id, yaml.safe_dump(resolved, sort_keys=False),
                             "spec_resolved.yaml")

    def _load_children(self) -> None:
        runs = search_all(self.client, [self.experiment_id],
                          f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'")
        for run in runs:
            tags = run.data.tags
            key = tags.get(TAG_TRIAL_KEY)
            if key is None:
                continue
            self._children[key] = run.info.run_id
            self._status[key] = run.info.status
            self._names[key] = run.info.run_name
            if tags.get(TAG_FINAL) == "true":
                self._final.add(key)
            if tags.get(TAG_MODEL) == "true":
                self._uploaded.add(key)
            if TAG_RANK in tags:
                self._front_tags[key] = (tags[TAG_RANK], tags.get(TAG_ON_FRONT, "false"))

    def _write_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "tracking_uri": self.tracking_uri, "experiment": self.experiment,
            "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
            "search_name": self.search_name, "objectives": self.objectives,
            "max_params_ref": self.max_params_ref, "ui_url": self.ui_url,
        }
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.run_dir / STATE_FILE)  # atomic: a kill never leaves half a file

    def _go_offline(self, where: str, error: Exception) -> None:
        self.offline = True
        if self.failure is not None:
            return
        text = " ".join(str(error).split())  # one line: SQL errors span several
        if len(text) > 300:
            text = text[:297] + "..."
        self.failure = f"MLflow tracking at {self.tracking_uri} failed in {where} " \
                       f"({type(error).__name__}: {text})"
        message = (f"{self.failure}; tracking is off for the rest of this search. Results stay "
                   f"in {self.run_dir}: upload them later with `sparse-search sync {self.run_dir}`")
        # The CLI configures no logging: the line goes to stderr itself. A configured logger
        # gets the record too (without handlers, logging's last resort would print it twice).
        print(f"warning: {message}", file=sys.stderr, flush=True)
        if log.hasHandlers():
            log.warning(message)

    def _at_exit(self) -> None:
        if not self.finished:
            self.finish("KILLED", reason="the search process exited before the search finished")

    @property
    def runs_url(self) -> str | None:
        """The experiment's runs list in the MLflow UI (None before start)."""
        return run_url(self.ui_url, self.experiment_id) if self.experiment_id else None

    # ------------------------------------------------------------------ trials
    @_tracked
    def trial_started(self, trial_key: str, arch: ArchConfig, flat_config: Mapping[str, Any],
                      *, initial: str | None = None) -> str:
        """A child run for the trial (an existing one with this key is reused); its run id.
        ``initial``: the label of the search.initial entry it trains (a tag)."""
        run_id = self._ensure_child(trial_key, arch, flat_config, initial)
        if self._status.get(trial_key) != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
            self._status[trial_key] = "RUNNING"
            self._final.discard(trial_key)
        return run_id

    def _ensure_child(self, trial_key: str, arch: ArchConfig, flat_config: Mapping[str, Any],
                      initial: str | None = None) -> str:
        self._archs[trial_key] = arch
        if trial_key in self._children:
            return self._children[trial_key]
        name = arch.canonical()
        tags = {
            TAG_PARENT: self.parent_run_id, TAG_ROLE: "trial", TAG_TRIAL_KEY: trial_key,
            "sparse_search.arch_key": arch.key(), "mlflow.source.name": "sparse-search",
        }
        if initial is not None:
            tags[TAG_INITIAL] = initial
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self._children[trial_key] = run_id
        self._status[trial_key] = "RUNNING"
        self._names[trial_key] = name
        self._log_params(run_id, flat_config)
        return run_id

    @_tracked
    def trial_result(self, trial_key: str, metrics: Mapping[str, Any], step: int) -> None:
        """One report (an epoch) of a trial: its numeric metrics in one log_batch."""
        run_id = self._children.get(trial_key)
        if run_id is not None:
            self._log_metrics(run_id, numeric(metrics), step)

    def trial_finished(
        self,
        trial_key: str,
        final_metrics: Mapping[str, Any],
        *,
        status: str = "FINISHED",
        error: str | None = None,
        layers: Any = None,
        model_path: str | Path | None = None,
        arch: ArchConfig | None = None,
    ) -> None:
        """Final metrics, arch.yaml, layers.json, the failure reason, and the run's end status.

        ``model_path`` is remembered and uploaded if the trial reaches the Pareto front.
        """
        if status not in TERMINAL:
            raise ValueError(f"{status=} must be one of {', '.join(TERMINAL)}")
        self._trial_finished(trial_key, final_metrics, status, error, layers, model_path, arch)

    @_tracked
    def _trial_finished(self, trial_key: str, final_metrics: Mapping[str, Any], status: str,
                        error: str | None, layers: Any, model_path: str | Path | None,
                        arch: ArchConfig | None) -> None:
        run_id = self._children.get(trial_key)
        if run_id is None:
            return
        tags = {TAG_FINAL: "true"}
        if error:
            tags[TAG_FAILURE] = failure_reason(error)
        metrics = numeric(final_metrics)
        step = int(metrics.get("epoch", 0))
        self._log_metrics(run_id, metrics, step, tags=tags)
        if error and len(error) > len(tags[TAG_FAILURE]):
            self.client.log_text(run_id, error, "error.txt")
        arch = arch or self._archs.get(trial_key)
        if arch is not None:
            self.client.log_text(run_id, arch.to_yaml(), "arch.yaml")
        if layers is not None:
            if isinstance(layers, str):
                self.client.log_text(run_id, layers, "layers.txt")
            else:
                self.client.log_text(run_id, json.dumps(layers, indent=1, default=str), "layers.json")
        if model_path is not None:
            self._models[trial_key] = Path(model_path)
        self.client.set_terminated(run_id, status)
        self._status[trial_key] = status
        self._final.add(trial_key)

    # ------------------------------------------------------------------ Pareto front
    def update_front(
        self,
        df_all: pd.DataFrame,
        front_keys: Iterable[str] | None = None,
        step: int | None = None,
        counters: Mapping[str, float] | None = None,
        *,
        final: bool = False,
        log_metrics: bool = True,
    ) -> None:
        """Parent metrics now; ranks/on_front tags, front models and plots when due (throttled).

        ``df_all``: one row per trial with ``trial_key`` and the objective columns (rows
        without finite objective values, e.g. failed trials, are not ranked); ``arch`` (a
        canonical string) and ``macs``/``test_accuracy`` columns are shown when present.
        ``front_keys``: the tuner's front (default: the rank-0 trials). ``step``: trials
        finished (default ``counters["trials_finished"]``, else the number of ranked trials);
        ``counters`` are logged as parent metrics at that step: trials_finished (trials that
        ended, failed ones included), trials_failed, proposals_rejected (over budget, never
        trained). ``final`` pushes the plots now.
        """
        self._update_front(df_all, front_keys, step, dict(counters or {}), final, log_metrics)

    @_tracked
    def _update_front(self, df_all: pd.DataFrame, front_keys: Iterable[str] | None,
                      step: int | None, counters: dict[str, float], final: bool,
                      log_metrics: bool) -> None:
        ranked = self.rank(df_all)
        front = set(map(str, front_keys)) if front_keys is not None else set(
            ranked.loc[ranked["pareto_rank"] == 0, "trial_key"])
        self._pending = (ranked, front)
        if log_metrics:
            self._log_front_metrics(ranked, front, step, counters)
        if final or time.monotonic() - self._last_push >= self.front_interval_s:
            self.push_front()

    def rank(self, df_all: pd.DataFrame) -> pd.DataFrame:
        """Rows with finite objectives, with a ``pareto_rank`` column (0 = front)."""
        cols = list(self.objectives)
        missing = [c for c in ["trial_key", *cols] if c not in df_all.columns]
        if missing:
            raise ValueError(f"df_all lacks columns {missing}: has {list(df_all.columns)}")
        df = df_all.copy()
        for c in cols:
            df[c] = pd.to_numeric(df[c], errors="coerce")
        df = df[df[cols].notna().all(axis=1)].reset_index(drop=True)
        df["trial_key"] = df["trial_key"].astype(str)
        points = df[cols].to_numpy(dtype=float).tolist()
        df["pareto_rank"] = pareto_ranks(points, [self.objectives[c] for c in cols]) if points else []
        return df

    def _log_front_metrics(self, ranked: pd.DataFrame, front: set[str], step: int | None,
                           counters: dict[str, float]) -> None:
        if step is None:
            step = int(counters.get("trials_finished", len(ranked)))
        values = {**counters, "front_size": len(front)}
        if {"val_accuracy", "nonzero_params"} <= set(ranked.columns):
            values["hypervolume"] = hypervolume_2d(
                (1.0 - ranked["val_accuracy"]).tolist(), ranked["nonzero_params"].tolist(),
                max_params_ref=self.max_params_ref)
        self._log_metrics(self.parent_run_id, numeric(values), step)

    @_tracked
    def push_front(self) -> None:
        """Send the pending front now: child tags that changed, front models, the three plots."""
        if self._pending is None:
            return
        ranked, front = self._pending
        for row in ranked.itertuples(index=False):
            key = row.trial_key
            tags = (str(int(row.pareto_rank)), "true" if key in front else "false")
            run_id = self._children.get(key)
            if run_id is not None and self._front_tags.get(key) != tags:
                self._log_tags(run_id, {TAG_RANK: tags[0], TAG_ON_FRONT: tags[1]})
                self._front_tags[key] = tags
        for key in sorted(front - self._uploaded):
            self._upload_model(key)
        self._upload_plots(ranked, front)
        self._pending = None
        self._last_push = time.monotonic()

    def _upload_model(self, key: str) -> None:
        run_id = self._children.get(key)
        path = self._models.get(key) or self.run_dir / "trials" / key / "model.pt"
        if run_id is None or not path.is_file():
            return
        if path.name == "model.pt":
            self.client.log_artifact(run_id, str(path))
        else:  # the artifact is always model.pt, whatever the local name
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "model.pt").write_bytes(path.read_bytes())
                self.client.log_artifact(run_id, str(Path(tmp) / "model.pt"))
        self._log_tags(run_id, {TAG_MODEL: "true"})
        self._uploaded.add(key)

    def _upload_plots(self, ranked: pd.DataFrame, front: set[str]) -> None:
        table = self.front_table(ranked, front)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            table[table["on_front"]].drop(columns="on_front").to_csv(out / "pareto.csv", index=False)
            render_png(table, out / "pareto.png", objectives=self.objectives,
                       title=self.search_name)
            (out / "pareto.html").write_text(render_html(table, objectives=self.objectives,
                                                         title=self.search_name))
            for name in ("pareto.csv", "pareto.png", "pareto.html"):
                self.client.log_artifact(self.parent_run_id, str(out / name))

    def front_table(self, ranked: pd.DataFrame, front: set[str]) -> pd.DataFrame:
        """Every ranked trial with its run id, UI link, arch string and ``on_front`` flag."""
        rows = []
        for rec in ranked.to_dict("records"):
            key = rec["trial_key"]
            run_id = self._children.get(key, "")
            rows.append({
                "trial_key": key,
                "pareto_rank": int(rec["pareto_rank"]),
                **{c: rec[c] for c in ("val_accuracy", "val_accuracy_se", "test_accuracy",
                                       "nonzero_params", "macs", *self.objectives) if c in rec},
                "arch": self._names.get(key) or str(rec.get("arch", key)),
                "run_id": run_id,
                "url": run_url(self.ui_url, self.experiment_id, run_id) if run_id else "",
                "on_front": key in front,
            })
        columns = ["trial_key", "pareto_rank", "val_accuracy", "nonzero_params", "arch",
                   "run_id", "url", "on_front"]
        table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
        x_col = _axes(self.objectives)[1]
        return table.sort_values(["pareto_rank", x_col], kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------ end
    def finish(self, status: str = "FINISHED", *, reason: str | None = None) -> None:
        """Push the last front, close children still RUNNING, then the parent run."""
        if status not in TERMINAL:
            raise ValueError(f"{status=} must be one of {', '.join(TERMINAL)}")
        self._finish(status, reason)
        self.finished = True
        _LIVE.pop(str(self.run_dir), None)
        atexit.unregister(self._at_exit)

    @_tracked
    def _finish(self, status: str, reason: str | None) -> None:
        self.push_front()
        child_status = "FAILED" if status == "FAILED" else "KILLED"
        why = reason or f"the search ended ({status}) before this trial reported its end"
        for key, run_id in self._children.items():
            if self._status.get(key) == "RUNNING":
                self._log_tags(run_id, {TAG_FAILURE: why[:500]})
                self.client.set_terminated(run_id, child_status)
                self._status[key] = child_status
        if reason:
            self._log_tags(self.parent_run_id, {TAG_FAILURE: reason[:500]})
        self.client.set_terminated(self.parent_run_id, status)

    # ------------------------------------------------------------------ batching
    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH_TAGS):
            self.client.log_batch(run_id, params=items[i:i + _BATCH_TAGS])

    def _log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                     tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, RunTag

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, int(step)) for k, v in metrics.items()]
        run_tags = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, max(len(items), 1), _BATCH_METRICS):
            self.client.log_batch(run_id, metrics=items[i:i + _BATCH_METRICS],
                                  tags=run_tags if i == 0 else [])


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """The run dir's mlflow.json (empty when missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------- after the fact
# results.csv statuses (search/results.py writes Ray's) -> MLflow's; others (RUNNING...) -> KILLED
_STATUS_MAP = {"TERMINATED": "FINISHED", "EARLY_STOPPED": "FINISHED", "FINISHED": "FINISHED",
               "ERROR": "FAILED", "FAILED": "FAILED"}
_NOT_METRICS = ("trial_key", "status", "error", "arch")


def sync_run_dir(run_dir: str | Path, tracking_uri: str | None = None) -> dict[str, int]:
    """Bring MLflow in line with a run directory; idempotent (a second call changes nothing).

    Creates the parent/children MLflow never got, logs final metrics, artifacts and front
    models that did not arrive (the tracker went offline, the driver was killed), closes runs
    a killed driver left RUNNING (trials as KILLED unless results.csv says how they ended; the
    search as outcome.json says, see :func:`sync_end`) and refreshes the Pareto tags and plots.
    The URI and experiment default to the ones the search used (run_dir/mlflow.json, else the
    experiment is spec.yaml's ``name``). Returns counts: trials, created, finalized, closed.

    Reads results.csv (trial_key, status, error, flat ``arch/``/``train/`` config, metric
    columns), ``trials/<key>/result.json`` (final metrics under ``metrics``), ``arch.yaml``,
    ``layers.json``, ``model.pt`` and pareto.csv (the front's trial keys).
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    results_csv = run_dir / "results.csv"
    if not results_csv.is_file() and not (run_dir / STATE_FILE).is_file():
        raise UserError(f"{run_dir} is not a search run directory: no results.csv or {STATE_FILE}")
    state = read_state(run_dir)
    uri = tracking_uri or state.get("tracking_uri") or resolve_tracking_uri(None)
    check_reachable(uri)
    spec_path = run_dir / "spec.yaml"
    spec_text = spec_path.read_text() if spec_path.is_file() else ""
    spec_dict = yaml.safe_load(spec_text) or {}
    if not isinstance(spec_dict, dict):
        spec_dict = {}
    # The experiment the search itself used (the spec's name, see search/tuner.py _tracker).
    experiment = state.get("experiment") or spec_dict.get("name") or DEFAULT_EXPERIMENT
    tracker = SearchTracker(
        uri, str(experiment), run_dir=run_dir,
        spec_dict=spec_dict, spec_yaml_text=spec_text,
        search_name=state.get("search_name") or str(spec_dict.get("name") or run_dir.name),
        objectives=state.get("objectives") or spec_dict.get("objectives"),
        max_params_ref=state.get("max_params_ref"), front_interval_s=0.0,
        ui_url=state.get("ui_url"), strict=True,
    ).start(resume=True)
    df = pd.read_csv(results_csv) if results_csv.is_file() else pd.DataFrame(columns=["trial_key"])
    counts = {"trials": len(df), **close_recorded_trials(tracker, run_dir, df)}
    counts["closed"] += sum(s == "RUNNING" for s in tracker._status.values())
    pareto_csv = run_dir / "pareto.csv"
    front_keys = (pd.read_csv(pareto_csv)["trial_key"].astype(str).tolist()
                  if pareto_csv.is_file() else None)
    ended = [_STATUS_MAP.get(str(s).upper()) for s in df.get("status", [])]
    finished = sum(s is not None for s in ended)  # trials that ended, failed ones included
    failed = ended.count("FAILED")
    if all(c in df.columns for c in tracker.objectives):
        last = tracker.client.get_run(tracker.parent_run_id).data.metrics.get("trials_finished")
        tracker.update_front(df, front_keys, step=finished,
                             counters={"trials_finished": finished, "trials_failed": failed},
                             final=True, log_metrics=last is None or last < finished)
    from search.rundir import read_outcome

    status, reason = sync_end(read_outcome(run_dir), tracker.parent_status_at_start, run_dir)
    tracker.finish(status, reason=reason)
    if status == "FINISHED":  # a stale reason from a KILLED close (the server went away)
        parent = tracker.client.get_run(tracker.parent_run_id)
        if TAG_FAILURE in parent.data.tags:
            tracker.client.delete_tag(tracker.parent_run_id, TAG_FAILURE)
    return counts


def sync_end(outcome: Mapping[str, Any] | None, parent_status: str | None,
             run_dir: str | Path) -> tuple[str, str | None]:
    """(status, failure reason) that ``sync`` gives the parent run; reason None: keep its tag.

    ``outcome`` is the run dir's outcome.json (``search.rundir.read_outcome``), written by the
    driver at its end; it wins over ``parent_status`` (the parent's status before sync): a
    complete search is FINISHED even when MLflow has it KILLED (its server went away before
    the end, and the driver's exit hook or an earlier sync closed it so). An incomplete one
    is KILLED (interrupted: resumable), or FAILED when the driver stopped on an error. Without
    outcome.json the driver died (KILLED), unless the parent was already closed (a driver
    older than outcome.json closed it: that status stands).
    """
    if outcome is not None:
        if outcome.get("complete") is True:
            return "FINISHED", None
        stopped = str(outcome.get("stopped_by") or "interrupted")
        if stopped.startswith("error"):
            return "FAILED", None if parent_status == "FAILED" else (
                f"the search driver stopped on an {stopped}; closed by sync")
        return "KILLED", None if parent_status == "KILLED" else (
            f"interrupted: continue with `sparse-search resume {run_dir}`")
    if parent_status in TERMINAL:
        return parent_status, None
    return "KILLED", "the search driver stopped before the search ended (no outcome.json); closed by sync"


def close_recorded_trials(tracker: SearchTracker, run_dir: Path, df: pd.DataFrame) -> dict[str, int]:
    """Bring each trial of results.csv (``df``) to its recorded end in MLflow.

    A child run that never got its final metrics gets them (from trials/<key>/result.json) with
    arch.yaml, layers.json and the model; one whose metrics arrived but whose end status did not
    (the driver was killed in between) is closed with the recorded status. `sync` runs this on
    every row; `resume` on the rows recorded before the kill (the tracking callback ignores any
    rerun of them), whose runs would otherwise stay RUNNING and end KILLED. Returns counts:
    created, finalized, closed.
    """
    from trainables.arch import ArchConfig

    counts = {"created": 0, "finalized": 0, "closed": 0}
    if tracker.offline or tracker.parent_run_id is None:
        return counts
    for row in df.to_dict("records"):
        rec = {k: v for k, v in ((k, _plain(v)) for k, v in row.items()) if v is not None}
        key = str(rec["trial_key"])
        trial_dir = run_dir / "trials" / key
        arch = (ArchConfig.load(trial_dir / "arch.yaml") if (trial_dir / "arch.yaml").is_file()
                else ArchConfig.from_flat(rec))
        if key not in tracker._children:
            flat = {k: v for k, v in rec.items() if k.startswith(("arch/", "train/"))}
            initial = rec.get("initial")
            tracker._ensure_child(key, arch, flat, str(initial) if initial else None)
            counts["created"] += 1
        status = _STATUS_MAP.get(str(rec.get("status", "")).upper(), "KILLED")
        if key in tracker._final and tracker._status.get(key) != "RUNNING":
            continue
        if key in tracker._final:  # metrics arrived, the end status did not
            tracker.client.set_terminated(tracker._children[key], status)
            tracker._status[key] = status
            counts["closed"] += 1
            continue
        saved = _read_json(trial_dir / "result.json") or {}
        final = saved.get("metrics") if isinstance(saved.get("metrics"), dict) else {
            k: v for k, v in rec.items()
            if k not in _NOT_METRICS and not k.startswith(("arch/", "train/", "meta/"))}
        error = rec.get("error")
        if status == "KILLED" and not error:
            error = f"the search driver stopped before this trial ended (status {rec.get('status')})"
        tracker.trial_finished(
            key, final, status=status, error=error, layers=_read_json(trial_dir / "layers.json"),
            model_path=trial_dir / "model.pt" if (trial_dir / "model.pt").is_file() else None,
            arch=arch)
        counts["finalized"] += 1
    return counts


def _plain(v: Any) -> Any:
    """A CSV cell as a plain Python value; NaN (an empty cell) -> None.

    A column with empty cells reads as float, so integral floats become ints again (widths,
    counts); ArchConfig accepts ints where it wants floats.
    """
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if v.is_integer():
            return int(v)
    return v


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
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


def front_from_store(tracking_uri: str, experiment: str | None = None) -> dict[str, Any]:
    """The Pareto front of the latest search (children tagged on_front), sorted by params."""
    check_reachable(tracking_uri)
    client = client_for(tracking_uri)
    parent = latest_search(client, experiment)
    eid = parent.info.experiment_id
    runs = search_all(client, [eid], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' "
                                     f"and tags.`{TAG_ON_FRONT}` = 'true'")
    base = ui_base(tracking_uri)
    front = [{
        "run_id": r.info.run_id,
        "trial_key": r.data.tags.get(TAG_TRIAL_KEY),
        "arch": r.info.run_name,
        **{k: r.data.metrics.get(k) for k in ("val_accuracy", "val_accuracy_se", "test_accuracy",
                                               "nonzero_params", "macs")},
        "status": r.info.status,
        "url": run_url(base, eid, r.info.run_id),
    } for r in runs]
    front.sort(key=lambda f: (f["nonzero_params"] is None, f["nonzero_params"] or 0))
    return {"search": parent.info.run_name, "parent_run_id": parent.info.run_id,
            "experiment_id": eid, "status": parent.info.status,
            "runs_url": run_url(base, eid), "front": front}


def format_front(report: Mapping[str, Any]) -> str:
    """The `sparse-search pareto` table."""
    lines = [f"search {report['search']} ({report['status']}), parent run {report['parent_run_id']}",
             f"{len(report['front'])} on the Pareto front; runs: {report['runs_url']}",
             f"{'val_acc':>8} {'+-se':>6} {'test_acc':>8} {'params':>10} {'macs':>12}  "
             f"{'run_id':32}  arch"]
    for f in report["front"]:
        se = _num(f.get("val_accuracy_se"), ".4f")
        lines.append(f"{_num(f['val_accuracy'], '.4f'):>8} {se:>6} {_num(f['test_accuracy'], '.4f'):>8} "
                     f"{_num(f['nonzero_params'], ',.0f'):>10} {_num(f['macs'], ',.0f'):>12}  "
                     f"{f['run_id']:32}  {f['arch']}")
    return "\n".join(lines)


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def wait_healthy(url: str, proc: subprocess.Popen, *, timeout: float) -> None:
    """Poll ``url``/health until it answers; UserError when the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with code {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise UserError(f"mlflow server did not answer at {url} within {timeout:.0f} s")


def stop_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when its parent dies, even by SIGKILL.

    `mlflow server` stops its uvicorn worker on SIGTERM, so no server outlives a killed CLI.
    """
    import contextlib
    import ctypes
    import signal

    # Not Linux (no prctl): serve_ui's finally still stops the server on Ctrl-C.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def serve_ui(*, port: int, backend_store_uri: str, artifact_root: str,
             experiment: str | None = None, echo: Callable[[str], Any] = print) -> int:
    """Run `mlflow server` on 127.0.0.1 in the foreground (light: 1 worker, no job runner).

    Prints the runs list of the latest search once the server answers; Ctrl-C stops it.
    """
    import socket

    with socket.socket() as s:
        # SO_REUSEADDR as uvicorn binds: connections of a server just stopped linger in
        # TIME_WAIT on the port for ~60 s and would fail a plain bind; Linux still refuses
        # this bind while any socket listens there, which is what the check is for.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"--port {port} is not free on 127.0.0.1 ({e.strerror}): pick another") from None
    url = f"http://127.0.0.1:{port}"
    try:
        parent = latest_search(client_for(backend_store_uri), experiment)
        where = run_url(url, parent.info.experiment_id)
    except UserError:
        where = f"{url}/#/experiments{UI_QUERY}"
    # Its log goes to stderr, stdout keeps the URL.
    proc = start_light_server(port=port, backend_store_uri=backend_store_uri,
                              artifact_root=artifact_root, stdout=sys.stderr)
    try:
        wait_healthy(url, proc, timeout=180)
        echo(f"MLflow UI: {where}\n(serving {backend_store_uri}, artifacts {artifact_root}; "
             "Ctrl-C stops it)")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)


def start_light_server(*, port: int, backend_store_uri: str, artifact_root: str | Path,
                       stdout: Any, cwd: str | Path | None = None) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port in light mode, in its own process group.

    The defaults start 4 workers and a job runner (15 processes, ~3 GB): this is 2 processes,
    ~0.5 GB. The group is stopped whole by :func:`stop_server`, and by SIGTERM when the
    starting process dies (:func:`stop_with_parent`).
    """
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend_store_uri,
           "--default-artifact-root", str(artifact_root)]
    return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, cwd=cwd,
                            start_new_session=True, preexec_fn=stop_with_parent)


def stop_server(proc: subprocess.Popen, *, timeout: float = 20) -> None:
    """SIGTERM the server's process group (uvicorn worker included), SIGKILL after ``timeout``."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------- Ray Tune adaptor
class _TrackingCallbackMixin:
    """Ray Tune callback feeding a SearchTracker from the driver (``TrackingCallback(tracker)``).

    The trial key is the config's ``meta/trial_key`` (Ray's trial id when absent). On
    completion, ``run_dir/trials/<key>/{layers.json,model.pt}`` are attached when present, so
    place this callback after the one that writes them. Ray pickles callbacks with the
    experiment (tuner.pkl): only the tracker's arguments travel, and an unpickled callback
    uses the started tracker of the same run dir in this process, or starts one (resume).
    """

    def __init__(self, tracker: SearchTracker, *, recorded: Iterable[str] = ()) -> None:
        self._tracker: SearchTracker | None = tracker
        self._args = tracker.init_args()
        # Trials the run dir recorded before a resume: Ray may rerun one from a stale snapshot
        # (and the rerun may even fail on a pruned checkpoint); its recorded end stands, in
        # MLflow as in results.csv (close_recorded_trials closed its run).
        self._recorded = frozenset(recorded)

    def __getstate__(self) -> dict[str, Any]:
        return {"_args": self._args, "_tracker": None, "_recorded": self._recorded}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"_recorded": frozenset(), **state})

    @property
    def tracker(self) -> SearchTracker:
        if self._tracker is None:
            live = _LIVE.get(self._args["run_dir"])
            self._tracker = live or SearchTracker(**self._args).start(resume=True)
        return self._tracker

    @staticmethod
    def trial_key(trial: Any) -> str:
        return str(trial.config.get("meta/trial_key") or trial.trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from trainables.arch import ArchConfig

        if self.trial_key(trial) in self._recorded:
            return
        config = dict(trial.config)
        flat = {k: v for k, v in config.items() if not k.startswith("meta/")}
        self.tracker.trial_started(self.trial_key(trial), ArchConfig.from_flat(config), flat,
                                   initial=config.get("meta/initial"))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if self.trial_key(trial) in self._recorded:
            return
        step = result.get("epoch", result.get("training_iteration", 0))
        self.tracker.trial_result(self.trial_key(trial), result, int(step))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, "FINISHED", None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # The trace is written next to the driver's trial artifacts before this hook runs; it
        # reaches the storage path (where trial.get_error() reads) only at the next sync.
        try:
            error = Path(trial.error_file).read_text() if trial.error_file else trial.get_error()
        except Exception:  # the file may be gone; the status still says FAILED
            error = None
        self._finished(trial, "FAILED", str(error or "the trial raised an error (no trace kept)"))

    def _finished(self, trial: Any, status: str, error: str | None) -> None:
        key = self.trial_key(trial)
        if key in self._recorded:
            return
        trial_dir = self.tracker.run_dir / "trials" / key
        layers = None
        if (trial_dir / "layers.json").is_file():
            try:
                layers = json.loads((trial_dir / "layers.json").read_text())
            except ValueError:
                layers = None
        model = trial_dir / "model.pt"
        self.tracker.trial_finished(key, trial.last_result or {}, status=status, error=error,
                                    layers=layers, model_path=model if model.is_file() else None)


def __getattr__(name: str) -> Any:
    # TrackingCallback subclasses ray.tune.Callback, and importing ray costs seconds: build the
    # class on first use so `pareto`/`sync`/`export` never import ray. Cached in the module's
    # globals, so pickle finds the same class by its name.
    if name == "TrackingCallback":
        from ray.tune import Callback

        cls = type("TrackingCallback", (_TrackingCallbackMixin, Callback),
                   {"__module__": __name__, "__doc__": _TrackingCallbackMixin.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- plots
def render_png(table: pd.DataFrame, path: Path, *, objectives: Mapping[str, str],
               title: str) -> None:
    """Accuracy vs parameters (log x): every trial in grey, the front in red as a staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    y_col, x_col = _axes(objectives)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    try:
        if len(table):
            rest = table[~table["on_front"]]
            front = table[table["on_front"]].sort_values(x_col)
            ax.scatter(rest[x_col], rest[y_col], s=18, c="#9aa5b1", label="trials")
            ax.step(front[x_col], front[y_col], where="post", c="#d1495b", lw=1.2)
            ax.scatter(front[x_col], front[y_col], s=36, c="#d1495b", zorder=3,
                       label=f"Pareto front ({len(front)})")
            if (table[x_col] > 0).all():
                ax.set_xscale("log")
                label = FuncFormatter(lambda v, _pos: _fmt(v))  # 2k, not 2x10^3
                ax.xaxis.set_major_formatter(label)
                # Label minor ticks only when there are too few decades for majors, and then
                # only 2, 3 and 5 x 10^k unless the span is tiny (6..9 crowd on a log axis).
                span = table[x_col].max() / table[x_col].min()

                def minor(v: float, _pos: int) -> str:
                    lead = round(v / 10 ** math.floor(math.log10(v)))
                    return _fmt(v) if span < 4 or lead in (2, 3, 5) else ""

                ax.xaxis.set_minor_formatter(FuncFormatter(minor) if span < 20
                                             else NullFormatter())
            ax.legend(loc="lower right")
        ax.set_xlabel(x_col)
        ax.set_ylabel(y_col)
        ax.set_title(f"{title}: {len(table)} trials")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _axes(objectives: Mapping[str, str]) -> tuple[str, str]:
    """(y, x): the first maximised objective up, the first minimised one across."""
    y = next((k for k, s in objectives.items() if s == "max"), "val_accuracy")
    x = next((k for k, s in objectives.items() if s == "min"), "nonzero_params")
    return y, x


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks covering [lo, hi] on a log axis (few enough to label)."""
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            t = m * 10.0**e
            if lo <= t <= hi:
                ticks.append(t)
    if len(ticks) > 8:
        ticks = [t for t in ticks if str(t).startswith("1")]
    return ticks or [lo, hi]


def _fmt(v: float) -> str:
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"


def render_html(table: pd.DataFrame, *, objectives: Mapping[str, str], title: str) -> str:
    """A self-contained page: inline SVG scatter (hover: arch and metrics; click: the run)."""
    y_col, x_col = _axes(objectives)
    w, h, ml, mr, mt, mb = 900, 520, 70, 20, 30, 50
    xs = table[x_col].astype(float).tolist() if len(table) else [1.0]
    ys = table[y_col].astype(float).tolist() if len(table) else [0.0]
    log_x = min(xs) > 0
    fx = math.log10 if log_x else float
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    pad = (x_hi - x_lo) * 0.05 or 0.5
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = min(ys), max(ys)
    ypad = (y_hi - y_lo) * 0.08 or 0.05
    y_lo, y_hi = y_lo - ypad, y_hi + ypad

    def px(v: float) -> float:
        return ml + (fx(v) - x_lo) / (x_hi - x_lo) * (w - ml - mr)

    def py(v: float) -> float:
        return mt + (y_hi - v) / (y_hi - y_lo) * (h - mt - mb)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
           f'<rect x="{ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" '
           'fill="none" stroke="#ccc"/>']
    x_ticks = _log_ticks(10**x_lo, 10**x_hi) if log_x else [
        x_lo + i * (x_hi - x_lo) / 5 for i in range(6)]
    for t in x_ticks:
        x = px(t)
        svg.append(f'<line x1="{x:.1f}" y1="{mt}" x2="{x:.1f}" y2="{h - mb}" stroke="#eee"/>'
                   f'<text x="{x:.1f}" y="{h - mb + 16}" text-anchor="middle">{_fmt(t)}</text>')
    for i in range(6):
        t = y_lo + i * (y_hi - y_lo) / 5
        y = py(t)
        svg.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{w - mr}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.3f}</text>')
    svg.append(f'<text x="{(w + ml) / 2}" y="{h - 12}" text-anchor="middle">'
               f'{html.escape(x_col)}{" (log)" if log_x else ""}</text>'
               f'<text x="16" y="{(h - mb) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(h - mb) / 2})">{html.escape(y_col)}</text>')
    front = table[table["on_front"]].sort_values(x_col) if len(table) else table
    if len(front) > 1:
        pts = []
        for a, b in zip(front.to_dict("records"), front.to_dict("records")[1:], strict=False):
            pts += [f"{px(a[x_col]):.1f},{py(a[y_col]):.1f}", f"{px(b[x_col]):.1f},{py(a[y_col]):.1f}"]
        last = front.iloc[-1]
        pts.append(f"{px(last[x_col]):.1f},{py(last[y_col]):.1f}")
        svg.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#d1495b"/>')
    for rec in sorted(table.to_dict("records"), key=lambda r: r["on_front"]):  # front on top
        tip = "\n".join([rec["arch"], f"{y_col} {rec[y_col]:.4f}", f"{x_col} {rec[x_col]:,.0f}",
                         f"pareto rank {rec['pareto_rank']}", f"trial {rec['trial_key']}"])
        dot = (f'<circle class="{"front" if rec["on_front"] else "trial"}" '
               f'cx="{px(rec[x_col]):.1f}" cy="{py(rec[y_col]):.1f}" '
               f'r="{5 if rec["on_front"] else 3.5}"><title>{html.escape(tip)}</title></circle>')
        if rec["url"]:
            dot = f'<a href="{html.escape(rec["url"])}" target="_blank" rel="noopener">{dot}</a>'
        svg.append(dot)
    svg.append("</svg>")
    rows = "".join(
        f'<tr><td>{_fmt_cell(r.get(y_col))}</td><td>{_fmt_cell(r.get("test_accuracy"))}</td>'
        f'<td>{_fmt_cell(r.get(x_col))}</td><td>{_fmt_cell(r.get("macs"))}</td>'
        f'<td><a href="{html.escape(r["url"])}" target="_blank" rel="noopener">'
        f'<code>{html.escape(r["arch"])}</code></a></td></tr>'
        for r in front.to_dict("records"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}: Pareto front</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #1f272d; }}
circle.trial {{ fill: #9aa5b1; }} circle.front {{ fill: #d1495b; }}
circle:hover {{ stroke: #1f272d; stroke-width: 2; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }}
td:last-child {{ text-align: left; }}
</style></head><body>
<h2>{html.escape(title)}: {len(front)} on the Pareto front of {len(table)} trials</h2>
<p>Hover a point for its architecture; click it to open its MLflow run.</p>
{"".join(svg)}
<table><tr><th>{html.escape(y_col)}</th><th>test_accuracy</th><th>{html.escape(x_col)}</th><th>macs</th><th style="text-align:left">architecture (MLflow run)</th></tr>
{rows}</table>
</body></html>
"""


def _fmt_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and v <= 1.0:
        return f"{v:.4f}"
    return f"{v:,.0f}" if isinstance(v, (int, float)) else html.escape(str(v))
