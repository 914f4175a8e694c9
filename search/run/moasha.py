"""Multi-objective ASHA: successive halving that ranks a rung by Pareto dominance.

Ray's ASHA ranks the trials at a rung by one metric: on an accuracy-vs-params front it stops
the small nets (they are always less accurate at any epoch), which are exactly the points
the small end of the front needs. This scheduler keeps ASHA's asynchronous rule, with the
ranking of MO-ASHA (Schmucker et al. 2021, "Multi-objective Asynchronous Successive
Halving"): at each rung a trial's objective values (``val_accuracy`` at that epoch and the
``nonzero_params`` of the model it will deliver, as the budget screen counted it: a
lottery-ticket trial still reports its dense count before its pruning rounds; ``deploy_params``
likewise, plus the frozen trunk; ...) are
ranked against those recorded at the same rung by
non-dominated sorting, then by crowding distance within a sorting front (NSGA-II: spread
points before crowded ones). A trial goes on when it is in the top ``1 / reduction_factor``
of that order, or on the rung's Pareto front (no other trial at this rung is better in every
objective): a small net is never stopped for being less accurate than a bigger one.

Rungs are at ``grace_period * reduction_factor**k`` of ``time_attr`` (epochs that keep
counting across pruning rounds) below ``max_t``; a trial reaching ``max_t`` is stopped as in
Ray's ASHA (it is done). The first trial at a rung always goes on (nothing to compare with).

An objective that exists only in the final report (``int8_accuracy``: the model is quantized
after its last epoch) is ranked at every rung by its proxy (``val_accuracy``; see
search/schema.py ``rung_metric``): the searcher and the front still get the int8 value.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from search.pickled import public
from search.rundir.pareto import crowding_distances, pareto_ranks
from search.schema import SCREENED_KEY, rung_metric

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


@public("search.run")
class MultiObjectiveASHA(FIFOScheduler):
    """Asynchronous successive halving over several objectives (see the module docstring)."""

    def __init__(
        self,
        *,
        objectives: Sequence[tuple[str, str]],
        time_attr: str = "epoch",
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
    ) -> None:
        super().__init__()
        if not objectives or any(s not in ("max", "min") for _, s in objectives):
            raise ValueError(f"{objectives=} must be (metric, 'max' | 'min') pairs, at least one")
        if not (isinstance(grace_period, int) and grace_period >= 1):
            raise ValueError(f"{grace_period=} must be an integer >= 1")
        if not (isinstance(max_t, int) and max_t >= grace_period):
            raise ValueError(f"{max_t=} must be an integer >= grace_period ({grace_period})")
        if not reduction_factor > 1:
            raise ValueError(f"{reduction_factor=} must be > 1")
        self.objectives = tuple((m, s) for m, s in objectives)
        self.time_attr = time_attr
        self.max_t = max_t
        self.reduction_factor = float(reduction_factor)
        self.rungs: list[float] = []  # milestones, ascending
        t = float(grace_period)
        while t < max_t:
            self.rungs.append(t)
            t *= self.reduction_factor
        # milestone -> trial id -> objective values the trial reported on reaching it
        self.recorded: dict[float, dict[str, tuple[float, ...]]] = {r: {} for r in self.rungs}
        self.num_stopped = 0

    # ------------------------------------------------------------------ Ray Tune API
    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives come from the spec, never from Tune's metric/mode

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        action = self._on_result(trial.trial_id, result, trial.config)
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        # a trial ending on a milestone still counts at that rung for the ones that follow
        if result:
            self._on_result(trial.trial_id, result, trial.config)

    def debug_string(self) -> str:
        sizes = ", ".join(f"{r:g}: {len(self.recorded[r])}" for r in self.rungs)
        return f"Using MultiObjectiveASHA: num_stopped={self.num_stopped}; rungs {{{sizes}}}"

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))

    # ------------------------------------------------------------------ the rule
    def _on_result(self, trial_id: str, result: dict, config: dict | None = None) -> str:
        t = result.get(self.time_attr)
        values = self._values(result, config or {})
        if t is None or values is None:
            return TrialScheduler.CONTINUE
        if t >= self.max_t:
            return TrialScheduler.STOP
        # the highest milestone passed and not yet recorded for this trial (as Ray's ASHA)
        for milestone in reversed(self.rungs):
            if t < milestone:
                continue
            recorded = self.recorded[milestone]
            if trial_id in recorded:
                return TrialScheduler.CONTINUE
            go_on = self.goes_on(values, list(recorded.values()))
            recorded[trial_id] = values
            return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _values(self, result: dict, config: dict) -> tuple[float, ...] | None:
        """The objectives at this report; params are the delivered model's (the screen's
        count in the config), not the dense count a pruning trial reports before its rounds."""
        out = []
        for objective, _ in self.objectives:
            metric = rung_metric(objective)
            v = result.get(metric)
            if metric == "nonzero_params" and config.get(SCREENED_KEY) is not None:
                v = config[SCREENED_KEY]
            elif metric == "deploy_params" and config.get(SCREENED_KEY) is not None:
                # the delivered nonzeros + the frozen trunk (reported deploy - nonzero)
                frozen = (v or 0) - (result.get("nonzero_params") or 0)
                v = config[SCREENED_KEY] + frozen
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                return None
            out.append(float(v))  # NaN stays: such a trial stops (see goes_on)
        return tuple(out)

    def goes_on(self, values: tuple[float, ...], others: Sequence[tuple[float, ...]]) -> bool:
        """Whether a trial with ``values`` continues past a rung where ``others`` were
        recorded: it is on the rung's front, or in the top 1/reduction_factor of the order."""
        if any(math.isnan(v) for v in values):
            return False  # a diverged trial: NaN is the worst value and fronts ignore it
        if not others:
            return True
        points = [*others, values]
        senses = [s for _, s in self.objectives]
        ranks = pareto_ranks(points, senses)
        me = len(points) - 1
        if ranks[me] == 0:
            return True
        crowd = crowding_distances(points, senses, ranks)
        order = sorted(range(len(points)), key=lambda i: (ranks[i], -crowd[i]))
        keep = max(1, math.ceil(len(points) / self.reduction_factor))
        return order.index(me) < keep

