"""The run directory: where one search keeps everything it needs to report, resume and export.

Layout (``--storage DIR`` or a URI, default ``./runs``; a URI is worked on in a local copy,
see :mod:`search.rundir.storage`)::

    runs/<spec-name>-<YYYYmmdd-HHMMSS>/
      spec.yaml          the resolved spec (CLI overrides applied): ``resume`` reads it back
      optuna.journal     the Proposer's JournalStorage: what the sampler learned
      ray/               the Ray Tune experiment (tuner.pkl, experiment state, trial checkpoints)
      results.csv        one row per finished trial (TERMINATED, EARLY_STOPPED or ERROR)
      points.csv         every completed pruning round of every trial (when rounds give several)
      pareto.csv         the front over eligible points
      trials/<key>/      result.json, arch.yaml, model.pt (state_dict), layers.json
      outcome.json       how the last driver of this run dir ended: ``complete`` (every trial
                         the spec asked for finished), ``stopped_by``, ``ended_at``; absent
                         while the first driver runs or after it died (SIGKILL)

``<key>`` is the trial key: the Optuna trial number, the same before and after a resume.
Every file is replaced atomically (write a sibling, then ``os.replace``): a driver killed at
any instant leaves either the old or the new version, never half a file. A run dir on a URI is
copied there after every such write (:func:`watch`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.errors import UserError
from search.pickled import public
from search.rundir import storage as st

SPEC_FILE = "spec.yaml"
JOURNAL_FILE = "optuna.journal"
EXPERIMENT_NAME = "ray"  # Ray Tune's experiment folder inside the run dir
RESULTS_FILE = "results.csv"
POINTS_FILE = "points.csv"
PARETO_FILE = "pareto.csv"
TRIALS_DIR = "trials"
# finalize's retrainings: final/<member>-s<seed>/ holds result.json, arch.yaml and model.pt as
# trials/<key>/ does (+ the ONNX files in a deployment search), so export reads either.
FINAL_DIR = "final"
# Inside trials/<key>/:
RESULT_JSON = "result.json"
ARCH_YAML = "arch.yaml"
MODEL_FILE = "model.pt"
LAYERS_JSON = "layers.json"
OUTCOME_FILE = "outcome.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


@public("search.rundir")
@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (absolute, local); ``uri`` when it lives on a storage URI
    (``path`` is then its local copy, and Ray Tune's experiment is on the URI only)."""

    path: Path
    uri: str | None = None

    @property
    def location(self) -> str:
        """What users see and give back to ``resume``/``sync``/...: the URI, else the path."""
        return self.uri or str(self.path)

    @property
    def tune_storage(self) -> str:
        """Ray Tune's ``storage_path`` (the experiment is ``<this>/ray``)."""
        return self.uri or str(self.path)

    @property
    def tune_experiment(self) -> str:
        """The experiment folder for ``Tuner.restore``."""
        if self.uri is None:
            return str(self.experiment)
        return st.parse(self.uri).child(EXPERIMENT_NAME).uri

    def has_experiment(self) -> bool:
        """Ray Tune saved the experiment (tuner.pkl): there is something to resume."""
        if self.uri is None:
            return (self.experiment / "tuner.pkl").exists()
        return st.parse(self.uri).exists(f"{EXPERIMENT_NAME}/tuner.pkl")

    @property
    def spec(self) -> Path:
        return self.path / SPEC_FILE

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL_FILE

    @property
    def experiment(self) -> Path:
        return self.path / EXPERIMENT_NAME

    @property
    def results_csv(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def points_csv(self) -> Path:
        return self.path / POINTS_FILE

    @property
    def pareto_csv(self) -> Path:
        return self.path / PARETO_FILE

    @property
    def trials(self) -> Path:
        return self.path / TRIALS_DIR

    def trial(self, key: str) -> Path:
        return self.trials / key

    @property
    def outcome(self) -> Path:
        return self.path / OUTCOME_FILE

    @classmethod
    def create(cls, storage: Any, name: str, *, now: dt.datetime | None = None) -> RunDir:
        """A new ``<storage>/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... if taken);
        ``storage`` a path, a URI or a parsed :class:`search.rundir.storage.Remote`."""
        stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        where = storage if isinstance(storage, st.Remote) else st.parse(storage)
        if isinstance(where, st.Remote):
            return cls._create_remote(where, f"{name}-{stamp}")
        root = where
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--storage {root}: cannot create the folder ({e.strerror})") from None
        for i in range(1, 1000):
            path = root / (f"{name}-{stamp}" if i == 1 else f"{name}-{stamp}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            (path / TRIALS_DIR).mkdir()
            return cls(path)
        raise UserError(f"--storage {root}: 999 run folders named {name}-{stamp}* already exist")

    @classmethod
    def _create_remote(cls, root: Any, base: str) -> RunDir:
        """A run dir on a URI: a name not taken there, its (emptied) local copy."""
        import shutil

        for i in range(1, 1000):
            remote = root.child(base if i == 1 else f"{base}-{i}")
            if remote.exists():
                continue
            local = st.cache_dir(remote)
            if local.exists():
                shutil.rmtree(local)
            (local / TRIALS_DIR).mkdir(parents=True)
            return cls(local, uri=remote.uri)
        raise UserError(f"--storage {root.uri}: 999 run folders named {base}* already exist")

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run dir (for ``resume``; a URI is downloaded first); a UserError names
        what is missing."""
        if st.is_uri(path):
            run = cls.fetch(path, needed=(SPEC_FILE, f"{EXPERIMENT_NAME}/tuner.pkl"))
            run.trials.mkdir(exist_ok=True)
            return run
        run = cls.fetch(path)
        if not run.path.is_dir():
            raise UserError(f"{path}: no such run directory")
        for needed, what in ((run.spec, "the resolved spec"),
                             (run.experiment / "tuner.pkl", "the Ray Tune experiment")):
            if not needed.exists():
                raise UserError(
                    f"{path}: {needed.relative_to(run.path)} ({what}) is missing: expected a "
                    "folder made by `sparse-search run` (runs/<name>-<date>-<time>)"
                )
        run.trials.mkdir(exist_ok=True)
        return run

    @classmethod
    def fetch(cls, path: str | Path, *, needed: tuple[str, ...] = (SPEC_FILE,)) -> RunDir:
        """A run dir as given: a local path (not checked), or a URI downloaded into a fresh
        local copy after checking it holds ``needed`` (names relative to the run dir)."""
        where = st.parse(path, what="run directory")
        if isinstance(where, Path):
            return cls(where)
        st.check_reachable(where, what="run directory")
        if not where.exists():
            raise UserError(f"{where.uri}: no such run directory")
        for rel in needed:
            if not where.exists(rel):
                raise UserError(f"{where.uri}: {rel} is missing: expected a folder made by "
                                "`sparse-search run` (<storage>/<name>-<date>-<time>)")
        local = st.cache_dir(where)
        st.download(where, local)
        return cls(local, uri=where.uri)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` in one step (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    st.written(Path(path).absolute())  # a run dir on a URI: copied there now


def write_outcome(run_dir: str | Path, *, complete: bool, stopped_by: str | None) -> None:
    """Record how this driver ended (``sync`` reads it: a complete search's parent run is
    FINISHED, not KILLED, even when MLflow missed the end)."""
    write_json(Path(run_dir) / OUTCOME_FILE, {
        "complete": bool(complete), "stopped_by": stopped_by,
        "ended_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})


def read_outcome(run_dir: str | Path) -> dict[str, Any] | None:
    """outcome.json as a dict, or None when absent or unreadable (the driver died)."""
    try:
        data = json.loads((Path(run_dir) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=_json_default, allow_nan=True) + "\n")


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy / torch scalars
        return v.item()
    if isinstance(v, (set, tuple)):
        return list(v)
    return str(v)
