"""``search.finalize.time_budget``: which retrainings fit in one finalize call's wall time.

Each (member, seed) is estimated from its own search trial: the trial's measured
``train_seconds`` per epoch (results.csv: measured with the search's concurrency on the search's
machines) times the retraining's epochs, once per training phase (``prune_rounds + 1``). The
plan admits members in the finalize's pick order (best first, or smallest first), all of a
member's seeds or none (a member with one seed has no spread), on ``slots`` lanes (the
retrainings that run at once); a member whose last seed would end after the budget is left out,
and a later, cheaper member may still fit. While training, a retraining starts only if its
estimate still fits in what is left (:meth:`BudgetPlan.fits_now`), so a finalize that runs slower
than estimated drops its last retrainings instead of overrunning by more than one estimate's error.
The search's own ``time_budget`` works the same way (search.run.searcher).
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.finalize.front import Member

__all__ = ["BudgetPlan", "plan_budget", "plan_for", "trial_pace"]


def trial_pace(results_csv: Path) -> dict[str, float]:
    """Seconds per epoch of each trial that recorded both (trial key -> s/epoch)."""
    pace = {}
    with results_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                seconds, epochs = float(row.get("train_seconds") or "nan"), float(row.get("epochs") or 0)
            except ValueError:
                continue
            if epochs > 0 and seconds == seconds and seconds > 0:  # (NaN != NaN: not recorded)
                pace[row["trial_key"]] = seconds / epochs
    return pace


def job_seconds(member: Member, pace: Mapping[str, float]) -> float | None:
    """A retraining's estimated seconds: its trial's s/epoch x epochs x phases; None unmeasured."""
    per_epoch = pace.get(member.trial_key)
    if per_epoch is None:
        return None
    return per_epoch * member.train.epochs * (member.train.prune_rounds + 1)


@dataclass(frozen=True)
class BudgetPlan:
    budget_s: float
    admitted: tuple[str, ...]  # job ids to train, in start order
    estimates: Mapping[str, float]  # job id -> estimated seconds (admitted jobs)
    left_out: tuple[tuple[str, str], ...]  # (member label, why) for each member not admitted
    end_s: float  # the plan's estimated wall time (s)

    def fits_now(self, job_id: str, elapsed_s: float) -> bool:
        """Whether the job, started after ``elapsed_s`` of this call, still ends in the budget."""
        return elapsed_s + self.estimates[job_id] <= self.budget_s

    def lines(self) -> list[str]:
        out = [f"time budget {self.budget_s / 60:.0f} min: {len(self.admitted)} retrainings "
               f"planned, estimated {self.end_s / 60:.0f} min (the search's measured pace)"]
        out += [f"left out {label}: {why}" for label, why in self.left_out]
        return out


def plan_budget(members: Sequence[Member], jobs: Mapping[str, Sequence[str]], *, slots: int,
                budget_s: float, pace: Mapping[str, float]) -> BudgetPlan:
    """Admit ``members`` (in priority order) while their jobs (member label -> job ids still to
    train) fit on ``slots`` lanes within ``budget_s``; see the module docstring."""
    lanes = [0.0] * max(1, slots)  # when each lane is free (s from now): a min-heap
    admitted: list[str] = []
    estimates: dict[str, float] = {}
    left_out: list[tuple[str, str]] = []
    for m in members:
        todo = list(jobs.get(m.label, ()))
        if not todo:
            continue
        est = job_seconds(m, pace)
        if est is None:
            left_out.append((m.label, f"its trial {m.trial_key} recorded no train_seconds to "
                                      "estimate from"))
            continue
        trial = list(lanes)
        ends = []
        for _ in todo:
            start = heapq.heappop(trial)
            ends.append(start + est)
            heapq.heappush(trial, start + est)
        if max(ends) > budget_s:
            left_out.append((m.label, f"{len(todo)} x ~{est / 60:.0f} min (its trial's "
                                      f"{pace[m.trial_key]:.0f} s/epoch) would end at "
                                      f"~{max(ends) / 60:.0f} min, past the budget"))
            continue
        lanes = trial
        admitted += todo
        estimates.update(dict.fromkeys(todo, est))
    end = max(lanes) if admitted else 0.0
    return BudgetPlan(budget_s, tuple(admitted), estimates, tuple(left_out), end)


def plan_for(results_csv: Path, ranked: Sequence[Member], jobs: Mapping[str, Sequence[str]],
             budget_s: float, echo: Callable[[str], Any], slots: int) -> BudgetPlan:
    """:func:`plan_budget` with the pace of ``results_csv``'s trials, its lines echoed (a
    finalize calls it once it knows how many retrainings run at once)."""
    plan = plan_budget(ranked, jobs, slots=slots, budget_s=budget_s, pace=trial_pace(results_csv))
    for line in plan.lines():
        echo(line)
    return plan
