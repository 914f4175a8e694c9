"""Build (or restore) the Ray Tune run of a search and run it to the end.

``fit``: the dataset via the object store, the ProposerSearcher in a ConcurrencyLimiter, ASHA /
multi-objective ASHA / FIFO, the per-trial placement bundle, reused actors, and the callbacks
(Recorder first, progress line, MLflow in the background). What keeps the per-trial overhead
small (2 CPU cores here): actors are reused across trials (a fresh worker costs ~2 s: process
start + torch import), Ray's per-result CSV/JSON/TensorBoard loggers are off (the Recorder
keeps what matters), and everything slow in the driver (MLflow calls, per-layer accounting of
finished models) runs on one background thread (:mod:`search.run.background`), never inside
Tune's event loop. The lifecycle around it (checks, run dir, MLflow, exit codes) is
:mod:`search.run.driver`.

``FrontToTracker`` is pickled into every run dir's tuner.pkl: it stays importable here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from search.pickled import public
from search.run import ray_compat
from search.run.outcome import SearchOutcome
from search.run.ray_runtime import (  # noqa: F401 (re-exported: the names callers knew here)
    LOCAL_ENV,
    QUIET_ENV,
    START_ENV,
    TUNE_ENV,
    init_ray,
    quiet_logging,
    scoped_env,
)
from search.rundir.layout import EXPERIMENT_NAME, RunDir

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from search.run.searcher import ProposerSearcher
    from search.rundir.results import Recorder
    from search.spec import EarlyStopping, Objective, SearchSpec

log = logging.getLogger("sparse_search.tuner")


class _PendingOnce(logging.Filter):
    """Ray's "No trial is running ... within the last 60 sec" warning, every minute, with
    advice about ScalingConfig: replaced by one line of ours (once per search)."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: Any = None
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        from search.run.resources import pending_line

        if not self.said:
            self.said = True
            print(pending_line(self.plan), file=sys.stderr, flush=True)
        return False


def _pending_once(plan: Any) -> None:
    logger = logging.getLogger(ray_compat.INSUFFICIENT_RESOURCES_LOGGER)
    f = next((f for f in logger.filters if isinstance(f, _PendingOnce)), None)
    if f is None:
        f = _PendingOnce()
        logger.addFilter(f)
    f.plan, f.said = plan, False


def fit(spec: SearchSpec, run: RunDir, splits: Any, *, resuming: bool, tracker: Any,
         background: Any, progress: bool, progress_interval_s: float,
         started_at: float | None = None, plan: Any = None,
         extend_s: float | None = None) -> SearchOutcome:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search.run.background import InBackground
    from search.run.searcher import ProposerSearcher
    from search.rundir.progress import ProgressCallback, front_table, summary
    from search.rundir.results import Recorder
    from search.space import SearchSpace
    from trainables.trial import train_trial

    space = SearchSpace(spec, input_shape=splits.input_shape, num_classes=splits.num_classes)
    recorder = Recorder(run, spec.objectives, budgets=spec.constraints.limits(),
                        background=background)
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
                                time_budget=spec.search.time_budget, started_at=started_at,
                                extend_s=extend_s)
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
    outstanding = spec.search.max_concurrent if plan is None else plan.outstanding(
        spec.search.max_concurrent, time_budget=spec.search.time_budget or extend_s)
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=outstanding)
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
        front_table=front_table(recorder.front, [o.metric for o in spec.objectives]),
    )


def _tune(spec: SearchSpec, run: RunDir, *, resuming: bool, trainable: Any, search_alg: Any,
          callbacks: list[Any]) -> None:
    """Build (or restore) the Tuner and run it to the end."""
    from ray import tune

    from search.rundir.storage_tune import snapshot_callbacks

    callbacks = [*callbacks, *snapshot_callbacks(run)]  # a run dir on a URI: pushed first
    if resuming and not ray_compat.snapshot_readable(run.tune_experiment):
        # Cut short by a full disk (Ray writes it in place): Tune starts afresh, as below; the
        # trials recorded are kept, those that were in flight train again under new keys.
        print(f"note: Ray Tune's experiment snapshot in {run.tune_experiment} is cut short (the "
              "disk filled while Ray wrote it): Tune starts afresh; the trials recorded are "
              "kept, those that were running train again as new trials", file=sys.stderr)
        _restore_searcher(search_alg, run.tune_experiment)
        resuming = False
    elif resuming and not ray_compat.snapshot_has_trials(run.tune_experiment):
        # Stopped before its first trial: Ray cannot restore that, so Tune starts afresh in
        # the same experiment folder, and the searcher takes back its own snapshot (the time
        # spent, the trials it handed out).
        _restore_searcher(search_alg, run.tune_experiment)
        resuming = False
    if resuming:
        tuner = tune.Tuner.restore(run.tune_experiment, trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        from search.run.searcher import ForgetLostTrials

        ray_compat.replace_restored(tuner, search_alg=search_alg,
                                    callbacks=[ForgetLostTrials(search_alg), *callbacks])
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=search_alg, scheduler=make_scheduler(
                    spec.search.early_stopping, spec.objectives, max_t=max_epochs(spec.train)),
                # The searcher ends the search at num_samples (over resumes); Tune's own
                # count is restored from a separate file (ray_compat.searcher_decides_the_end).
                num_samples=-1, reuse_actors=True,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=EXPERIMENT_NAME, storage_path=run.tune_storage, verbose=0,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                # The trainable saves a checkpoint per epoch; keep the last two, and snapshot
                # the experiment after each (ray_compat.snapshot_every_trial_checkpoint: Ray's
                # own every-second-checkpoint snapshot can name a deleted one): a resume loses
                # at most an epoch per trial.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    with ray_compat.snapshot_every_trial_checkpoint(), (  # a SIGKILL never loses a trial
            ray_compat.searcher_decides_the_end() if resuming else contextlib.nullcontext()):
        tuner.fit()


