"""The shared vocabulary: the metrics every part of a search names the same way.

One :class:`Metric` per measured quantity: its name (a trial's report key, a results.csv /
pareto.csv column, an MLflow metric), the only sensible direction when it is an objective,
whether it needs training (else the budget screen knows it before training) and the budget
that bounds it. The spec's allowed objectives and constraints, the scheduler's trained metric
and the tables of the run dir are read from here: adding a metric is a line here and the code
that computes it.

A leaf module: imports nothing of the package's.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_OBJECTIVES", "FRONT_COLUMNS", "METRICS", "OBJECTIVE_MODES", "SCREENED_METRICS",
    "TRAINED_METRICS", "Metric", "budget_fields",
]


@dataclass(frozen=True)
class Metric:
    name: str
    mode: str | None  # max | min as an objective; None: reported only, never an objective
    trained: bool  # needs training (else the screen counts it on the meta device)
    budget: str | None = None  # the constraints field that bounds it (<=), if any
    unit: str = ""  # for tables and docs


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("val_accuracy", "max", trained=True),
    Metric("val_loss", "min", trained=True),
    Metric("nonzero_params", "min", trained=False, budget="max_params", unit="params"),
    Metric("macs", "min", trained=False, budget="max_macs", unit="MACs"),
    # int8 deployment (trainables/accounting.py, formats in trainables/deploy.py): weights,
    # per-channel scales and int32 biases, BatchNorm folded, sparse layers as bitmask where
    # smaller; peak activation bytes at batch 1, layer by layer (MCUNet's count).
    Metric("flash_bytes", "min", trained=False, budget="max_flash_bytes", unit="bytes"),
    Metric("sram_bytes", "min", trained=False, budget="max_sram_bytes", unit="bytes"),
    Metric("val_accuracy_se", None, trained=True),
    Metric("test_accuracy", None, trained=True),
)}
# Metrics a trial reports that can be objectives, with the only sensible direction of each.
OBJECTIVE_MODES: dict[str, str] = {m.name: m.mode for m in METRICS.values() if m.mode}
TRAINED_METRICS = tuple(n for n, m in METRICS.items() if m.trained and m.mode)
SCREENED_METRICS = tuple(n for n, m in METRICS.items() if not m.trained)
DEFAULT_OBJECTIVES = (("val_accuracy", "max"), ("nonzero_params", "min"))
# What a front row carries for MLflow (the tracker's table), in order.
FRONT_COLUMNS = ("trial_key", "val_accuracy", "val_accuracy_se", "val_loss", "test_accuracy",
                 "nonzero_params", "macs", "flash_bytes", "sram_bytes", "arch", "prune_round")


def budget_fields() -> dict[str, str]:
    """constraints field -> the metric it bounds (max_params -> nonzero_params, ...)."""
    return {m.budget: n for n, m in METRICS.items() if m.budget}
