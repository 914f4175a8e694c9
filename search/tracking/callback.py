"""The Ray Tune callback: ``TrackingCallback(tracker)`` feeds a SearchTracker from the driver.

Ray pickles callbacks into the run dir's ``ray/tuner.pkl``, naming the class by its module and
name: ``search.tracking.TrackingCallback`` (so the class says, whichever file defines it), a
path that runs recorded before ``search/tracking/`` was a package also hold. Keep that path
importable, or old run dirs no longer resume. The class subclasses ``ray.tune.Callback`` and
importing ray costs seconds: it is built on first use (:func:`tracking_callback_class`), so
``pareto``/``sync``/``export`` never import ray.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from search.rundir.layout import LAYERS_JSON, MODEL_FILE, TRIALS_DIR
from search.tracking.tracker import LIVE, SearchTracker

PICKLE_MODULE = "search.tracking"  # the module pickles name the callback classes by
_CLASS: list[type] = []  # the built TrackingCallback (one class per process)


class TrackingCallbackMixin:
    """Ray Tune callback feeding a SearchTracker from the driver (``TrackingCallback(tracker)``).

    The trial key is the config's ``meta/trial_key`` (Ray's trial id when absent). On
    completion, ``run_dir/trials/<key>/{layers.json,model.pt}`` are attached when present, so
    place this callback after the one that writes them. Ray pickles callbacks with the
    experiment (tuner.pkl): only the tracker's arguments travel, and an unpickled callback
    uses the started tracker of the same run dir in this process, or starts one (resume).
    """

    __module__ = PICKLE_MODULE

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
            live = LIVE.get(self._args["run_dir"])
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
        trial_dir = self.tracker.run_dir / TRIALS_DIR / key
        layers = None
        if (trial_dir / LAYERS_JSON).is_file():
            try:
                layers = json.loads((trial_dir / LAYERS_JSON).read_text())
            except ValueError:
                layers = None
        model = trial_dir / MODEL_FILE
        self.tracker.trial_finished(key, trial.last_result or {}, status=status, error=error,
                                    layers=layers, model_path=model if model.is_file() else None)


def tracking_callback_class() -> type:
    """``TrackingCallback``: the mixin on ``ray.tune.Callback``, built once per process."""
    if not _CLASS:
        from ray.tune import Callback

        _CLASS.append(type("TrackingCallback", (TrackingCallbackMixin, Callback),
                           {"__module__": PICKLE_MODULE, "__doc__": TrackingCallbackMixin.__doc__}))
    return _CLASS[0]


def __getattr__(name: str) -> Any:
    if name == "TrackingCallback":
        return tracking_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
