"""SearchSpec -> a define-by-run Optuna space, the budget screen, and the Proposer.

:class:`SearchSpace` turns one Optuna trial into a :class:`Proposal`: it suggests values in an
order that expresses the conditionals (a backbone skips stem and stages; densenet/sparsenet
stages sample a growth rate and compression, plain/residual ones a width; hidden head layers
bring head sparsity, density, BN and dropout; ``prune_rounds > 0`` brings ``prune_rate``), builds
the ArchConfig and TrainConfig and counts the network on the meta device (the budget screen:
``trainables.accounting`` on one meta build, which also yields the prunable weights that the
pruning-rounds estimate needs).

:class:`Proposer` owns the Optuna study. :meth:`Proposer.ask` re-asks until a proposal is
feasible: each over-budget (or impossible) one is told to Optuna as a finished trial with
constraint values (``Trial.set_constraint``, > 0 = violated), which TPE (it ranks infeasible
trials last when it splits good from bad) and NSGA-II (constrained domination) learn from, so
the rejection rate falls as the search goes on. It never returns an infeasible proposal.

Optuna parameter names follow the spec's paths: ``block``, ``stem/width``, ``stages/0/width``,
``stages/0/growth``, ``head``, ``head_density``, ``train/lr``, ``fill_fraction``, ...

**Where it lives.** This module is the public face; the code is in :mod:`search.searchspace`
(:class:`SearchSpace`, :class:`Proposal`, :func:`check_initial`), :mod:`search.suggest` (one
value on a trial), :mod:`search.screen` (counts, pruning estimate, fill), :mod:`search.initial`
(initial points as Optuna params), :mod:`search.proposer` (:class:`Proposer`) and
:mod:`search.dry_run`. Ray pickles the searcher with its SearchSpace into a run directory:
old pickles name ``search.space.<class>``, which these re-exports keep resolving.
"""

from __future__ import annotations

from search.dry_run import (
    DryRun,
    dry_run,
    text_histogram,
)
from search.proposer import (
    BAND,
    CONFIG_KEY,
    INITIAL,
    INITIAL_TRIES,
    INITIAL_TRY,
    Proposer,
    SpaceExhausted,
    config_key,
    make_sampler,
)
from search.screen import (
    OUTPUT_RATE_FACTOR,
)
from search.searchspace import (
    Proposal,
    SearchSpace,
    check_initial,
)
from search.suggest import (
    FILL_FRACTION,
)

__all__ = [
    "BAND",
    "CONFIG_KEY",
    "FILL_FRACTION",
    "INITIAL",
    "INITIAL_TRIES",
    "INITIAL_TRY",
    "OUTPUT_RATE_FACTOR",
    "DryRun",
    "Proposal",
    "Proposer",
    "SearchSpace",
    "SpaceExhausted",
    "check_initial",
    "config_key",
    "dry_run",
    "make_sampler",
    "text_histogram",
]
