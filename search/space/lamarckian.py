"""Lamarckian evolution (``search.sampler: lamarckian``): children of the front, trained from
their parents' weights.

A CPU search trains a dozen networks an hour; a sampler that proposes each from scratch spends
most of that relearning what the last one knew. LEMONADE (Elsken et al., 2019) and NASH
(hill climbing with network morphisms) showed the way out: pick a parent from the current
Pareto front, change it a little, and train the child *starting from the parent's weights*
for a fraction of the epochs. Here:

- the first ``warmup`` trials are TPE's proposals, trained from scratch, and afterwards an
  ``explore`` share still is (new shapes the front has not seen);
- every other proposal is a child: its size band (``fill_budget.bands``: the band with the
  fewest trials, as for every sampler) picks the parents, the band's non-dominated trained
  trials (each objective, e.g. val accuracy against params), one drawn at random; then between
  1 and ``mutations`` of the parent's values change (a width, a layer count, a kernel, the
  conv type, a learning rate, the fill fraction inside its band...), each by a small step
  (numbers: a Gaussian step of a quarter of the range, in log space for log ranges; choices:
  another choice), and values the change brings into play (a new stage's width) are TPE's;
- the child goes through the same budget screen as any proposal (an infeasible or repeated
  child is told to Optuna like any other and a new child is drawn), and the trainable builds
  it, copies the parent's weights into it (trainables/models/inherit.py) and trains it
  ``child_epochs`` (``inherit: false``: from scratch for ``train.epochs``, the same evolution
  without the weights, to measure what they add).

The population is the Optuna study itself (each child's parent is a user attr, ``parent``),
so a resumed search goes on from the front it had; the parents' weights are their
checkpoints in the run dir's storage, found from any node.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial

from search.rundir.pareto import front_indices

__all__ = ["PARENT", "mutate", "non_dominated", "step"]

PARENT = "parent"  # Optuna user attr of a child: its parent's trial number
STEP = 0.25  # a numeric mutation's standard deviation, as a share of the value's range


def non_dominated(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """The trials no other of ``trials`` dominates (all must have values); ``directions`` as
    Optuna names them (``maximize`` / ``minimize``)."""
    senses = [d.removesuffix("imize") for d in directions]  # max / min
    return [trials[i] for i in front_indices([t.values for t in trials], senses)]


def mutate(params: Mapping[str, Any], distributions: Mapping[str, BaseDistribution],
           rng: random.Random, *, changes: int) -> dict[str, Any]:
    """``params`` with ``changes`` of them (those that can change) moved by one small step
    each; fewer when fewer can change."""
    movable = [k for k in sorted(params) if k in distributions and not distributions[k].single()]
    out = dict(params)
    for k in rng.sample(movable, min(changes, len(movable))):
        out[k] = step(distributions[k], params[k], rng)
    return out


def step(dist: BaseDistribution, value: Any, rng: random.Random) -> Any:
    """A value near ``value`` inside ``dist``, never ``value`` itself (unless nothing else is)."""
    if isinstance(dist, CategoricalDistribution):
        others = [c for c in dist.choices if c != value]
        return rng.choice(others) if others else value
    if not isinstance(dist, FloatDistribution | IntDistribution):
        return value
    lo, hi = float(dist.low), float(dist.high)
    to = (math.log if dist.log else float)
    back = (math.exp if dist.log else float)
    a, b = to(lo), to(hi)
    x = to(float(value)) + rng.gauss(0.0, STEP * (b - a))
    x = min(b, max(a, 2 * a - x if x < a else 2 * b - x if x > b else x))  # reflected at a bound
    new = min(hi, max(lo, back(x)))
    grid = dist.step  # None for a continuous float
    if grid is None:
        return float(new)
    new = lo + round((new - lo) / grid) * grid
    if math.isclose(new, value):  # a step too small to leave its notch: one notch, either way
        new = rng.choice([v for v in (value + grid, value - grid)
                          if lo - 1e-12 <= v <= hi + 1e-12] or [value])
    new = min(hi, max(lo, new))
    return round(new) if isinstance(dist, IntDistribution) else float(new)
