"""fill_budget.bands: every size band of the budget gets its share of trials (real Optuna)."""

from __future__ import annotations

import copy
import math
import random

import pytest
from optuna.trial import TrialState

from search.space import BAND, CONFIG_KEY, Proposer, bands
from search.spec import FloatRange
from tests.search.test_space import MNIST_5K, TIGHT, make_space, mnist_data


def test_edges_are_equal_in_log_space_for_a_log_range():
    cuts = bands.edges(FloatRange(0.125, 1.0, log=True), 3)
    assert cuts == pytest.approx([0.125, 0.25, 0.5, 1.0])
    assert bands.edges(FloatRange(0.2, 1.0), 4) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    with pytest.raises(ValueError, match="n=0"):
        bands.edges(FloatRange(0.2, 1.0), 0)


def test_band_of_counts_and_draw_stay_inside_their_band():
    dim = FloatRange(0.12, 1.0, log=True)
    cuts = bands.edges(dim, 4)
    assert [bands.band_of(v, cuts) for v in (0.12, cuts[1], 0.999, 1.0, 5.0, 0.01)] == \
        [0, 1, 3, 3, 3, 0]
    assert bands.counts([0.13, 0.14, 0.9, 1.0], cuts) == [2, 0, 0, 2]
    rng = random.Random(0)
    for band in range(4):
        for _ in range(50):
            v = bands.draw(dim, cuts, band, rng)
            assert cuts[band] <= v <= cuts[band + 1] and bands.band_of(v, cuts) == band
    # a log band is drawn uniformly in log space: its geometric middle splits the draws evenly
    low = [bands.draw(dim, cuts, 3, rng) < math.sqrt(cuts[3] * cuts[4]) for _ in range(2000)]
    assert 0.45 < sum(low) / len(low) < 0.55


def test_pick_takes_the_emptiest_band_and_breaks_ties_with_the_generator():
    assert bands.pick([3, 1, 2, 1], random.Random(0)) in (1, 3)
    assert bands.pick([0, 1, 1, 1], random.Random(0)) == 0
    drawn = {bands.pick([2, 2, 2, 2], random.Random(seed)) for seed in range(40)}
    assert drawn == {0, 1, 2, 3}


def banded(data: dict, n: int = 4) -> dict:
    data = copy.deepcopy(data)
    data["search"]["fill_budget"]["bands"] = n
    return data


def handed_out_bands(proposer: Proposer, cuts: list[float]) -> list[int]:
    return [bands.band_of(t.params["fill_fraction"], cuts) for t in proposer.study.trials
            if CONFIG_KEY in t.user_attrs]


def spread(values: list[int], n: int) -> int:
    c = [values.count(b) for b in range(n)]
    return max(c) - min(c)


def tell_small_is_better(proposer: Proposer, number: int, params: int) -> None:
    # A front where small nets look best: left alone, TPE crowds the small end.
    proposer.tell(number, [1 - params / 1e5, params])


def test_tpe_trials_are_spread_over_the_bands_initial_points_included(tmp_path):
    data = banded(mnist_data({"arch": str(MNIST_5K), "train/lr": 0.05}))
    space = make_space(data, shape=(1, 28, 28))
    fill = space.spec.search.fill_budget
    cuts = bands.edges(fill.fraction, 4)
    proposer = Proposer(space, sampler="tpe", seed=0, storage=tmp_path / "s.journal",
                        study_name="s")
    for i in range(13):
        number, p = proposer.ask()
        trial = proposer.study.trials[number]
        if i == 0:  # the seeded 4,498-param net counts in the top band
            assert trial.user_attrs["initial"] == str(MNIST_5K)
            assert bands.band_of(trial.params["fill_fraction"], cuts) == 3
        else:  # every other trial's fraction lies in the band it was given
            band = trial.user_attrs[BAND]
            assert cuts[band] <= trial.params["fill_fraction"] <= cuts[band + 1]
            # ... and the fill puts its size there: within the band's params range
            assert p.screened_params <= cuts[band + 1] * 5000
            assert p.screened_params >= 0.85 * cuts[band] * 5000
        assert spread(handed_out_bands(proposer, cuts), 4) <= 1
        if i % 3 != 2:  # some stay RUNNING: they count as much as the finished ones
            tell_small_is_better(proposer, number, p.screened_params)
    got = handed_out_bands(proposer, cuts)
    assert sorted(got.count(b) for b in range(4)) == [3, 3, 3, 4]

    # a resumed search goes on balancing from what the journal holds
    resumed = Proposer(space, sampler="tpe", seed=0, storage=tmp_path / "s.journal",
                       study_name="s")
    for _ in range(7):
        number, p = resumed.ask()
        tell_small_is_better(resumed, number, p.screened_params)
    final = handed_out_bands(resumed, cuts)
    assert len(final) == 20 and [final.count(b) for b in range(4)] == [5, 5, 5, 5]


def test_a_rejected_proposal_is_asked_again_in_its_band():
    data = copy.deepcopy(TIGHT)
    # A MACs cap that rejects many filled shapes: retries must not skew the bands.
    data["constraints"] = {"max_params": 20000, "max_macs": 500000}  # ~40 rejects in 9 asks
    data["search"] = {"fill_budget": {"fraction": {"float": [0.2, 1.0]}, "bands": 3}}
    space = make_space(data)
    proposer = Proposer(space, sampler="random", seed=1)
    cuts = bands.edges(space.spec.search.fill_budget.fraction, 3)
    for _ in range(9):
        number, p = proposer.ask()
        proposer.tell(number, [0.5, p.screened_params])
    assert proposer.rejected > 0
    assert [handed_out_bands(proposer, cuts).count(b) for b in range(3)] == [3, 3, 3]
    rejected = [t for t in proposer.study.trials
                if t.state == TrialState.COMPLETE and CONFIG_KEY not in t.user_attrs]
    assert rejected and all(BAND in t.user_attrs for t in rejected)


def test_without_bands_nothing_is_queued():
    data = copy.deepcopy(TIGHT)
    data["constraints"] = {"max_params": 20000}
    data["search"] = {"fill_budget": {"fraction": {"float": [0.2, 1.0]}}}
    proposer = Proposer(make_space(data), sampler="random", seed=0)
    for _ in range(3):
        number, p = proposer.ask()
        proposer.tell(number, [0.5, p.screened_params])
    assert all(BAND not in t.user_attrs and "fixed_params" not in t.system_attrs
               for t in proposer.study.trials)
