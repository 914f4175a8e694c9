"""After the fact: bring MLflow in line with a run directory (``sparse-search sync``, ``resume``).

Reads only the run dir's files (search/rundir/layout.py names them) and drives a :class:`SearchTracker`
through its public methods: a child run is created, finalized or closed as the files say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from search.errors import UserError
from search.rundir.layout import (
    ARCH_YAML,
    LAYERS_JSON,
    MODEL_FILE,
    PARETO_FILE,
    RESULT_JSON,
    RESULTS_FILE,
    SPEC_FILE,
    TRIALS_DIR,
    RunDir,
    read_outcome,
)
from search.rundir.storage import attach, is_uri
from search.tracking.store import (
    DEFAULT_EXPERIMENT,
    STATE_FILE,
    TAG_FAILURE,
    TERMINAL,
    check_reachable,
    read_state,
    resolve_tracking_uri,
)
from search.tracking.tracker import SearchTracker

# results.csv statuses (search/rundir/results.py writes Ray's) -> MLflow's; others (RUNNING...) -> KILLED
_STATUS_MAP = {"TERMINATED": "FINISHED", "EARLY_STOPPED": "FINISHED", "FINISHED": "FINISHED",
               "ERROR": "FAILED", "FAILED": "FAILED"}
_NOT_METRICS = ("trial_key", "status", "error", "arch")


def sync_run_dir(run_dir: str | Path, tracking_uri: str | None = None, *,
                 location: str | None = None) -> dict[str, int]:
    """Bring MLflow in line with a run directory; idempotent (a second call changes nothing).

    Creates the parent/children MLflow never got, logs final metrics, artifacts and front
    models that did not arrive (the tracker went offline, the driver was killed), closes runs
    a killed driver left RUNNING (trials as KILLED unless results.csv says how they ended; the
    search as outcome.json says, see :func:`sync_end`) and refreshes the Pareto tags and plots.
    The URI and experiment default to the ones the search used (run_dir/mlflow.json, else the
    experiment is spec.yaml's ``name``). Returns counts: trials, created, finalized, closed.

    Reads results.csv (trial_key, status, error, flat ``arch/``/``train/`` config, metric
    columns), ``trials/<key>/result.json`` (final metrics under ``metrics``), ``arch.yaml``,
    ``layers.json``, ``model.pt`` and pareto.csv (the front's trial keys). A run dir on a
    storage URI is downloaded into a fresh local copy, synced, and its mlflow.json copied back.
    """
    if is_uri(run_dir):
        run = RunDir.fetch(run_dir, needed=())
        mirror = attach(run)
        try:
            counts = sync_run_dir(run.path, tracking_uri, location=str(run_dir))
        finally:
            error = mirror.close() if mirror is not None else None
        if error:
            raise UserError(error)
        return counts
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    results_csv = run_dir / RESULTS_FILE
    if not results_csv.is_file() and not (run_dir / STATE_FILE).is_file():
        raise UserError(f"{run_dir} is not a search run directory: no results.csv or {STATE_FILE}")
    state = read_state(run_dir)
    uri = tracking_uri or state.get("tracking_uri") or resolve_tracking_uri(None)
    check_reachable(uri)
    spec_path = run_dir / SPEC_FILE
    spec_text = spec_path.read_text() if spec_path.is_file() else ""
    spec_dict = yaml.safe_load(spec_text) or {}
    if not isinstance(spec_dict, dict):
        spec_dict = {}
    # The experiment the search itself used (the spec's name, see search/run/tuner.py _tracker).
    experiment = state.get("experiment") or spec_dict.get("name") or DEFAULT_EXPERIMENT
    tracker = SearchTracker(
        uri, str(experiment), run_dir=run_dir, location=location or state.get("location"),
        spec_dict=spec_dict, spec_yaml_text=spec_text,
        search_name=state.get("search_name") or str(spec_dict.get("name") or run_dir.name),
        objectives=state.get("objectives") or spec_dict.get("objectives"),
        max_params_ref=state.get("max_params_ref"), front_interval_s=0.0,
        ui_url=state.get("ui_url"), strict=True,
    ).start(resume=True)
    df = pd.read_csv(results_csv) if results_csv.is_file() else pd.DataFrame(columns=["trial_key"])
    counts = {"trials": len(df), **close_recorded_trials(tracker, run_dir, df)}
    counts["closed"] += len(tracker.running_children())
    pareto_csv = run_dir / PARETO_FILE
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
        trial_dir = run_dir / TRIALS_DIR / key
        arch = (ArchConfig.load(trial_dir / ARCH_YAML) if (trial_dir / ARCH_YAML).is_file()
                else ArchConfig.from_flat(rec))
        if tracker.child_run_id(key) is None:
            flat = {k: v for k, v in rec.items() if k.startswith(("arch/", "train/"))}
            initial = rec.get("initial")
            tracker.ensure_child(key, arch, flat, str(initial) if initial else None)
            counts["created"] += 1
        status = _STATUS_MAP.get(str(rec.get("status", "")).upper(), "KILLED")
        if tracker.has_final(key) and tracker.child_status(key) != "RUNNING":
            continue
        if tracker.has_final(key):  # metrics arrived, the end status did not
            tracker.mark_terminated(key, status)
            counts["closed"] += 1
            continue
        saved = _read_json(trial_dir / RESULT_JSON) or {}
        final = saved.get("metrics") if isinstance(saved.get("metrics"), dict) else {
            k: v for k, v in rec.items()
            if k not in _NOT_METRICS and not k.startswith(("arch/", "train/", "meta/"))}
        error = rec.get("error")
        if status == "KILLED" and not error:
            error = f"the search driver stopped before this trial ended (status {rec.get('status')})"
        tracker.trial_finished(
            key, final, status=status, error=error, layers=_read_json(trial_dir / LAYERS_JSON),
            model_path=trial_dir / MODEL_FILE if (trial_dir / MODEL_FILE).is_file() else None,
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
