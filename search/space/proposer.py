"""The Optuna side of a search: :class:`Proposer` owns the study, asks feasible proposals of
a :class:`~search.space.searchspace.SearchSpace` and tells results.

:meth:`Proposer.ask` re-asks until a proposal is feasible: each over-budget (or impossible) one
is told to Optuna as a finished trial with constraint values (``Trial.set_constraint``, > 0 =
violated), which TPE (it ranks infeasible trials last when it splits good from bad) and
NSGA-II (constrained domination) learn from, so the rejection rate falls as the search goes
on. It never returns an infeasible proposal. ``search.initial`` points are enqueued first;
with ``fill_budget.bands`` each trial is given the band with the fewest trials
(:mod:`search.space.bands`); with ``sampler: lamarckian`` most proposals after a warm-up
are children of a front member (:mod:`search.space.lamarckian`). ``search.space`` re-exports
every name here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from search.run.ray_compat import optuna_fixed_params
from search.space import bands, lamarckian
from search.space.latency import LatencyScreen
from search.space.suggest import FILL_FRACTION
from search.spec.model import SpecError

if TYPE_CHECKING:
    from search.space.searchspace import Proposal, SearchSpace

__all__ = [
    "BAND",
    "CONFIG_KEY",
    "INITIAL",
    "INITIAL_TRIES",
    "INITIAL_TRY",
    "Proposer",
    "SpaceExhausted",
    "config_key",
    "make_sampler",
]

log = logging.getLogger("sparse_search.space")

# Metric value told to Optuna for an infeasible trial when nothing better is known.
_WORST = {"max": 0.0, "min": math.inf}

def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """tpe: multivariate + group (conditional spaces) + constant liar (parallel asks);
    lamarckian: the same TPE for its warm-up, exploring and new values (the Proposer makes
    the children)."""
    if name in ("tpe", "lamarckian"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                multivariate=True, group=True, constant_liar=True, seed=seed
            )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"{name=} must be one of tpe, nsga2, random, lamarckian")


class Proposer:
    """The Optuna side of the search: asks feasible proposals, tells results.

    ``storage`` is a JournalStorage file (a resumed search keeps what the sampler learned) or
    None (in memory). Picklable: Ray pickles the searcher that holds it.
    """

    def __init__(
        self,
        space: SearchSpace,
        *,
        sampler: str = "tpe",
        seed: int = 0,
        storage: str | Path | None = None,
        study_name: str = "sparse-search",
        directions: Sequence[str] | None = None,
        max_rejects: int = 1000,
    ) -> None:
        if not (isinstance(max_rejects, int) and max_rejects >= 1):
            raise ValueError(f"{max_rejects=} must be an integer >= 1")
        self.space = space
        self.objectives = space.spec.objectives
        self.max_rejects = max_rejects
        self.seed = seed
        self.rejected = 0  # infeasible proposals told to Optuna by this proposer
        self.duplicates = 0  # proposals equal to an earlier trial's config, never trained twice
        # Measured latency (search/space/latency.py), only when the spec uses it: in the driver,
        # after the shape-only screens, run-dir cache beside the journal.
        self.latency = LatencyScreen.for_spec(space.spec, storage)
        # Children of the front (search/space/lamarckian.py), with sampler: lamarckian.
        self.lamarckian = space.spec.search.lamarckian if sampler == "lamarckian" else None
        # Optuna logs every study and trial at INFO; a search tells hundreds of rejected ones.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            storage=None if storage is None else JournalStorage(JournalFileBackend(str(storage))),
            study_name=study_name,
            directions=list(directions) if directions is not None else space.spec.directions,
            load_if_exists=True,
        )
        # Re-seed past the trials already stored, so a resumed study does not replay the
        # random start-up proposals it made before.
        stored = len(self.study.trials)
        self.study.sampler = make_sampler(sampler, seed + stored)
        if not stored:  # a new study: search.initial first (a resumed one has them stored)
            for point, params in zip(space.spec.search.initial, space.initial, strict=True):
                self.study.enqueue_trial(params, user_attrs={INITIAL: point.label})

    def ask(self) -> tuple[int, Proposal]:
        """The next feasible proposal and its Optuna trial number."""
        streak: list[Proposal] = []
        while True:
            self._queue_next()
            trial = self.study.ask()
            proposal = self.space.sample(trial)
            for key, value in self.space.constraint_values(proposal).items():
                trial.set_constraint(key, value)
            if proposal.feasible:
                key = config_key(proposal.config)
                earlier = self._earlier(key, trial.number)
                if earlier is not None:
                    # Same config, same seeds: training it again would repeat the earlier result.
                    self._tell_like(trial, earlier)
                    self.duplicates += 1
                    streak.append(proposal)
                else:
                    proposal = self._timed(trial, proposal)
                    if proposal.feasible:
                        trial.set_user_attr(CONFIG_KEY, key)
                        label = trial.user_attrs.get(INITIAL)
                        if label is not None:
                            proposal = dataclasses.replace(proposal, initial=label)
                        parent = trial.user_attrs.get(lamarckian.PARENT)
                        if parent is not None:
                            proposal = dataclasses.replace(proposal, parent=int(parent))
                        return trial.number, proposal
                    self._reject(trial, proposal, streak)  # over max_latency_ms: never trained
            else:
                self._reject(trial, proposal, streak)
            if len(streak) >= self.max_rejects:
                message = self._too_many_rejects(streak)
                if all(p.feasible for p in streak):  # only repeats: every config was handed out
                    raise SpaceExhausted(message)
                raise SpecError(message)

    def _timed(self, trial: optuna.Trial, proposal: Proposal) -> Proposal:
        """With a spec that uses latency: the proposal measured (its config carries the figure)
        and its latency constraint set; else the proposal as it is."""
        if self.latency is None:
            return proposal
        proposal = self.latency.screen(proposal)
        for k, v in self.latency.constraint_values(proposal).items():
            trial.set_constraint(k, v)
        return proposal

    def _reject(self, trial: optuna.Trial, proposal: Proposal, streak: list[Proposal]) -> None:
        self.study.tell(trial, self._infeasible_values(proposal))
        self.rejected += 1
        self._retry_initial(trial)
        streak.append(proposal)

    def _queue_next(self) -> None:
        """With nothing queued (initial points go first): queue what the next proposal keeps
        fixed: a lamarckian child's values (:mod:`search.space.lamarckian`), else with
        ``fill_budget.bands`` > 1 a fill fraction inside the band with the fewest trials
        handed out so far; else nothing (the sampler proposes it all)."""
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        band = self._band(trials)
        parent = self._parent(trials, band)
        if parent is not None:
            self._queue_child(trials, parent, band)
        elif band is not None:
            fill = self.space.spec.search.fill_budget
            assert fill is not None
            # The value inside the band depends on every trial asked (a retry draws a new one).
            value = bands.draw(fill.fraction, self._cuts(), band,
                               random.Random(f"{self.seed}/{len(trials)}"))
            self.study.enqueue_trial({FILL_FRACTION: value}, user_attrs={BAND: band})

    def _band(self, trials: Sequence[optuna.trial.FrozenTrial]) -> int | None:
        """With ``fill_budget.bands`` > 1: the band with the fewest trials handed out so far
        (a rejected proposal's retry stays in its band); else None."""
        fill = self.space.spec.search.fill_budget
        if fill is None or fill.bands <= 1:
            return None
        handed = [t.params[FILL_FRACTION] for t in trials
                  if CONFIG_KEY in t.user_attrs and FILL_FRACTION in t.params]
        return bands.pick(bands.counts(handed, self._cuts()),
                          random.Random(f"{self.seed}/{len(handed)}"))

    def _cuts(self) -> list[float]:
        """The band edges of ``fill_budget`` (only called with bands)."""
        fill = self.space.spec.search.fill_budget
        assert fill is not None
        return bands.edges(fill.fraction, fill.bands)

    def _parent(self, trials: Sequence[optuna.trial.FrozenTrial],
                band: int | None) -> optuna.trial.FrozenTrial | None:
        """A lamarckian search's next parent: a non-dominated trained trial of ``band`` (of
        all, without bands); None before the warm-up ends, for an exploring proposal, or when
        the band has no trained trial yet."""
        s = self.lamarckian
        if s is None:
            return None
        trained = [t for t in trials if t.state == TrialState.COMPLETE
                   and CONFIG_KEY in t.user_attrs and t.values is not None]
        rng = random.Random(f"{self.seed}/parent/{len(trials)}")
        if len(trained) < s.warmup or rng.random() < s.explore:
            return None
        if band is not None:
            cuts = self._cuts()
            trained = [t for t in trained if FILL_FRACTION in t.params
                       and bands.band_of(t.params[FILL_FRACTION], cuts) == band]
        if not trained:
            return None
        directions = [d.name.lower() for d in self.study.directions]
        return rng.choice(lamarckian.non_dominated(trained, directions))

    def _queue_child(self, trials: Sequence[optuna.trial.FrozenTrial],
                     parent: optuna.trial.FrozenTrial, band: int | None) -> None:
        """Queue ``parent``'s values with 1 to ``mutations`` of them stepped (in its band)."""
        s = self.lamarckian
        assert s is not None
        rng = random.Random(f"{self.seed}/child/{len(trials)}")
        params = lamarckian.mutate(parent.params, parent.distributions, rng,
                                   changes=rng.randint(1, s.mutations))
        attrs: dict[str, Any] = {lamarckian.PARENT: parent.number}
        if band is not None and FILL_FRACTION in params:  # a size step stays inside the band
            cuts = self._cuts()
            params[FILL_FRACTION] = min(cuts[band + 1], max(cuts[band], params[FILL_FRACTION]))
            attrs[BAND] = band
        self.study.enqueue_trial(params, user_attrs=attrs)

    def _retry_initial(self, trial: optuna.Trial) -> None:
        """An initial point whose open values came out over budget is asked again (with fresh
        open values), up to ``INITIAL_TRIES`` times: the user asked for it to be trained."""
        label = trial.user_attrs.get(INITIAL)
        if label is None:
            return
        tries = trial.user_attrs.get(INITIAL_TRY, 1)
        if tries >= INITIAL_TRIES:
            log.warning("search.initial point %s: %d proposals with its values were over "
                        "budget; the search goes on without it", label, tries)
            return
        fixed = optuna_fixed_params(self.study.get_trials(deepcopy=False)[trial.number])
        self.study.enqueue_trial(fixed, user_attrs={INITIAL: label, INITIAL_TRY: tries + 1})

    def _earlier(self, key: str, number: int) -> optuna.trial.FrozenTrial | None:
        """The earliest other trial handed out with this config key that did not fail (a failed
        one, or one a killed driver lost, may be tried again)."""
        for t in self.study.get_trials(deepcopy=False):
            if (t.number != number and t.state != TrialState.FAIL
                    and t.user_attrs.get(CONFIG_KEY) == key):
                return t
        return None

    def _tell_like(self, trial: optuna.Trial, earlier: optuna.trial.FrozenTrial) -> None:
        """A duplicate ends as its original did: its values when known, PRUNED, or FAIL for
        one still running (TPE's constant liar already imputes that one)."""
        trial.set_user_attr("duplicate_of", earlier.number)
        if earlier.state == TrialState.COMPLETE and earlier.values is not None:
            self.study.tell(trial, list(earlier.values))
        elif earlier.state == TrialState.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def tell(self, number: int, values: Mapping[str, float] | Sequence[float]) -> None:
        """A finished trial's objective values: a result dict (keyed by metric) or a sequence
        in objective order. Telling a trial twice is a no-op."""
        if isinstance(values, Mapping):
            values = [float(values[o.metric]) for o in self.objectives]
        self.study.tell(number, list(values), skip_if_finished=True)

    def tell_pruned(self, number: int) -> None:
        self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)

    def tell_failed(self, number: int) -> None:
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def _infeasible_values(self, proposal: Proposal) -> list[float]:
        # Infeasible trials are ranked by their violations, never by these values; they only
        # make the trial COMPLETE (NSGA-II's population holds complete trials only).
        known: dict[str, float] = {}
        if proposal.accounting is not None and proposal.screened_params is not None:
            known = {"nonzero_params": float(proposal.screened_params),
                     "deploy_params": float(proposal.deploy_params or 0),
                     "macs": float(proposal.accounting.macs)}
        if "latency_ms" in proposal.config:  # measured before it was refused
            known["latency_ms"] = float(proposal.config["latency_ms"])
        return [known.get(o.metric, _WORST[o.mode]) for o in self.objectives]

    def _too_many_rejects(self, streak: list[Proposal]) -> str:
        spec = self.space.spec
        counted = [p for p in streak if p.screened_params is not None and not p.feasible
                   and "latency_ms" not in p.config]  # refused for its shapes, not its latency
        invalid = [p for p in streak if p.error is not None]
        repeats = sum(p.feasible for p in streak)
        parts = [f"{spec.source}: {len(streak)} proposals in a row were infeasible or already "
                 f"tried (search.max_rejects={self.max_rejects})"]
        if repeats:
            parts.append(f"{repeats} repeated a config trained before: the space may hold fewer "
                         "distinct configs than search.num_samples (widen it or lower num_samples)")
        if counted:
            small = min(counted, key=lambda p: p.screened_params or 0)
            acc = small.accounting
            assert acc is not None
            parts.append(
                f"the smallest had {small.screened_params:,} params and {acc.macs:,} MACs "
                f"(constraints.max_params={spec.constraints.max_params}, "
                f"constraints.max_macs={spec.constraints.max_macs}): raise the budget or "
                "shrink the space (narrower stages, fewer layers, a smaller head)"
            )
        timed = [float(p.config["latency_ms"]) for p in streak if not p.feasible
                 and "latency_ms" in p.config]
        if timed:
            parts.append(f"{len(timed)} were measured over constraints.max_latency_ms="
                         f"{spec.constraints.max_latency_ms} ms (the fastest {min(timed):.3f} ms on "
                         "this machine's CPU): raise it or shrink the space")
        if invalid:
            parts.append(f"{len(invalid)} made no valid network, e.g. {invalid[-1].error}")
        return "; ".join(parts)


class SpaceExhausted(SpecError):
    """Every proposal of a long streak repeated a config already handed out: the space holds
    no more distinct configs (a dry run lists what it found; a search stops asking)."""


CONFIG_KEY = "config_key"  # Optuna user attr: the proposal's config_key, set when handed out
INITIAL = "initial"  # Optuna user attr of an enqueued search.initial point: its label
INITIAL_TRY = "initial_try"  # ... and which attempt at it (its open values were over budget)
INITIAL_TRIES = 20
BAND = "band"  # Optuna user attr: the fill_budget band a trial's fill fraction was drawn in


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a flat config (what the trainable receives, seeds included)."""
    text = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]
