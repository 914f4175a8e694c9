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

**Where it lives.** This module is the folder's public face (imported lazily); the code is in
:mod:`search.space.searchspace` (:class:`SearchSpace`, :class:`Proposal`, :func:`check_initial`,
initial points as Optuna params), :mod:`search.space.suggest` (one value on a trial),
:mod:`search.space.screen` (counts, pruning estimate, fill), :mod:`search.space.latency`
(latency as a budget screen), :mod:`search.space.bands` (size bands),
:mod:`search.space.proposer` (:class:`Proposer`) and :mod:`search.space.preview` (dry runs).
Ray pickles the searcher with its SearchSpace into a run directory as
``search.space.SearchSpace`` (:mod:`search.pickled`).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

# name -> the module that defines it (imported on first use: reading a spec imports
# no torch until a network is built)
_PUBLIC = {
    "DryRun": "search.space.preview",
    "dry_run": "search.space.preview",
    "text_histogram": "search.space.preview",
    "BAND": "search.space.proposer",
    "CONFIG_KEY": "search.space.proposer",
    "INITIAL": "search.space.proposer",
    "INITIAL_TRIES": "search.space.proposer",
    "INITIAL_TRY": "search.space.proposer",
    "Proposer": "search.space.proposer",
    "SpaceExhausted": "search.space.proposer",
    "config_key": "search.space.proposer",
    "make_sampler": "search.space.proposer",
    "OUTPUT_RATE_FACTOR": "search.space.screen",
    "Proposal": "search.space.searchspace",
    "SearchSpace": "search.space.searchspace",
    "check_initial": "search.space.searchspace",
    "FILL_FRACTION": "search.space.suggest",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
