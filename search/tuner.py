"""Run a search on Ray Tune: locally (default) or on a Ray cluster (``address``), and resume it.

One search, end to end::

    spec ──> run dir (spec.yaml) ──> dataset loaded ONCE in the driver, while Ray starts
         ──> Tuner(train_trial + dataset via the object store, ProposerSearcher in a
             ConcurrencyLimiter, ASHA or FIFO, cpu/gpu per trial, reused actors)
         ──> Recorder (trials/<key>/, CSVs) ─> progress line ─> MLflow (background thread)
         ──> the Pareto front (table on stdout, summary dict returned)

What keeps the per-trial overhead small (2 CPU cores here): actors are reused across trials (a
fresh worker costs ~2 s: process start + torch import), Ray's per-result CSV/JSON/TensorBoard
loggers are off (the Recorder keeps what matters), and everything slow in the driver (MLflow
calls, per-layer accounting of finished models) runs on one background thread
(:mod:`search.background`), never inside Tune's event loop.

Quiet by default: no Ray banner, dashboard, usage stats, progress tables or trial tracebacks
(a failed trial is one line on stderr and a row in results.csv). A local Ray binds loopback
only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray pick 127.0.0.1 as the node address,
so gcs_server, raylet, workers and agents listen there; ``_node_ip_address="127.0.0.1"``
alone is rewritten to the machine's outward address) and keeps token auth on. The
environment settings are scoped to Ray's start and Tune's run (see ``scoped_env``).

On a multi-node cluster, ``storage_dir`` must be a folder every node sees at the same path
(NFS or similar): trial checkpoints are written there by the workers.

Resume (``resume_search``) after any kind of death of the driver, SIGKILL included: Ray's
experiment snapshot restores the trials (finished ones are not rerun, unfinished ones continue
from their last checkpoint; errored ones stay errored: they already used their
``max_failures`` retries), the Optuna journal restores what the sampler learned, and the
Recorder's files on disk say which trials finished. A trial that finished after Ray's last
snapshot reruns its last epochs but is recorded (and told to Optuna) once. See
:mod:`search.searcher` for how asked-but-unrecorded Optuna trials of the dead driver are closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from search.errors import UserError
from search.interrupt import Interrupted
from search.preflight import (  # noqa: F401 (re-exported)
    Checked,
    _detach,
    absolute_data_path,
    checked_tracking_uri,
    cluster_address,
    preflight,
)
from search.rundir import EXPERIMENT_NAME, RunDir, write_atomic

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from search.results import Recorder
    from search.searcher import ProposerSearcher
    from search.spec import SearchSpec

log = logging.getLogger("sparse_search.tuner")

# Environment defaults for a quiet search (a user's own settings win). Set only while Ray
# starts (START_ENV: the raylet and workers inherit it) and while Tune runs (TUNE_ENV), then
# removed again: a notebook or test process that also uses Ray directly keeps its own defaults.
START_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",  # the workers' torch/ray deprecations
}
TUNE_ENV = {
    # The new output engine prints a configuration box and paths even at verbose=0.
    "RAY_AIR_NEW_OUTPUT": "0",
    # The Recorder writes what matters; Ray's per-result CSV/JSON/TBX files cost time per report.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Failed trials are reported by the Recorder (one line), not with a full traceback each.
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    # num_to_keep forces frequent experiment snapshots (wanted: a resume loses little).
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
QUIET_ENV = {**START_ENV, **TUNE_ENV}  # what a submitted job's driver gets
# Local clusters only: bind loopback. (Token auth stays on, Ray's default; its "enabled by
# default" warning is silenced below. Setting RAY_AUTH_MODE here would not do: Ray caches the
# mode when first imported, and a driver and its gcs_server that disagree cannot talk.)
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_NOISY_LOGGERS = (
    # Warns that result.json files are missing: the auto loggers are off on purpose.
    "ray.tune.analysis.experiment_analysis",
    "ray.tune.impl.tuner_internal",
    "ray._private.authentication.authentication_token_setup",
)


class _DropIncomplete(logging.Filter):
    """Ray's end-of-run notes that sparse-search says better: "Trials did not complete" (failed
    trials are in results.csv), "Resume experiment with: Tuner.restore(...)" and "Stop signal
    received ... Press CTRL+C to skip" (the CLI prints ``sparse-search resume RUN_DIR``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trials did not complete",
                                               "Experiment has been interrupted",
                                               "Stop signal received"))


