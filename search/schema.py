"""The shared vocabulary: the metrics every part of a search names the same way.

One :class:`Metric` per measured quantity: its name (a trial's report key, a results.csv /
pareto.csv column, an MLflow metric), the only sensible direction when it is an objective,
whether it needs training (else the budget screen knows it before training) and the budget
that bounds it. The spec's allowed objectives and constraints, the scheduler's trained metric
and the tables of the run dir are read from here: adding a metric is a line here and the code
that computes it.

It also holds the names every part reads and writes between them: the config keys a trial
carries beyond its architecture and recipe (``meta/*``), and the keys and MLflow tags of a
measured latency.

A leaf module: imports nothing of the package's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_OBJECTIVES",
    "DEPLOY_METRICS",
    "FRONT_COLUMNS",
    "INITIAL_KEY",
    "INT8_COLUMNS",
    "LATENCY_CPU",
    "LATENCY_ORT",
    "METRICS",
    "OBJECTIVE_MODES",
    "SCREENED_COLUMNS",
    "SCREENED_KEY",
    "SCREENED_METRICS",
    "TAG_LATENCY_CPU",
    "TAG_ONNXRUNTIME",
    "TRAINED_COLUMNS",
    "TRAINED_METRICS",
    "TRIAL_KEY",
    "Metric",
    "budget_fields",
    "headline_objective",
    "rung_metric",
]


# A trial's config keys beyond its arch/ and train/ values (set by the searcher, read by the
# scheduler, the recorder and the tuner's trial names).
TRIAL_KEY = "meta/trial_key"  # the trial key (the Optuna trial number)
INITIAL_KEY = "meta/initial"  # set on a trial of search.initial: the entry's label
# The budget screen's count of the model the trial will deliver (after its pruning rounds):
# what early stopping compares at a rung, where a pruning trial still reports dense counts.
SCREENED_KEY = "meta/screened_params"
# A measured latency's provenance: config keys, and the MLflow child-run tags they become.
LATENCY_CPU = "latency/cpu"  # the CPU model that measured it
LATENCY_ORT = "latency/onnxruntime"  # the onnxruntime version that measured it
TAG_LATENCY_CPU = "sparse_search.latency_cpu"
TAG_ONNXRUNTIME = "sparse_search.onnxruntime"


@dataclass(frozen=True)
class Metric:
    name: str
    mode: str | None  # max | min as an objective; None: reported only, never an objective
    trained: bool  # needs training (else the screen counts it on the meta device)
    budget: str | None = None  # the constraints field that bounds it (<=), if any
    unit: str = ""  # for tables and docs
    # What an early-stopping rung ranks in its place: a metric that exists only in the final
    # report (int8_accuracy: quantized after training) is ranked at rungs by this proxy.
    rung_proxy: str | None = None
    # Another name for a metric that has its own column (int8_accuracy, the objective, is
    # int8_val_accuracy): reported and ranked by, never a column of its own.
    alias_of: str | None = None


METRICS: dict[str, Metric] = {m.name: m for m in (
    # In the order of the tables' columns (trained first, then counted; see *_COLUMNS below).
    Metric("val_accuracy", "max", trained=True),
    Metric("val_accuracy_se", None, trained=True),  # binomial SE: what the val split tells apart
    Metric("val_loss", "min", trained=True),
    Metric("test_accuracy", None, trained=True),
    # Post-training static int8 of the finished trial (trainables/quantize.py trial_int8),
    # accuracies as fractions; selection never sees test; rungs rank val_accuracy instead.
    Metric("int8_val_accuracy", None, trained=True),
    Metric("int8_test_accuracy", None, trained=True),
    Metric("int8_drop", None, trained=True),  # val_accuracy - int8_val_accuracy
    Metric("int8_accuracy", "max", trained=True, rung_proxy="val_accuracy",
           alias_of="int8_val_accuracy"),
    Metric("nonzero_params", "min", trained=False, budget="max_params", unit="params"),
    # Every parameter the shipped model carries: nonzero_params + a frozen transfer trunk's
    # weights (trainables/accounting.py); nonzero_params counts what trains (studies 002, 003),
    # this what a user deploys. Equal for a net trained from scratch.
    Metric("deploy_params", "min", trained=False, budget="max_deploy_params", unit="params"),
    Metric("macs", "min", trained=False, budget="max_macs", unit="MACs"),
    # int8 deployment (trainables/accounting.py, formats in trainables/deploy.py): weights,
    # per-channel scales and int32 biases, BatchNorm folded, sparse layers as bitmask where
    # smaller; peak activation bytes at batch 1, layer by layer (MCUNet's count).
    Metric("flash_bytes", "min", trained=False, budget="max_flash_bytes", unit="bytes"),
    Metric("sram_bytes", "min", trained=False, budget="max_sram_bytes", unit="bytes"),
    # Measured, not counted: the untrained net's ONNX Runtime time at batch 1 on the CPU of the
    # machine that screens (search/space/latency.py), before training.
    Metric("latency_ms", "min", trained=False, budget="max_latency_ms", unit="ms"),
)}
# Metrics a trial reports that can be objectives, with the only sensible direction of each.
OBJECTIVE_MODES: dict[str, str] = {m.name: m.mode for m in METRICS.values() if m.mode}
TRAINED_METRICS = tuple(n for n, m in METRICS.items() if m.trained and m.mode)
SCREENED_METRICS = tuple(n for n, m in METRICS.items() if not m.trained)
DEFAULT_OBJECTIVES = (("val_accuracy", "max"), ("nonzero_params", "min"))
# The columns the run dir's tables and the MLflow front carry, derived from METRICS: a new
# metric is a line above and the code that computes it. Trained ones, then counted ones.
TRAINED_COLUMNS = tuple(n for n, m in METRICS.items() if m.trained and m.alias_of is None)
SCREENED_COLUMNS = tuple(n for n, m in METRICS.items() if not m.trained)
# What a front row carries for MLflow (the tracker's table), in order: every objective's
# column (int8_accuracy too: the tracker ranks by the objectives' names).
FRONT_COLUMNS = ("trial_key", *TRAINED_COLUMNS,
                 *(n for n, m in METRICS.items() if m.alias_of is not None),
                 *SCREENED_COLUMNS, "arch", "prune_round")
# The int8 columns of results.csv / points.csv / pareto.csv (empty when not measured).
INT8_COLUMNS = tuple(n for n in TRAINED_COLUMNS if n.startswith("int8_"))
# A spec that budgets or optimises any of these is a deployment search: its trials get the
# int8 step by default (train.int8_eval left out; ~3-8 s a trial on 2 cores, mostly the export).
DEPLOY_METRICS = ("flash_bytes", "sram_bytes", "latency_ms", "int8_accuracy")


def rung_metric(name: str) -> str:
    """The metric an early-stopping rung ranks for objective ``name`` (itself, or its proxy)."""
    m = METRICS.get(name)
    return m.rung_proxy if m is not None and m.rung_proxy else name


def budget_fields() -> dict[str, str]:
    """constraints field -> the metric it bounds (max_params -> nonzero_params, ...)."""
    return {m.budget: n for n, m in METRICS.items() if m.budget}


def headline_objective(spec: Any) -> tuple[str, str]:
    """The spec's first maximised objective (its accuracy), as pareto.csv names the column, and
    its mode (else the first objective's)."""
    for o in spec.objectives:
        if o.mode == "max":
            return METRICS[o.metric].alias_of or o.metric, "max"
    o = spec.objectives[0]
    return METRICS[o.metric].alias_of or o.metric, o.mode
