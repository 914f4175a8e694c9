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
  version/git tags, ``sparse_search.objectives`` (the spec's, in order); metrics
  ``hypervolume``, ``front_size`` and the counters stepped by trials finished; artifacts
  ``pareto.csv``, ``pareto.png``, ``pareto.html`` and one ``pareto-<y>-vs-<x>.png`` per pair
  of objectives (refreshed at most every ``front_interval_s`` seconds, and at the end).
- child run per trial (named by ``ArchConfig.canonical()``, tag ``sparse_search.trial_key``):
  flat config as params, per-epoch metrics (one ``log_batch`` per report), final metrics,
  ``arch.yaml`` and ``layers.json``; tags ``pareto_rank``/``on_front`` kept current and
  ``failure_reason`` for failed or killed trials.
- model weights (``model.pt``) are uploaded for Pareto-front members only, at each front
  refresh: a search trains hundreds of models and only the front is worth exporting; every
  trial's weights stay in ``run_dir/trials/<key>/model.pt``.
- logged model per front member (the experiment's Models tab, ``model_type``
  ``sparse-search-front``, source run = its child run): pareto.csv's metrics, the arch as
  params and arch.yaml, an MLflow ONNX model (fp32 ``model.onnx``), ``model-int8.onnx`` when
  measured, the tensor-only ``model.pt``; registrable with ``mlflow.register_model``. One that
  leaves the front is kept, tagged ``on_front=false`` (search/tracking/models.py).

Which module owns what (each imports only those above it; none imports ray at import time)::

    store.py     the store: URI resolution, reachability, the sqlite store lock and
                 half-migration check, client_for, experiments, paged search, the parent
                 and latest search runs, mlflow.json, the tag names, batched writes
    plots.py     the front's ranks, metrics, table, pareto.png, the per-pair pictures and
                 pareto.html (pure)
    models.py    FrontModels: the front members as MLflow logged models
    tracker.py   SearchTracker: the parent run, child runs, front refreshes, the end
    callback.py  TrackingCallback, the Ray Tune callback (pickled into tuner.pkl as
                 ``search.tracking.TrackingCallback``: that path must keep importing)
    sync.py      ``sparse-search sync`` / resume: MLflow brought in line with a run dir
    front.py     the front read back from the store (``sparse-search pareto``)
    server.py    a light ``mlflow server``: start, wait until healthy, stop (``ui``)

Every public name is re-exported here: import from ``search.tracking``.
"""

from __future__ import annotations

from typing import Any

from search.tracking.callback import TrackingCallbackMixin, tracking_callback_class
from search.tracking.front import format_front, front_from_store, search_objectives
from search.tracking.models import TAG_OBJECTIVES, FrontModels
from search.tracking.plots import objective_pairs, pair_file, render_html, render_png
from search.tracking.server import (
    serve_ui,
    start_light_server,
    stop_server,
    stop_with_parent,
    wait_healthy,
)

# The store's vocabulary and helpers, every name of store.__all__.
from search.tracking.store import *  # noqa: F403
from search.tracking.store import __all__ as _store_names
from search.tracking.sync import close_recorded_trials, sync_end, sync_run_dir
from search.tracking.tracker import SearchTracker

# The mixin under the name earlier pickles gave it (search.tracking._TrackingCallbackMixin).
_TrackingCallbackMixin = TrackingCallbackMixin

__all__ = [
    *_store_names,
    "TAG_OBJECTIVES",
    "FrontModels",
    "SearchTracker",
    "TrackingCallback",  # noqa: F405  (built on first use: see __getattr__ below)
    "close_recorded_trials",
    "format_front",
    "front_from_store",
    "objective_pairs",
    "pair_file",
    "render_html",
    "render_png",
    "search_objectives",
    "serve_ui",
    "start_light_server",
    "stop_server",
    "stop_with_parent",
    "sync_end",
    "sync_run_dir",
    "wait_healthy",
]


def __getattr__(name: str) -> Any:
    # TrackingCallback is built on first use (importing ray costs seconds), then cached in
    # this module's globals: pickle finds the same class at search.tracking.TrackingCallback.
    if name == "TrackingCallback":
        cls = globals()[name] = tracking_callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