class _DropStaleCheckpoint(logging.Filter):
    """After a resume, a trial that the dead driver's last snapshot caught mid-way re-reports;
    Ray then tries to delete a checkpoint the dead driver had already deleted and logs the
    FileNotFoundError with a traceback. Nothing is lost: drop exactly that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("Error handling checkpoint" in str(record.msg)
                    and isinstance(exc, FileNotFoundError))


class _DropSyncRace(logging.Filter):
    """Ray writes each experiment snapshot into its driver staging dir (temporary files, then
    renamed) while the previous snapshot's copy to the run dir may still be listing that dir;
    a temporary file renamed between the listing and the copy makes the copy fail with a
    FileNotFoundError, logged with a traceback (seen once in a CI rehearsal: ``.<uuid>-tmp-
    searcher-state-*.pkl``). Nothing is lost: the next snapshot copies again, and the last one
    is copied after the trials end, when nothing writes. Drop exactly that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).startswith("Saving experiment state to storage")
                    and isinstance(exc, FileNotFoundError) and "tmp-" in str(exc))


@dataclass(frozen=True)
class SearchOutcome:
    """What a finished (or interrupted) search returns; ``summary`` is the --json object."""

    run_dir: Path
    complete: bool  # every trial the spec asked for finished (False: interrupted, resume it)
    summary: dict[str, Any]
    front_table: str
    mlflow_note: str | None = None  # where to read the search in MLflow (None: --no-mlflow)
    tracking_error: str | None = None  # MLflow tracking failed (the search went on without it)


# ---------------------------------------------------------------------- Ray
@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set the variables not already set, for the duration of the block only."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def quiet_logging() -> None:
    """Lower or filter Ray's and Optuna's chatter (process-wide, idempotent)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, kind in (("ray.tune.tune", _DropIncomplete),
                       ("ray.tune.execution.tune_controller", _DropStaleCheckpoint),
                       ("ray.tune.execution.experiment_state", _DropSyncRace)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _raylet_errors_to_stderr()


def _raylet_errors_to_stderr() -> None:
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


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Start a local Ray (loopback only) or attach to ``address``; True if this call did.

    An already initialised Ray (a test fixture, a notebook) is used as is.
    """
    address = cluster_address(address)
    quiet_logging()
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    if address is not None:
        with scoped_env(START_ENV):
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UserError(f"--address {address}: cannot attach to the Ray cluster ({e})") from None
        return True
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; this process may have
    # imported it already, so set its constant too (the node address is fixed at init).
    before = ray_constants.ENABLE_RAY_CLUSTER
    with scoped_env({**START_ENV, **LOCAL_ENV}):
        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=True)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = before
    return True


# ---------------------------------------------------------------------- the search
def run_search(
    spec: SearchSpec,
    *,
    storage_dir: str | Path = "runs",
    address: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
    progress: bool = True,
    progress_interval_s: float = 30.0,
    checked: Checked | None = None,
) -> SearchOutcome:
    """Run ``spec`` in a new run dir under ``storage_dir``; returns when every trial ended.

    Everything is checked first (:func:`preflight`: data, tracking store, resources): a failed
    check raises a UserError and leaves no run dir, MLflow run or Ray runtime behind.
    """
    spec = absolute_data_path(spec)
    if checked is None:
        checked = preflight(spec, address=address, tracking_uri=tracking_uri, mlflow=mlflow)
    try:
        run = RunDir.create(storage_dir, spec.name)
        write_atomic(run.spec, spec.to_yaml())
    except BaseException:
        _detach(checked)
        raise
    return _search(spec, run, resuming=False, checked=checked, address=address,
                   progress=progress, progress_interval_s=progress_interval_s)


def resume_search(
    run_dir: str | Path,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
    progress: bool = True,
    progress_interval_s: float = 30.0,
) -> SearchOutcome:
    """Continue an interrupted search in ``run_dir`` (its spec.yaml, journal and experiment).

    MLflow: ``tracking_uri``, else the store the run used (run_dir/mlflow.json); a run that
    was not tracked stays untracked unless a URI is given.
    """
    from search.spec import load_spec
    from search.tracking import read_state

    run = RunDir.open(run_dir)
    spec = load_spec(run.spec)
    if tracking_uri is None:
        tracking_uri = read_state(run.path).get("tracking_uri")
        mlflow = mlflow and tracking_uri is not None
    checked = preflight(spec, address=address, tracking_uri=tracking_uri, mlflow=mlflow)
    return _search(spec, run, resuming=True, checked=checked, address=address,
                   progress=progress, progress_interval_s=progress_interval_s)


