"""search/finalize/budget.py: the time budget's plan, from a real results.csv's measured pace."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from search.finalize.budget import plan_budget, trial_pace


@dataclass(frozen=True)
class _Train:
    epochs: int
    prune_rounds: int = 0


@dataclass(frozen=True)
class _Member:  # the Member fields the plan reads
    trial_key: str
    train: _Train

    @property
    def label(self) -> str:
        return self.trial_key


def _results(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["trial_key", "train_seconds", "epochs", "val_accuracy"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_pace_is_seconds_per_epoch_of_trials_that_recorded_both(tmp_path: Path) -> None:
    pace = trial_pace(_results(tmp_path, [
        {"trial_key": "0", "train_seconds": "400", "epochs": "8"},
        {"trial_key": "1", "train_seconds": "90", "epochs": "3"},  # stopped early: its own pace
        {"trial_key": "2", "train_seconds": "", "epochs": ""},  # crashed: nothing to go on
        {"trial_key": "3", "train_seconds": "12", "epochs": "0"},
    ]))
    assert pace == {"0": 50.0, "1": 30.0}


def _jobs(*members: _Member, seeds: int = 2) -> dict[str, list[str]]:
    return {m.label: [f"{m.label}-s{s}" for s in range(seeds)] for m in members}


def test_members_are_admitted_in_order_all_seeds_or_none() -> None:
    pace = {"best": 50.0, "slow": 140.0, "cheap": 30.0}
    best, slow, cheap = (_Member(k, _Train(30)) for k in ("best", "slow", "cheap"))
    # 2 lanes, 75 min: best's 2 seeds run side by side (25 min); slow's would end at 95 min;
    # cheap's (15 min each) still fit after best's.
    plan = plan_budget([best, slow, cheap], _jobs(best, slow, cheap), slots=2, budget_s=4500,
                       pace=pace)
    assert plan.admitted == ("best-s0", "best-s1", "cheap-s0", "cheap-s1")
    assert [label for label, _ in plan.left_out] == ["slow"]
    assert "would end at ~95 min, past the budget" in plan.left_out[0][1]
    assert plan.end_s == 1500 + 900
    assert plan.lines()[0] == ("time budget 75 min: 4 retrainings planned, estimated 40 min "
                               "(the search's measured pace)")
    # 1 lane: the seeds run one after the other; best (50 min) fits, cheap's would end at 80.
    one = plan_budget([best, slow, cheap], _jobs(best, slow, cheap), slots=1, budget_s=4500,
                      pace=pace)
    assert one.admitted == ("best-s0", "best-s1")
    assert [label for label, _ in one.left_out] == ["slow", "cheap"]


def test_phases_unmeasured_trials_finished_jobs_and_the_gate_while_training() -> None:
    pruned = _Member("p", _Train(10, prune_rounds=2))  # 3 phases of 10 epochs: 30 x 10 s
    unknown = _Member("u", _Train(10))
    done = _Member("d", _Train(10))
    plan = plan_budget([done, unknown, pruned], {**_jobs(unknown, pruned), "d": []}, slots=2,
                       budget_s=301, pace={"p": 10.0, "d": 1.0})
    assert plan.admitted == ("p-s0", "p-s1") and plan.estimates["p-s0"] == 300
    assert plan.left_out == (("u", "its trial u recorded no train_seconds to estimate from"),)
    assert plan.fits_now("p-s1", elapsed_s=1.0) and not plan.fits_now("p-s1", elapsed_s=1.5)
    empty = plan_budget([unknown], _jobs(unknown), slots=2, budget_s=60, pace={})
    assert empty.admitted == () and empty.end_s == 0.0
