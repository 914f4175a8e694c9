"""Every use of Ray's and Optuna's private API and log wording, in one place.

Each hook names the version it was written for (:data:`WRITTEN_FOR`); :func:`check` runs at a
search's start and turns a missing hook into one clear error instead of a traceback deep in a
run. ``pyproject.toml`` pins the range that is tested (``ray>=2.60,<2.61``, ``optuna>=5.0,<5.1``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from search.errors import UserError

WRITTEN_FOR = {"ray": "2.60.0", "optuna": "5.0.0"}
# Ray log records that sparse-search says better or that are harmless races; matched by the
# wording of Ray 2.60 (a changed wording only lets the record through: nothing breaks).
RAY_TUNE_END_NOTES = ("Trials did not complete", "Experiment has been interrupted",
                      "Stop signal received")
RAY_CHECKPOINT_RACE = "Error handling checkpoint"
RAY_SNAPSHOT_RACE = "Saving experiment state to storage"
INSUFFICIENT_RESOURCES_LOGGER = "ray.tune.execution.insufficient_resources_manager"


def _hooks() -> dict[str, bool]:
    """Which private hooks this installation has (name -> present)."""
    import optuna
    import ray._private.ray_constants as ray_constants
    import ray._private.worker as ray_worker
    from ray.tune import Tuner
    from ray.tune.experiment import Trial

    return {
        "ray._private.worker.print_to_stdstream": hasattr(ray_worker, "print_to_stdstream"),
        "ray._private.ray_constants.ENABLE_RAY_CLUSTER": hasattr(ray_constants,
                                                                 "ENABLE_RAY_CLUSTER"),
        "ray.tune.Tuner._local_tuner": "_local_tuner" in Tuner.__init__.__code__.co_names,
        "ray.tune.experiment.Trial.pickled_error_file": hasattr(Trial, "pickled_error_file"),
        "optuna FrozenTrial.system_attrs": hasattr(optuna.trial.FrozenTrial, "system_attrs"),
        "ray.tune TuneController._create_checkpoint_manager": _snapshot_hook_present(),
        "ray.tune SearchGenerator.set_state 'finished'": _finished_flag_present(),
        "ray.tune ConcurrencyLimiter.live_trials": _limiter_live_trials_present(),
    }


def _limiter_live_trials_present() -> bool:
    import inspect

    from ray.tune.search import ConcurrencyLimiter

    return "self.live_trials = set()" in inspect.getsource(ConcurrencyLimiter.__init__)


def _finished_flag_present() -> bool:
    import inspect

    from ray.tune.search.search_generator import SearchGenerator

    return '"finished"' in inspect.getsource(SearchGenerator.set_state)


def _snapshot_hook_present() -> bool:
    import inspect

    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.execution.tune_controller import TuneController

    return hasattr(TuneController, "_create_checkpoint_manager") and \
        "sync_every_n_trial_checkpoints" in inspect.signature(_ExperimentCheckpointManager).parameters


def check() -> None:
    """A UserError naming the hooks this Ray / Optuna lacks, the versions they were written for
    and the installed ones (pip install -c constraints.txt gives the tested ones)."""
    missing = [name for name, ok in _hooks().items() if not ok]
    if missing:
        have = {d: _version(d) for d in WRITTEN_FOR}
        raise UserError(
            f"this Ray / Optuna lacks what sparse-search uses: {', '.join(missing)} (written for "
            f"ray {WRITTEN_FOR['ray']}, optuna {WRITTEN_FOR['optuna']}; installed: ray "
            f"{have['ray']}, optuna {have['optuna']}): install the tested versions with "
            "`pip install -c constraints.txt sparse-search`")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


class DropIncomplete(logging.Filter):
    """Ray's end-of-run notes that sparse-search says better: "Trials did not complete" (failed
    trials are in results.csv), "Resume experiment with: Tuner.restore(...)" and "Stop signal
    received ... Press CTRL+C to skip" (the CLI prints ``sparse-search resume RUN_DIR``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RAY_TUNE_END_NOTES)