def _restore_searcher(search_alg: Any, experiment: str) -> None:
    """``search_alg`` restored from the experiment's newest searcher snapshot, if any."""
    import tempfile
    from pathlib import Path

    from ray.tune.search import Searcher

    state = ray_compat.newest_snapshot(experiment, Searcher.CKPT_FILE_TMPL)
    if state is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "searcher-state.pkl"
        path.write_bytes(state)
        try:
            search_alg.restore(str(path))
        except (EOFError, pickle.UnpicklingError, ValueError):
            return  # cut short too: the recorded trials alone count towards num_samples
    # No Ray trial comes back in a Tune started afresh: the trials the snapshot held as
    # running never end, so their places are handed back (their Optuna trials told FAIL).
    search_alg.searcher.forget_lost(())


def make_scheduler(early_stopping: EarlyStopping | None, objectives: Sequence[Objective],
                   *, max_t: int) -> Any:
    """ASHA on the first trained objective (its own single metric), multi-objective ASHA on
    all of them (``moasha``), or None (FIFO): the spec's ``search.early_stopping`` section, its
    objectives and ``max_t`` (:func:`max_epochs`) are all it reads.

    ``time_attr`` is the trainable's ``epoch``, which keeps counting across pruning rounds, and
    ``max_t`` the most epochs any trial of the space can run, so ASHA never cuts a
    lottery-ticket trial at the end of its dense phase. An objective measured only after
    training (``int8_accuracy``) is ranked at rungs by its proxy (``val_accuracy``,
    search/schema.py ``rung_metric``); the searcher and the front get the final value.
    """
    es = early_stopping
    if es is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    from search.schema import rung_metric
    from search.spec import TRAINED_METRICS

    if es.scheduler == "moasha":
        from search.run.moasha import MultiObjectiveASHA

        return MultiObjectiveASHA(objectives=[(o.metric, o.mode) for o in objectives],
                                  time_attr="epoch", max_t=max_t, grace_period=es.grace_epochs,
                                  reduction_factor=es.reduction_factor)
    objective = next(o for o in objectives if o.metric in TRAINED_METRICS)
    return ASHAScheduler(time_attr="epoch", metric=rung_metric(objective.metric), mode=objective.mode,
                         max_t=max_t, grace_period=es.grace_epochs,
                         reduction_factor=es.reduction_factor)


def max_epochs(train: Mapping[str, Any]) -> int:
    """Epochs of the longest possible trial of the spec's ``train`` section (fixed or searched
    values): max epochs x (max prune_rounds + 1)."""
    from search.spec import possible_values
    from trainables.train import TrainConfig

    default = TrainConfig()
    epochs = max(possible_values(train.get("epochs", default.epochs)))
    rounds = max(possible_values(train.get("prune_rounds", default.prune_rounds)))
    return int(epochs) * (int(rounds) + 1)


@public("search.run")
def trial_name(trial: Trial) -> str:
    """``trial_<key>``: short folder and display names (Ray's default lists every param); a
    lamarckian child finds its parent's checkpoints by it (trainables.trial.parent_state)."""
    from search.schema import TRIAL_KEY
    from trainables.trial import trial_dirname

    return trial_dirname(str(trial.config.get(TRIAL_KEY, trial.trial_id)))


# ---------------------------------------------------------------------- MLflow front
def _tracker_rows(recorder: Recorder) -> Any:
    import pandas as pd

    from search.schema import FRONT_COLUMNS

    cols = list(FRONT_COLUMNS)
    return pd.DataFrame([{c: p.get(c, math.nan) for c in cols} for p in recorder.df_rows()],
                        columns=cols)


@public("search.run")
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


