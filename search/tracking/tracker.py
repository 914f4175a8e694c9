"""SearchTracker: one MLflow parent run per search, one nested child run per trial.

See the package docstring (:mod:`search.tracking`) for how the tuner drives it and what lands
where.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
import yaml

from search.rundir.layout import MODEL_FILE, SPEC_FILE, TRIALS_DIR
from search.space.latency import latency_tags
from search.tracking.models import FrontModels, upload_weights
from search.tracking.plots import front_metrics, front_table, rank_trials, write_front_files
from search.tracking.store import (
    DEFAULT_OBJECTIVES,
    STATE_FILE,
    TAG_FAILURE,
    TAG_FINAL,
    TAG_INITIAL,
    TAG_MODEL,
    TAG_NODE,
    TAG_ON_FRONT,
    TAG_PARENT,
    TAG_RANK,
    TAG_ROLE,
    TAG_RUN_DIR,
    TAG_TRIAL_KEY,
    TERMINAL,
    client_for,
    ensure_experiment,
    failure_reason,
    find_parent,
    flatten,
    log_metrics,
    log_params,
    log_tags,
    log_trial_files,
    numeric,
    run_url,
    search_all,
    source_tags,
    ui_base,
    write_state,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from trainables.arch import ArchConfig

log = logging.getLogger("sparse_search.tracking")

LIVE: dict[str, SearchTracker] = {}  # run dir -> the started tracker of this process

T = TypeVar("T")


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
    """Records one search in MLflow; see the package docstring for the calls and what they log.

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
        location: str | None = None,  # what users see: the storage URI, else the path
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
        self.run_dir = Path(run_dir).resolve()  # local (a URI's run dir: its local copy)
        self.location = location or str(self.run_dir)
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
        self._logged: FrontModels | None = None  # the front's MLflow logged models (push_front)
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
            # only when it differs: a local search's callback pickles as before (tuner.pkl)
            **({"location": self.location} if self.location != str(self.run_dir) else {}),
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
            LIVE[str(self.run_dir)] = self
            atexit.register(self._at_exit)
        return self

    @_tracked
    def _start(self, resume: bool) -> None:
        client = self.client
        self.experiment_id = ensure_experiment(client, self.experiment)
        parent = find_parent(client, run_dir=self.run_dir, tracking_uri=self.tracking_uri,
                             experiment_id=self.experiment_id,
                             location=self.location) if resume else None
        if parent is not None:
            self.experiment_id = parent.info.experiment_id
            self.parent_run_id = parent.info.run_id
            self.parent_status_at_start = parent.info.status
            if parent.info.status != "RUNNING":
                client.update_run(self.parent_run_id, status="RUNNING")
            self._load_children()
        else:
            self._create_parent()
        self._write_state()

    def _create_parent(self) -> None:
        tags = {
            TAG_ROLE: "search",
            TAG_RUN_DIR: self.location,
            "sparse_search.search_name": self.search_name,
            "sparse_search.spec_name": str(self.spec_dict.get("name", self.search_name)),
            "mlflow.source.name": "sparse-search",
            "mlflow.source.type": "LOCAL",
            "mlflow.note.content": (
                f"sparse-search `{self.search_name}` (run dir `{self.location}`): one child run per "
                "trial; the Pareto front is tagged `on_front=true` and drawn in the artifacts "
                "pareto.html / pareto.png / pareto.csv."
            ),
            **source_tags(),
        }
        run = self.client.create_run(self.experiment_id, run_name=self.search_name, tags=tags)
        self.parent_run_id = run.info.run_id
        log_params(self.client, self.parent_run_id, flatten(self.spec_dict))
        self.client.log_text(self.parent_run_id, self.spec_yaml_text, SPEC_FILE)
        resolved = json.loads(json.dumps(self.spec_dict, default=str))  # tuples, paths -> plain
        self.client.log_text(self.parent_run_id, yaml.safe_dump(resolved, sort_keys=False),
                             "spec_resolved.yaml")

    def _load_children(self) -> None:
        runs = search_all(self.client, [self.experiment_id],
                          f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'")
        for run in runs:
            tags = run.data.tags
            key = tags.get(TAG_TRIAL_KEY)
            if key is None or tags.get(TAG_ROLE, "trial") != "trial":  # finalize's runs too
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
        write_state(self.run_dir, {
            "tracking_uri": self.tracking_uri, "experiment": self.experiment,
            "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
            "search_name": self.search_name, "objectives": self.objectives,
            "max_params_ref": self.max_params_ref, "ui_url": self.ui_url,
            "location": self.location,
        })

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
                   f"in {self.run_dir}: upload them later with `sparse-search sync {self.location}`")
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

    # ------------------------------------------------------------------ child runs (sync)
    def child_run_id(self, trial_key: str) -> str | None:
        """The trial's child run id (None: MLflow has no run for it yet)."""
        return self._children.get(trial_key)

    def child_status(self, trial_key: str) -> str | None:
        """The child run's status as last set or read (RUNNING, FINISHED, FAILED, KILLED)."""
        return self._status.get(trial_key)

    def has_final(self, trial_key: str) -> bool:
        """Whether the child run holds the trial's final metrics (tag sparse_search.final)."""
        return trial_key in self._final

    def running_children(self) -> list[str]:
        """Trial keys whose child run is RUNNING, in the order their runs were made or read."""
        return [key for key in self._children if self._status.get(key) == "RUNNING"]

    def mark_terminated(self, trial_key: str, status: str) -> None:
        """End the trial's child run with ``status`` (an MLflow error raises)."""
        self.client.set_terminated(self._children[trial_key], status)
        self._status[trial_key] = status

    # ------------------------------------------------------------------ trials
    @_tracked
    def trial_started(self, trial_key: str, arch: ArchConfig, flat_config: Mapping[str, Any],
                      *, initial: str | None = None) -> str:
        """A child run for the trial (an existing one with this key is reused); its run id.
        ``initial``: the label of the search.initial entry it trains (a tag)."""
        run_id = self.ensure_child(trial_key, arch, flat_config, initial)
        if self._status.get(trial_key) != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
            self._status[trial_key] = "RUNNING"
            self._final.discard(trial_key)
        return run_id

    def ensure_child(self, trial_key: str, arch: ArchConfig, flat_config: Mapping[str, Any],
                     initial: str | None = None) -> str:
        """The trial's child run id, created (RUNNING, ``flat_config`` as params) if missing.

        Unlike the ``trial_*`` calls an MLflow error raises (``sync`` and ``resume`` call it)."""
        self._archs[trial_key] = arch
        if trial_key in self._children:
            return self._children[trial_key]
        name = arch.canonical()
        tags = {
            TAG_PARENT: self.parent_run_id, TAG_ROLE: "trial", TAG_TRIAL_KEY: trial_key,
            "sparse_search.arch_key": arch.key(), "mlflow.source.name": "sparse-search",
            **({TAG_INITIAL: initial} if initial is not None else {}), **latency_tags(flat_config),
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self._children[trial_key] = run_id
        self._status[trial_key] = "RUNNING"
        self._names[trial_key] = name
        log_params(self.client, run_id, flat_config)
        return run_id

    @_tracked
    def trial_result(self, trial_key: str, metrics: Mapping[str, Any], step: int) -> None:
        """One report (an epoch) of a trial: its numeric metrics in one log_batch."""
        run_id = self._children.get(trial_key)
        if run_id is not None:
            log_metrics(self.client, run_id, numeric(metrics), step)

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
        if (run_id := self._children.get(trial_key)) is None:
            return
        node = final_metrics.get("node_id")  # the Ray node that ran it (results.csv's node)
        tags = {TAG_FINAL: "true", **({TAG_NODE: str(node)} if node else {})}
        if error:
            tags[TAG_FAILURE] = failure_reason(error)
        metrics = numeric(final_metrics)
        step = int(metrics.get("epoch", 0))
        log_metrics(self.client, run_id, metrics, step, tags=tags)
        log_trial_files(self.client, run_id, error=error if error and len(error) > len(
            tags[TAG_FAILURE]) else None, arch=arch or self._archs.get(trial_key), layers=layers)
        if model_path is not None:
            self._models[trial_key] = Path(model_path)
        self.mark_terminated(trial_key, status)
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
        return rank_trials(df_all, self.objectives)

    def _log_front_metrics(self, ranked: pd.DataFrame, front: set[str], step: int | None,
                           counters: dict[str, float]) -> None:
        if step is None:
            step = int(counters.get("trials_finished", len(ranked)))
        values = front_metrics(ranked, front, counters, max_params_ref=self.max_params_ref)
        log_metrics(self.client, self.parent_run_id, numeric(values), step)

    @_tracked
    def push_front(self) -> None:
        """Send the pending front now: child tags that changed, front weights, the logged models
        (search/tracking/models.py), the plots."""
        if self._pending is None:
            return
        ranked, front = self._pending
        for row in ranked.itertuples(index=False):
            key = row.trial_key
            tags = (str(int(row.pareto_rank)), "true" if key in front else "false")
            run_id = self._children.get(key)
            if run_id is not None and self._front_tags.get(key) != tags:
                log_tags(self.client, run_id, {TAG_RANK: tags[0], TAG_ON_FRONT: tags[1]})
                self._front_tags[key] = tags
        for key in sorted(front - self._uploaded):
            self._upload_model(key)
        if self._logged is None:  # the search's logged models, read from the store once
            self._logged = FrontModels(self.client, experiment_id=self.experiment_id,
                                       parent_run_id=self.parent_run_id, run_dir=self.run_dir,
                                       search_name=self.search_name, objectives=self.objectives)
        self._logged.update(ranked, front, self._children, self._models)
        self._upload_plots(ranked, front)
        self._pending = None
        self._last_push = time.monotonic()

    def _upload_model(self, key: str) -> None:
        run_id = self._children.get(key)
        path = self._models.get(key) or self.run_dir / TRIALS_DIR / key / MODEL_FILE
        if run_id is not None and upload_weights(self.client, run_id, path):
            self._uploaded.add(key)

    def _upload_plots(self, ranked: pd.DataFrame, front: set[str]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_front_files(self.front_table(ranked, front), Path(tmp),
                                          objectives=self.objectives, title=self.search_name):
                self.client.log_artifact(self.parent_run_id, str(path))

    def front_table(self, ranked: pd.DataFrame, front: set[str]) -> pd.DataFrame:
        """Every ranked trial with its run id, UI link, arch string and ``on_front`` flag."""
        return front_table(ranked, front, objectives=self.objectives, names=self._names,
                           run_ids=self._children, ui_url=self.ui_url,
                           experiment_id=self.experiment_id)

    # ------------------------------------------------------------------ end
    def finish(self, status: str = "FINISHED", *, reason: str | None = None) -> None:
        """Push the last front, close children still RUNNING, then the parent run."""
        if status not in TERMINAL:
            raise ValueError(f"{status=} must be one of {', '.join(TERMINAL)}")
        self._finish(status, reason)
        self.finished = True
        LIVE.pop(str(self.run_dir), None)
        atexit.unregister(self._at_exit)

    @_tracked
    def _finish(self, status: str, reason: str | None) -> None:
        self.push_front()
        child_status = "FAILED" if status == "FAILED" else "KILLED"
        why = reason or f"the search ended ({status}) before this trial reported its end"
        for key in self.running_children():
            log_tags(self.client, self._children[key], {TAG_FAILURE: why[:500]})
            self.mark_terminated(key, child_status)
        if reason:
            log_tags(self.client, self.parent_run_id, {TAG_FAILURE: reason[:500]})
        self.client.set_terminated(self.parent_run_id, status)