class DropStaleCheckpoint(logging.Filter):
    """After a resume, a trial that the dead driver's last snapshot caught mid-way re-reports;
    Ray then tries to delete a checkpoint the dead driver had already deleted and logs the
    FileNotFoundError with a traceback. Nothing is lost: drop exactly that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (RAY_CHECKPOINT_RACE in str(record.msg)
                    and isinstance(exc, FileNotFoundError))


class DropSyncRace(logging.Filter):
    """Ray writes each experiment snapshot into its driver staging dir (temporary files, then
    renamed) while the previous snapshot's copy to the run dir may still be listing that dir;
    a temporary file renamed between the listing and the copy makes the copy fail with a
    FileNotFoundError, logged with a traceback (seen once in a CI rehearsal: ``.<uuid>-tmp-
    searcher-state-*.pkl``). Nothing is lost: the next snapshot copies again, and the last one
    is copied after the trials end, when nothing writes. Drop exactly that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).startswith(RAY_SNAPSHOT_RACE)
                    and isinstance(exc, FileNotFoundError) and "tmp-" in str(exc))


def raylet_errors_to_stderr() -> None:
    """Ray prints the raylet's error messages ("A worker died or was killed ...") on the
    driver's *stdout* from a thread of its own, which no setting turns off; the search already
    records the failed trial (a line on stderr, a row in results.csv), and stdout is for the
    front table and the ``--json`` line. Send those messages to stderr instead (idempotent; a
    Ray without this private hook is left alone)."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_sparse_search", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            data = {**data, "is_err": True}
        original(data, ignore_prefix)

    to_stderr._sparse_search = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_stderr



@contextlib.contextmanager
def ray_cluster_flag(enabled: bool) -> Iterator[None]:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import, into a constant; a process
    that imported Ray already needs the constant itself set (the node address is fixed at
    init)."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = enabled
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def replace_restored(tuner: Any, *, search_alg: Any, callbacks: list[Any]) -> None:
    """Give a restored Tuner this process's searcher and callbacks.

    ``Tuner.restore`` re-creates both from tuner.pkl, pickled when the search started, and
    takes no RunConfig: the progress line and the MLflow tracker of *this* resume (its own
    flags) would be lost. Ray still restores the searcher and callback state into the objects
    set here (``restore_from_dir``), so nothing the dead driver knew is dropped.
    """
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None or not hasattr(internal, "_tune_config"):
        raise UserError("resume needs a local Ray Tune driver (Ray Client is not supported)")
    internal._tune_config.search_alg = search_alg
    internal._run_config.callbacks = callbacks


def limiter_forget_lost(limiter: Any, known: set[str]) -> None:
    """Drop from a restored ``ConcurrencyLimiter`` the trial ids Ray did not restore (Ray
    Tune 2.60 ``tune/search/concurrency_limiter.py`` ``live_trials``): each would hold one of
    ``max_concurrent`` slots for ever."""
    limiter.live_trials = {t for t in limiter.live_trials if t in known}


def newest_snapshot(experiment: str, template: str) -> bytes | None:
    """The newest of an experiment folder's snapshot files named like ``template`` (Ray
    Tune 2.60's ``experiment_state-{}.json``, ``searcher-state-{}.pkl``: timestamps that sort
    as text, as Ray picks them), local or on a URI; None without one."""
    import fnmatch
    import os

    from pyarrow.fs import FileSelector

    from search.rundir import storage as st

    where = st.parse(experiment, what="run directory")
    pattern = template.format("*")
    if isinstance(where, Path):
        names = sorted(fnmatch.filter(os.listdir(where), pattern)) if where.is_dir() else []
        return (where / names[-1]).read_bytes() if names else None
    infos = where.fs.get_file_info(FileSelector(where.path, allow_not_found=True))
    names = sorted(fnmatch.filter([i.base_name for i in infos], pattern))
    if not names:
        return None
    with where.fs.open_input_stream(f"{where.path}/{names[-1]}") as f:
        return f.readall()


def snapshot_has_trials(experiment: str) -> bool:
    """The experiment's newest snapshot holds a trial. Ray Tune 2.60 cannot restore one that
    holds none (IndexError in ``TuneController._restore_trials``): a search stopped at its time
    budget, or by Ctrl-C, before its first trial started. True without a snapshot (Ray's own
    error then says what is missing)."""
    import json

    from ray.tune.execution.tune_controller import TuneController

    state = newest_snapshot(experiment, TuneController.CKPT_FILE_TMPL)
    return state is None or bool(json.loads(state).get("trial_data"))


def snapshot_readable(experiment: str) -> bool:
    """The experiment's newest snapshot parses (True without one). Ray Tune 2.60 writes
    ``experiment_state-*.json`` in place (tune/execution/tune_controller.py ``save_to_dir``:
    ``open(..., "w")`` then ``json.dump``), so a disk that filled while it wrote leaves the
    file cut short, and ``Tuner.restore`` then dies on a JSONDecodeError."""
    import json

    from ray.tune.execution.tune_controller import TuneController

    state = newest_snapshot(experiment, TuneController.CKPT_FILE_TMPL)
    try:
        return state is None or isinstance(json.loads(state), dict)
    except ValueError:
        return False


@contextlib.contextmanager
def searcher_decides_the_end() -> Iterator[None]:
    """While a resumed Tune runs: its search generator restored as not finished.

    Ray Tune 2.60 (tune/search/search_generator.py ``set_state``) restores the generator's
    ``finished`` flag, set once the searcher first answered FINISHED: a search that stopped at
    its time budget would end at once even when the resume extends the budget. The searcher
    (search.run.searcher: num_samples over resumes, the time budget) answers FINISHED again at its
    first suggestion when nothing is left to do, so dropping the flag loses nothing.

    The generator's own sample count goes too (``total_samples``; a new search gives Tune
    ``num_samples=-1``): its ``counter`` is restored from a file separate from Ray's list of
    trials, and a driver SIGKILLed while the two were copied to a storage URI left a counter
    that included a trial never restored, so the resume created one trial too few and ended
    unfinished (exit 130, every time).
    """
    import sys

    from ray.tune.search.search_generator import SearchGenerator

    original = SearchGenerator.set_state

    def not_finished(self: Any, state: dict[str, Any]) -> None:
        original(self, {**state, "finished": False, "total_samples": sys.maxsize})

    SearchGenerator.set_state = not_finished
    try:
        yield
    finally:
        SearchGenerator.set_state = original


@contextlib.contextmanager
def snapshot_every_trial_checkpoint() -> Iterator[None]:
    """While Tune runs: an experiment snapshot after every trial checkpoint.

    Ray Tune 2.60 (tune/execution/tune_controller.py ``_create_checkpoint_manager``) forces a
    snapshot every ``CheckpointConfig.num_to_keep`` trial checkpoints. With num_to_keep=2 the
    snapshot can name a checkpoint two epochs old, which the next registration deletes: a
    driver SIGKILLed in that window leaves a snapshot that resumes into "Could not recover from
    checkpoint as it does not exist on storage anymore" (the trial lost). Every checkpoint: the
    snapshot always names one of the two kept. The snapshot is small (trial states, the
    searcher's and callbacks' state); a per-epoch write of it costs milliseconds.
    """
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController._create_checkpoint_manager

    def every_checkpoint(self: Any) -> Any:
        return _ExperimentCheckpointManager(storage=self._storage,
                                            checkpoint_period=self._checkpoint_period,
                                            sync_every_n_trial_checkpoints=1)

    TuneController._create_checkpoint_manager = every_checkpoint
    try:
        yield
    finally:
        TuneController._create_checkpoint_manager = original


def trial_error_file(trial: Any) -> Path | None:
    """The file where Ray pickled a failed trial's exception (None: none written)."""
    path = getattr(trial, "pickled_error_file", None)
    return Path(path) if path and Path(path).is_file() else None


def optuna_fixed_params(trial: Any) -> dict[str, Any]:
    """The parameters an enqueued Optuna trial was asked to take (``system_attrs``)."""
    return dict(trial.system_attrs["fixed_params"])