def _search(spec: SearchSpec, run: RunDir, *, resuming: bool, checked: Checked,
            address: str | None, progress: bool, progress_interval_s: float) -> SearchOutcome:
    """Train the search in ``run`` with what :func:`preflight` checked."""
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    from search.interrupt import sigterm_as_sigint
    from search.rundir import write_outcome

    started_at = time.monotonic()  # the time budget counts Ray's start and the data loading

    from search.background import Background
    from trainables.data import load_dataset

    print(checked.plan.line, file=sys.stderr, flush=True)
    # Ray's start-up is mostly other processes: meanwhile this one loads the dataset, and the
    # background thread imports MLflow and opens (or migrates) its store: seconds, which may
    # run on while the first trials train; calls queued meanwhile wait.
    background = Background()
    uri = checked.tracking_uri
    tracker = _tracker(spec, run, uri) if uri is not None else None
    if tracker is not None:
        background.submit(tracker.start, resume=resuming)
    started = checked.attached
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparse-search-data") as pool:
            splits = pool.submit(load_dataset, spec.data)
            started = init_ray(address) or started
            # ray.init replaces the SIGTERM handler with one that exits at once: put back ours
            # (SIGTERM stops Tune like Ctrl-C: trials saved, the run resumable).
            sigterm_as_sigint()
            splits.exception()  # wait for it (an unreadable dataset raises its DataError below)
        outcome = _fit(spec, run, splits.result(), resuming=resuming, tracker=tracker,
                       background=background, progress=progress, started_at=started_at,
                       progress_interval_s=progress_interval_s, plan=checked.plan)
    except KeyboardInterrupt:
        # A second Ctrl-C (Tune stops cleanly on the first), or one during start-up.
        resumable = (run.experiment / "tuner.pkl").exists()
        write_outcome(run.path, complete=False, stopped_by="interrupted")
        if tracker is not None:
            background.drain()
            tracker.finish("KILLED", reason=str(Interrupted(run.path, resumable=resumable)))
        raise Interrupted(run.path, resumable=resumable) from None
    except BaseException as e:
        write_outcome(run.path, complete=False, stopped_by=f"error: {type(e).__name__}")
        if tracker is not None:
            background.drain()
            tracker.finish("FAILED", reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    write_outcome(run.path, complete=outcome.complete,
                  stopped_by=outcome.summary.get("stopped_by") if outcome.complete else
                  "interrupted")
    if tracker is not None:
        tracker.finish("FINISHED" if outcome.complete else "KILLED",
                       reason=None if outcome.complete else
                       f"interrupted: continue with `sparse-search resume {run.path}`")
        failure = getattr(tracker, "failure", None) or (
            f"MLflow tracking at {tracker.tracking_uri} went offline" if tracker.offline else None)
        local = not tracker.tracking_uri.startswith(("http://", "https://"))
        note = f"mlflow: {tracker.runs_url or tracker.tracking_uri}"
        if local:
            note += f" (start the UI with `sparse-search ui --backend-store-uri {tracker.tracking_uri}`)"
        outcome = dataclasses.replace(outcome, mlflow_note=None if failure else note,
                                      tracking_error=failure)
    return outcome


class _PendingOnce(logging.Filter):
    """Ray's "No trial is running ... within the last 60 sec" warning, every minute, with
    advice about ScalingConfig: replaced by one line of ours (once per search)."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: Any = None
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        import sys

        from search.resources import pending_line

        if not self.said:
            self.said = True
            print(pending_line(self.plan), file=sys.stderr, flush=True)
        return False


def _pending_once(plan: Any) -> None:
    logger = logging.getLogger("ray.tune.execution.insufficient_resources_manager")
    f = next((f for f in logger.filters if isinstance(f, _PendingOnce)), None)
    if f is None:
        f = _PendingOnce()
        logger.addFilter(f)
    f.plan, f.said = plan, False


def _tracker(spec: SearchSpec, run: RunDir, tracking_uri: str) -> Any:
    """A SearchTracker for this run, not started yet."""
    from search.tracking import SearchTracker

    return SearchTracker(
        tracking_uri, spec.name, run_dir=run.path, spec_dict=spec.to_dict(),
        spec_yaml_text=run.spec.read_text(), search_name=run.path.name,
        objectives={o.metric: o.mode for o in spec.objectives},
        max_params_ref=spec.constraints.max_params,
    )


def _fit(spec: SearchSpec, run: RunDir, splits: Any, *, resuming: bool, tracker: Any,
         background: Any, progress: bool, progress_interval_s: float,
         started_at: float | None = None, plan: Any = None) -> SearchOutcome:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search.background import InBackground
    from search.progress import ProgressCallback, front_table, summary
    from search.results import Recorder
    from search.searcher import ProposerSearcher
    from search.space import SearchSpace
    from trainables.trial import train_trial

    space = SearchSpace(spec, input_shape=splits.input_shape, num_classes=splits.num_classes)
    recorder = Recorder(run, spec, background=background)
    if resuming and tracker is not None and recorder.records:
        # The trials recorded before the kill keep their recorded end (the tracking callback
        # ignores any rerun of them): close the MLflow runs the dead driver left open. The
        # tables are rewritten first, so results.csv holds every recorded trial (the driver may
        # have died between a trial's result.json and the table).
        import pandas as pd

        from search.tracking import close_recorded_trials

        recorder.write_tables()
        background.submit(close_recorded_trials, tracker, run.path, pd.read_csv(run.results_csv))
    searcher = ProposerSearcher(space, journal=run.journal, study_name=spec.name,
                                num_samples=spec.search.num_samples,
                                recorded=recorder.records.keys(),
                                time_budget=spec.search.time_budget, started_at=started_at)
    callbacks: list[Any] = [recorder]  # first: the others read the files it writes
    if progress:
        callbacks.append(ProgressCallback(recorder, searcher, total=spec.search.num_samples,
                                          interval_s=progress_interval_s))
    front = None
    if tracker is not None:
        from search.tracking import TrackingCallback

        front = FrontToTracker(recorder, searcher,
                               TrackingCallback(tracker, recorded=recorder.records.keys()),
                               background)
        callbacks += [InBackground([front.tracking], background), front]
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
    bundle = plan.bundle() if plan is not None else {
        "CPU": spec.resources.cpu, "GPU": spec.resources.gpu, **spec.resources.custom}
    trainable = tune.with_resources(tune.with_parameters(train_trial, splits=splits),
                                    tune.PlacementGroupFactory([bundle]))
    _pending_once(plan)
    with scoped_env(TUNE_ENV):
        _tune(spec, run, resuming=resuming, trainable=trainable, search_alg=search_alg,
              callbacks=callbacks)
    if front is not None:
        front.push(final=True)
    background.drain()
    ended = searcher.stopped_by or ("num_samples" if searcher.exhausted else None)
    complete = searcher.live == 0 and ended is not None
    return SearchOutcome(
        run_dir=run.path, complete=complete,
        summary=summary(run_dir=str(run.path), recorder=recorder, rejected=searcher.rejected,
                        complete=complete, stopped_by=ended if complete else None,
                        wall_s=searcher.spent, duplicates=searcher.duplicates),
        front_table=front_table(recorder.front),
    )


def _tune(spec: SearchSpec, run: RunDir, *, resuming: bool, trainable: Any, search_alg: Any,
          callbacks: list[Any]) -> None:
    """Build (or restore) the Tuner and run it to the end."""
    from ray import tune

    if resuming:
        tuner = tune.Tuner.restore(str(run.experiment), trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        _replace_restored(tuner, search_alg=search_alg, callbacks=callbacks)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=search_alg, scheduler=make_scheduler(spec),
                num_samples=spec.search.num_samples, reuse_actors=True,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=EXPERIMENT_NAME, storage_path=str(run.path), verbose=0,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                # The trainable saves a checkpoint per epoch; keep the last two. Ray then forces
                # an experiment snapshot every second checkpoint of a trial (so a snapshot never
                # points at a deleted one): resume loses at most ~2 epochs per trial.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    tuner.fit()


def _replace_restored(tuner: Any, *, search_alg: Any, callbacks: list[Any]) -> None:
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


def make_scheduler(spec: SearchSpec) -> Any:
    """ASHA on the first trained objective (its own single metric), multi-objective ASHA on
    all of them (``moasha``), or None (FIFO).

    ``time_attr`` is the trainable's ``epoch``, which keeps counting across pruning rounds, and
    ``max_t`` the most epochs any trial of the space can run, so ASHA never cuts a
    lottery-ticket trial at the end of its dense phase.
    """
    es = spec.search.early_stopping
    if es is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    from search.spec import TRAINED_METRICS

    if es.scheduler == "moasha":
        from search.moasha import MultiObjectiveASHA

        return MultiObjectiveASHA(objectives=[(o.metric, o.mode) for o in spec.objectives],
                                  time_attr="epoch", max_t=max_epochs(spec),
                                  grace_period=es.grace_epochs,
                                  reduction_factor=es.reduction_factor)
    objective = next(o for o in spec.objectives if o.metric in TRAINED_METRICS)
    return ASHAScheduler(time_attr="epoch", metric=objective.metric, mode=objective.mode,
                         max_t=max_epochs(spec), grace_period=es.grace_epochs,
                         reduction_factor=es.reduction_factor)


def max_epochs(spec: SearchSpec) -> int:
    """Epochs of the longest possible trial: max epochs x (max prune_rounds + 1)."""
    from search.spec import possible_values
    from trainables.train import TrainConfig

    default = TrainConfig()
    epochs = max(possible_values(spec.train.get("epochs", default.epochs)))
    rounds = max(possible_values(spec.train.get("prune_rounds", default.prune_rounds)))
    return int(epochs) * (int(rounds) + 1)


def trial_name(trial: Trial) -> str:
    """``trial_<key>``: short folder and display names (Ray's default lists every param)."""
    from search.results import TRIAL_KEY

    return f"trial_{trial.config.get(TRIAL_KEY, trial.trial_id)}"


# ---------------------------------------------------------------------- MLflow front
def _tracker_rows(recorder: Recorder) -> Any:
    import pandas as pd

    cols = ["trial_key", "val_accuracy", "val_accuracy_se", "val_loss", "test_accuracy",
            "nonzero_params", "macs", "arch", "prune_round"]
    return pd.DataFrame([{c: p.get(c, math.nan) for c in cols} for p in recorder.df_rows()],
                        columns=cols)


class FrontToTracker(Callback):
    """After each finished trial: the front and the counters to MLflow (in the background).

    The rows are taken now, in the driver loop (cheap); the MLflow calls are queued behind the
    trial's own tracking calls, so its child run is closed first.
    """

    def __init__(self, recorder: Recorder, searcher: ProposerSearcher, tracking: Any,
                 background: Any) -> None:
        self.recorder, self.searcher = recorder, searcher
        self.tracking, self.background = tracking, background

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.push()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.push()

    def push(self, *, final: bool = False) -> None:
        c = self.recorder.counts()
        counters = {"trials_finished": c["finished"], "trials_failed": c["failed"],
                    "trials_early_stopped": c["early_stopped"],
                    "proposals_rejected": self.searcher.rejected}
        self.background.submit(self._update, _tracker_rows(self.recorder),
                               [p["trial_key"] for p in self.recorder.front],
                               step=c["finished"], counters=counters, final=final)

    def _update(self, rows: Any, front_keys: list[str], **kwargs: Any) -> None:
        self.tracking.tracker.update_front(rows, front_keys, **kwargs)


# ---------------------------------------------------------------------- CLI output
def report(outcome: SearchOutcome, *, as_json: bool, echo: Any = print) -> int:
    """Print the front (and the --json line last); the exit code: 0 a complete search, 130
    interrupted (resumable), 1 every trial failed or MLflow tracking failed (the results are
    in the run dir; ``sync`` uploads them)."""
    import json
    import sys

    echo(outcome.front_table)
    echo(f"run dir: {outcome.run_dir}")
    if outcome.mlflow_note:
        echo(outcome.mlflow_note)
    code = 0
    s = outcome.summary
    if not outcome.complete:
        print(f"interrupted: continue with `sparse-search resume {outcome.run_dir}`",
              file=sys.stderr)
        code = 130
    elif s.get("failed") and s.get("failed") == s.get("trials"):
        print(f"error: every trial failed ({s['failed']}): see the error column of "
              f"{outcome.run_dir / 'results.csv'}", file=sys.stderr)
        code = 1
    if outcome.tracking_error:
        print(f"error: {outcome.tracking_error}; the results are in {outcome.run_dir}: upload "
              f"them with `sparse-search sync {outcome.run_dir}`", file=sys.stderr)
        code = code or 1
    if as_json:
        echo(json.dumps(outcome.summary))
    return code


def dry_run_report(spec: SearchSpec, n: int, *, as_json: bool, echo: Any = print) -> None:
    """Sample ``n`` feasible configs (nothing trained): histogram text, or one JSON line."""
    import json

    from search.space import dry_run
    from trainables.data import fixed_shape, probe_dataset

    # Fixed-shape datasets need no data at all; others are probed (no pixels read).
    shape = fixed_shape(spec.data) or probe_dataset(spec.data)
    result = dry_run(spec, n, input_shape=shape[0], num_classes=shape[1])
    if not as_json:
        echo(result.text())
        return
    echo(json.dumps({
        "feasible": len(result.proposals), "rejected": result.rejected,
        "asked": result.asked, "exhausted": result.exhausted,
        "feasible_fraction": result.feasible_fraction, "ms_per_screen": result.ms_per_screen,
        "proposals": [{"nonzero_params": p.screened_params,
                       "macs": p.accounting.macs if p.accounting else None,
                       "arch": str(p.arch)} for p in result.proposals],
    }))

