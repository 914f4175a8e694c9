"""One searched value on an Optuna trial, and which train values a trial needs.

:func:`suggest` turns a dimension (fixed, :class:`~search.spec.dims.Choice`, ``IntRange``,
``FloatRange``) into one value on a trial (lists, e.g. head widths, are encoded for Optuna by
:func:`encode`); :data:`TRAIN_CONDITIONS` and :func:`train_needed` say when a train field is
sampled at all. :class:`search.space.searchspace.SearchSpace` walks a spec with these; so does the
initial-point check (:mod:`search.space.searchspace`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import optuna

from search.spec.dims import Choice, FloatRange, IntRange
from trainables.train import TrainConfig, resolve_augment

__all__ = [
    "FILL_FRACTION",
    "TRAIN_CONDITIONS",
    "encode",
    "suggest",
    "train_defaults",
    "train_needed",
    "without",
]

FILL_FRACTION = "fill_fraction"  # the Optuna param that fill_budget searches
# A train field -> (field it depends on, predicate on that field's value); sampled only if true.
TRAIN_CONDITIONS: dict[str, tuple[str, Any]] = {
    "prune_rate": ("prune_rounds", lambda rounds: rounds > 0),
    "prune_scope": ("prune_rounds", lambda rounds: rounds > 0),
    "rewind_epoch": ("prune_rounds", lambda rounds: rounds > 0),
    "nesterov": ("optimizer", lambda opt: opt == "sgd"),
}


def suggest(trial: optuna.Trial, name: str, dim: Any) -> Any:
    """One value for ``dim``: searched dims are suggested on ``trial``, fixed ones returned."""
    if isinstance(dim, Choice):
        # Optuna's choices must be None/bool/int/float/str: lists (head widths) are encoded.
        encoded = [encode(v) for v in dim.values]
        return dim.values[encoded.index(trial.suggest_categorical(name, encoded))]
    if isinstance(dim, IntRange):
        return trial.suggest_int(name, dim.lo, dim.hi, step=dim.step, log=dim.log)
    if isinstance(dim, FloatRange):
        return trial.suggest_float(name, dim.lo, dim.hi, log=dim.log)
    return dim


def encode(v: Any) -> Any:
    if isinstance(v, tuple):
        return "-".join(map(str, v)) if v else "none"
    return v


def without(dim: Any, value: Any) -> Any:
    """A choice without ``value`` (a fixed value when one remains)."""
    if not isinstance(dim, Choice):
        return dim
    rest = tuple(v for v in dim.values if v != value)
    return rest[0] if len(rest) == 1 else Choice(rest)


def train_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(TrainConfig)}


def train_needed(name: str, values: Mapping[str, Any], data_name: str) -> bool:
    if name == "crop_padding":
        return resolve_augment(values["augment"], data_name)[0]
    if name in TRAIN_CONDITIONS:
        parent, needed = TRAIN_CONDITIONS[name]
        return bool(needed(values[parent]))
    return True
