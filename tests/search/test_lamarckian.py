"""search/space/lamarckian.py and the Proposer's children (sampler: lamarckian), on a real
Optuna study; the trained children are tests/search/test_tuner.py's."""

from __future__ import annotations

import copy
import random

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.space import BAND, CONFIG_KEY, Proposer, bands
from search.space.lamarckian import PARENT, mutate, non_dominated, step
from search.space.suggest import FILL_FRACTION
from search.spec import SpecError
from tests.search.test_space import TIGHT, make_space


@pytest.mark.parametrize("dist", [
    IntDistribution(8, 64, log=True), IntDistribution(1, 3), IntDistribution(0, 12, step=4),
    FloatDistribution(1e-3, 1e-1, log=True), FloatDistribution(0.0, 0.5, step=0.1),
    CategoricalDistribution(["plain", "residual", "densenet"]),
])
def test_a_step_moves_a_value_and_stays_inside_its_distribution(dist):
    rng = random.Random(0)
    if isinstance(dist, CategoricalDistribution):
        values = list(dist.choices)
    else:  # both bounds and the middle
        mid = dist.low + ((dist.high - dist.low) / 2 // (dist.step or 1e-9)) * (dist.step or 1e-9)
        values = [dist.low, dist.high, type(dist.low)(mid)]
    for value in values * 100:
        new = step(dist, value, rng)
        assert new != value
        if isinstance(dist, CategoricalDistribution):
            assert new in dist.choices
        else:
            assert dist.low <= new <= dist.high and type(new) is type(dist.low)
            if dist.step is not None:  # on the distribution's grid
                assert abs((new - dist.low) / dist.step - round((new - dist.low) / dist.step)) < 1e-9


def test_mutate_changes_one_to_n_values_and_only_what_can_change():
    dists = {"a": IntDistribution(1, 9), "b": FloatDistribution(0.1, 1.0),
             "c": CategoricalDistribution(["x", "y"]), "fixed": IntDistribution(3, 3)}
    params = {"a": 5, "b": 0.5, "c": "x", "fixed": 3}
    rng = random.Random(1)
    children = [mutate(params, dists, rng, changes=2) for _ in range(100)]
    changed = [sum(child[k] != v for k, v in params.items()) for child in children]
    assert set(changed) == {2}  # exactly `changes` (each step moves its value)
    assert all(mutate(params, dists, rng, changes=9)["fixed"] == 3 for _ in range(20))


def test_non_dominated_keeps_the_front_for_each_direction():
    from optuna.trial import create_trial

    trials = [create_trial(values=v) for v in ([0.9, 300.0], [0.8, 100.0], [0.7, 200.0],
                                               [0.9, 300.0])]
    front = non_dominated(trials, ["maximize", "minimize"])
    assert [t.values for t in front] == [[0.9, 300.0], [0.8, 100.0], [0.9, 300.0]]


def lamarckian_space(**settings):
    data = copy.deepcopy(TIGHT)
    data["constraints"] = {"max_params": 20000}
    data["search"] = {"sampler": "lamarckian",
                      "lamarckian": {"warmup": 4, "explore": 0.0, **settings},
                      "fill_budget": {"fraction": {"float": [0.2, 1.0]}, "bands": 2}}
    data["train"] = {"epochs": 4}
    return make_space(data)


def test_after_the_warm_up_children_of_their_bands_front_are_proposed_and_resume(tmp_path):
    space = lamarckian_space(mutations=2)
    assert space.spec.search.lamarckian.epochs_for(4) == 2  # child_epochs null: half
    cuts = bands.edges(space.spec.search.fill_budget.fraction, 2)
    journal = tmp_path / "s.journal"
    proposer = Proposer(space, sampler="lamarckian", seed=0, storage=journal, study_name="s")

    def ask_and_tell(p: Proposer, n: int) -> list[int]:
        numbers = []
        for _ in range(n):
            number, proposal = p.ask()
            acc = 1 - 1 / (1 + proposal.screened_params / 1000)  # bigger is better, as in life
            p.tell(number, [acc, proposal.screened_params])
            numbers.append(number)
            trial = p.study.trials[number]
            assert (proposal.parent is None) == (PARENT not in trial.user_attrs)
        return numbers

    warm = ask_and_tell(proposer, 4)
    assert all(PARENT not in proposer.study.trials[n].user_attrs for n in warm)
    children = ask_and_tell(proposer, 6)
    resumed = Proposer(space, sampler="lamarckian", seed=0, storage=journal, study_name="s")
    children += ask_and_tell(resumed, 4)  # the population is the journal's
    trials = resumed.study.trials
    for n in children:
        child = trials[n]
        parent = trials[child.user_attrs[PARENT]]
        assert parent.number < n and CONFIG_KEY in parent.user_attrs and parent.values
        # the parent is of the child's band, and on that band's front when the child was asked
        band = child.user_attrs[BAND]
        assert bands.band_of(parent.params[FILL_FRACTION], cuts) == band
        assert cuts[band] <= child.params[FILL_FRACTION] <= cuts[band + 1]
        earlier = [t for t in trials[:n] if CONFIG_KEY in t.user_attrs and t.values
                   and bands.band_of(t.params[FILL_FRACTION], cuts) == band]
        assert parent in non_dominated(earlier, ["maximize", "minimize"])
        changed = {k for k in parent.params if child.params.get(k) != parent.params[k]}
        assert changed and child.user_attrs[CONFIG_KEY] != parent.user_attrs[CONFIG_KEY]


def test_explore_one_means_no_children_and_lamarckian_needs_its_sampler():
    proposer = Proposer(lamarckian_space(explore=1.0), sampler="lamarckian", seed=0)
    for _ in range(8):
        number, p = proposer.ask()
        proposer.tell(number, [0.5, p.screened_params])
        assert p.parent is None
    data = copy.deepcopy(TIGHT)
    data["search"] = {"sampler": "tpe", "lamarckian": {"warmup": 2}}
    with pytest.raises(SpecError, match=r"search\.lamarckian is set but search\.sampler is 'tpe'"):
        make_space(data)


@pytest.mark.parametrize("inherit", [True, False])
def test_the_searcher_hands_a_child_its_parent_and_epochs_unless_inherit_is_false(tmp_path,
                                                                                  inherit):
    from search.run.searcher import ProposerSearcher
    from search.schema import SCREENED_KEY, TRIAL_KEY
    from trainables.trial import CHILD_EPOCHS_KEY, PARENT_KEY

    space = lamarckian_space(inherit=inherit)  # warm-up 4, never exploring, train.epochs 4
    searcher = ProposerSearcher(space, journal=tmp_path / "s.journal", study_name="s",
                                num_samples=10)
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        assert PARENT_KEY not in config
        searcher.on_trial_complete(f"t{i}", {"val_accuracy": 0.5 + i / 10, "test_accuracy": 0.5,
                                             "nonzero_params": config[SCREENED_KEY]})
    config = searcher.suggest("child")
    parent = searcher.proposer.study.trials[int(config[TRIAL_KEY])].user_attrs[PARENT]
    if inherit:  # from the parent's weights, for half the epochs
        assert config[PARENT_KEY] == str(parent) and config[CHILD_EPOCHS_KEY] == 2
    else:  # the same evolution, each child trained from scratch for train.epochs
        assert PARENT_KEY not in config and CHILD_EPOCHS_KEY not in config
