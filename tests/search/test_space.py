"""The Optuna space: conditionals, the budget screen, the Proposer (real Optuna), dry runs."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FixedTrial, TrialState

from search.space import (
    CONFIG_KEY,
    DryRun,
    Proposer,
    SearchSpace,
    check_initial,
    dry_run,
    text_histogram,
)
from search.spec import SpecError, load_spec, parse_spec
from trainables import pruning
from trainables.accounting import count, count_module
from trainables.models import build_model

SPACES = sorted((Path(__file__).parents[2] / "spaces").glob("*.yaml"))
# (C, H, W) and classes per dataset: what load_dataset would report, without loading anything.
SHAPES = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagefolder": ((3, 64, 64), 6),
}

TIGHT = {
    "data": {"name": "digits"},
    "constraints": {"max_params": 5000},
    "train": {"epochs": 1},
    "space": {
        "stem": {"width": {"int": [4, 32], "log": True}},
        "num_stages": {"int": [1, 3]},
        "block": {"choice": ["plain", "residual"]},
        "conv": {"choice": ["standard", "separable"]},
        "stages": {"width": {"int": [8, 64], "log": True}, "layers": {"int": [1, 3]}},
        "head": {"choice": [[], [32], [64, 32]]},
    },
}


def make_space(data: dict, shape=(1, 8, 8), classes=10, **overrides) -> SearchSpace:
    return SearchSpace(parse_spec(data, source="test.yaml", **overrides),
                       input_shape=shape, num_classes=classes)


def run_asks(proposer: Proposer, n: int) -> list[int]:
    """Ask ``n`` feasible proposals, telling each a made-up accuracy that grows with size.

    Returns how many proposals were rejected before each feasible one.
    """
    rejects = []
    for _ in range(n):
        before = proposer.rejected
        number, p = proposer.ask()
        rejects.append(proposer.rejected - before)
        proposer.tell(number, {"val_accuracy": 1 - 100 / (100 + p.screened_params),
                               "nonzero_params": p.screened_params})
    return rejects


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_every_shipped_space_dry_runs(path):
    spec = load_spec(path)
    shape, classes = SHAPES[spec.data.name]
    result = dry_run(spec, 3, input_shape=shape, num_classes=classes)
    # A space with fewer points than asked (the ResNet-8 anchor: one) says it is exhausted and
    # holds exactly what its search trains.
    assert isinstance(result, DryRun) and (len(result.proposals) == 3 or (
        result.exhausted and len(result.proposals) == spec.search.num_samples))
    assert 0 < result.feasible_fraction <= 1 and result.ms_per_screen > 0
    for p in result.proposals:
        assert p.feasible and p.arch.input_size == shape[1:] and p.arch.num_classes == classes
        if spec.constraints.max_params is not None:
            assert p.screened_params <= spec.constraints.max_params
    text = result.text()
    assert f"{len(result.proposals)} feasible proposals" in text and "nonzero params" in text and "MACs" in text


def test_tight_budget_rejects_are_told_and_tpe_learns_faster_than_random():
    space = make_space(TIGHT)
    tpe = Proposer(space, sampler="tpe", seed=0)
    rejects = run_asks(tpe, 30)
    budget = space.spec.constraints.max_params
    feasible = [t for t in tpe.study.trials if t.state == TrialState.COMPLETE
                and t.constraints["max_params"] <= 0]
    over = [t for t in tpe.study.trials if t.constraints["max_params"] > 0]
    # every proposal handed out is within budget; every rejected one is in the study as infeasible
    assert len(feasible) == 30 and len(over) == tpe.rejected > 0
    assert all(t.values[1] <= budget for t in feasible)
    assert all(t.state == TrialState.COMPLETE for t in over)
    # TPE learns from the infeasible trials: fewer rejects later on, and far fewer than random
    assert sum(rejects[15:]) < sum(rejects[:15])
    rand = Proposer(space, sampler="random", seed=0)
    random_rejects = run_asks(rand, 8)
    assert tpe.rejected / (tpe.rejected + 30) < 0.5 * sum(random_rejects) / (sum(random_rejects) + 8)


@pytest.mark.parametrize("sampler", ["nsga2", "random"])
def test_other_samplers_never_return_over_budget(sampler):
    space = make_space(TIGHT)
    proposer = Proposer(space, sampler=sampler, seed=1)
    for _ in range(6):
        number, p = proposer.ask()
        assert p.feasible and p.screened_params <= 5000
        assert p.screened_params == count(p.arch).nonzero_params  # no pruning here
        proposer.tell(number, [0.5, p.screened_params])


def test_too_many_rejects_names_the_smallest_count():
    space = make_space(TIGHT, max_params=60)
    proposer = Proposer(space, sampler="random", seed=0, max_rejects=5)
    with pytest.raises(SpecError) as info:
        proposer.ask()
    message = str(info.value)
    assert message.startswith("test.yaml: 5 proposals in a row were infeasible or already tried")
    assert "the smallest had" in message and "constraints.max_params=60" in message
    assert proposer.rejected == 5



def test_a_config_is_never_handed_out_twice():
    """Two distinct configs in the space: the third ask only finds repeats. A repeat of a
    finished trial is told its values, of a running one FAIL; a failed config may come back."""
    data = {"data": {"name": "digits"}, "train": {"epochs": 1},
            "space": {"stem": {"width": {"choice": [4, 6]}}, "num_stages": 1,
                      "stages": {"width": 8}}}
    proposer = Proposer(make_space(data), sampler="random", seed=0, max_rejects=6)
    (a, pa), (b, pb) = proposer.ask(), proposer.ask()
    assert pa.config != pb.config and proposer.duplicates == 0
    proposer.tell(a, [0.9, pa.screened_params])
    with pytest.raises(SpecError, match="6 repeated a config trained before"):
        proposer.ask()
    assert proposer.duplicates == 6 and proposer.rejected == 0
    trials = proposer.study.get_trials(deepcopy=False)
    repeats = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert len(repeats) == 6 and all(CONFIG_KEY not in t.user_attrs for t in repeats)
    for t in repeats:
        if t.user_attrs["duplicate_of"] == a:
            assert t.state == TrialState.COMPLETE and t.values == [0.9, pa.screened_params]
        else:
            assert t.user_attrs["duplicate_of"] == b and t.state == TrialState.FAIL
    proposer.tell_failed(b)  # it crashed: its config may be tried again
    again = None
    for _ in range(20):
        try:
            again = proposer.ask()
            break
        except SpecError:
            continue
    assert again is not None and again[1].config == pb.config


def test_impossible_shapes_are_infeasible_never_returned():
    data = copy.deepcopy(TIGHT)
    data["constraints"] = {"max_params": None}
    data["space"]["num_stages"] = {"int": [1, 5]}
    data["space"]["stages"]["downsample"] = "maxpool"  # 8x8 halves to 0 after 4 stages
    proposer = Proposer(make_space(data), sampler="random", seed=0)
    for _ in range(10):
        number, p = proposer.ask()
        assert len(p.arch.stages) <= 3
        proposer.tell(number, [0.5, p.screened_params])
    invalid = [t for t in proposer.study.trials if t.constraints["valid"] > 0]
    assert len(invalid) == proposer.rejected > 0
    assert all(t.params["num_stages"] >= 4 for t in invalid)


BROAD = {
    "data": {"name": "cifar10", "path": "unused.npz"},
    "train": {
        "epochs": 2,
        "optimizer": {"choice": ["sgd", "adamw"]},
        "nesterov": {"choice": [True, False]},
        "prune_rounds": {"choice": [0, 1]},
        "prune_rate": {"float": [0.2, 0.5]},
        "prune_scope": {"choice": ["global", "layer"]},
        "rewind_epoch": {"int": [0, 1]},
        "augment": {"choice": ["none", "crop"]},
        "crop_padding": {"int": [2, 4]},
    },
    "space": {
        "backbone": {"choice": ["none", "resnet18"]},
        "batch_norm": {"choice": [True, False]},
        "backbone_trainable": {"choice": ["none", "stage4"]},
        "stem": {"width": {"int": [4, 8]}},
        "num_stages": {"int": [1, 2]},
        "block": {"choice": ["plain", "residual", "densenet", "sparsenet"]},
        "stages": {
            "width": {"int": [4, 8]},
            "growth": {"int": [2, 4]},
            "downsample": {"choice": ["none", "stride", "maxpool"]},
            "compression": {"float": [0.5, 1.0]},
            "padding": {"choice": ["same", "valid"]},
        },
        "head": {"choice": [[], [16], [16, 8]]},
        "head_sparse": {"choice": [False, True]},
        "head_density": {"float": [0.2, 0.8]},
        "head_batch_norm": {"choice": [False, True]},
        "head_dropout": {"float": [0.0, 0.5]},
    },
}


def test_conditionals_follow_sampling_order():
    proposer = Proposer(make_space(BROAD, shape=(3, 16, 16)), sampler="random", seed=3)
    proposals = [proposer.ask()[1] for _ in range(40)]
    seen: set[str] = set()
    for t in proposer.study.trials:
        params = t.params
        if params["backbone"] == "resnet18":
            seen.add("backbone")
            assert "backbone_trainable" in params
            assert not any(k.startswith(("stem/", "stages/"))
                           or k in ("block", "num_stages", "batch_norm") for k in params)
        else:
            assert "backbone_trainable" not in params
            for i in range(params["num_stages"]):
                dense = params["block"] in ("densenet", "sparsenet")
                seen.add(params["block"])
                assert (f"stages/{i}/compression" in params) == dense
                assert (f"stages/{i}/growth" in params) == dense
                assert (f"stages/{i}/width" in params) != dense
                assert (f"stages/{i}/padding" in params) == (params["block"] == "plain")
                if dense:
                    assert params[f"stages/{i}/downsample_dense"] != "stride"
        if params["head"] == "none":
            seen.add("no head")
            assert not any(k.startswith("head_") for k in params)
        else:
            assert {"head_sparse", "head_batch_norm", "head_dropout"} <= set(params)
            assert ("head_density" in params) == params["head_sparse"]
            seen.add(f"sparse={params['head_sparse']}")
        pruned = params["train/prune_rounds"] > 0
        seen.add(f"pruned={pruned}")
        for name in ("prune_rate", "prune_scope", "rewind_epoch"):
            assert (f"train/{name}" in params) == pruned
        assert ("train/nesterov" in params) == (params["train/optimizer"] == "sgd")
        assert ("train/crop_padding" in params) == (params["train/augment"] == "crop")
    # every branch of every conditional was exercised
    assert seen >= {"backbone", "plain", "residual", "densenet", "sparsenet", "no head",
                    "sparse=True", "sparse=False", "pruned=True", "pruned=False"}
    for p in proposals:
        for st in p.arch.stages:
            if st.block in ("plain", "residual"):
                assert st.compression == 1.0
        if p.arch.head and p.arch.head[0].density == 1.0:
            assert p.arch.mask_seed == 0
        assert p.config["arch/num_stages"] == len(p.arch.stages)
        assert p.config["train/prune_rounds"] == p.train.prune_rounds


FIXED = {
    "data": {"name": "digits"},
    "train": {"epochs": 2, "prune_rounds": 3, "prune_rate": 0.35, "prune_scope": "global"},
    "space": {
        "stem": {"width": 12},
        "num_stages": 2,
        "conv": "separable",
        "stages": {"width": [16, 24], "downsample": ["none", "maxpool"]},
        "head": [40, 24],
        "head_sparse": True,
        "head_density": 0.3,
    },
}


@pytest.mark.parametrize(("rounds", "scope"), [(0, "global"), (1, "layer"), (3, "global"),
                                               (3, "layer")])
def test_screened_params_equal_a_really_pruned_model(rounds, scope):
    data = copy.deepcopy(FIXED)
    data["train"].update(prune_rounds=rounds, prune_scope=scope)
    p = make_space(data).sample(FixedTrial({}))
    torch.manual_seed(0)
    model = build_model(p.arch)
    for _ in range(rounds):
        pruning.prune_step(model, rate=p.train.prune_rate, scope=scope)
    real = count_module(model, (1, 8, 8)).nonzero_params
    assert p.screened_params == real
    assert (real < p.accounting.nonzero_params) == (rounds > 0)


def test_fill_budget_lands_just_under_the_sampled_fraction():
    data = copy.deepcopy(TIGHT)
    data["constraints"] = {"max_params": 20000}
    data["search"] = {"fill_budget": {"fraction": {"float": [0.3, 0.9]}}}
    proposer = Proposer(make_space(data), sampler="random", seed=0)
    ratios = []
    for _ in range(6):
        number, p = proposer.ask()
        target = proposer.study.trials[number].params["fill_fraction"] * 20000
        ratios.append(p.screened_params / target)
        proposer.tell(number, [0.5, p.screened_params])
    # integer widths move params in steps: close to, never over, the target
    assert all(0.85 <= r <= 1.0 for r in ratios) and sum(ratios) / len(ratios) >= 0.93
    assert proposer.rejected == 0


def test_backbone_needs_three_channels():
    data = copy.deepcopy(BROAD)
    with pytest.raises(SpecError, match=r"test.yaml: space.backbone can be 'resnet18'.*1 channel"):
        make_space(data, shape=(1, 16, 16))


def test_journal_storage_resume_keeps_trials(tmp_path):
    storage = tmp_path / "study.journal"
    space = make_space(TIGHT)
    first = Proposer(space, sampler="tpe", seed=0, storage=storage, study_name="s")
    run_asks(first, 4)
    running, _ = first.ask()
    stored = len(first.study.trials)
    assert first.rejected > 0 and stored == 5 + first.rejected

    resumed = Proposer(space, sampler="tpe", seed=0, storage=storage, study_name="s")
    assert len(resumed.study.trials) == stored
    assert [t.params for t in resumed.study.trials] == [t.params for t in first.study.trials]
    resumed.tell(running, [0.9, 100])  # the interrupted trial finishes after the restart
    number, _ = resumed.ask()
    assert number >= stored
    assert resumed.study.trials[running].state == TrialState.COMPLETE

    # Ray pickles the searcher: the copy sees the same journal and goes on
    clone = pickle.loads(pickle.dumps(resumed))
    assert len(clone.study.trials) == len(resumed.study.trials)
    assert clone.ask()[0] > number


def test_tell_variants_and_in_memory_pickle():
    proposer = Proposer(make_space(TIGHT), sampler="tpe", seed=0)
    numbers = [proposer.ask()[0] for _ in range(4)]
    proposer.tell(numbers[0], {"val_accuracy": 0.8, "nonzero_params": 1000, "loss": 3.0})
    proposer.tell(numbers[1], [0.7, 900])
    proposer.tell_pruned(numbers[2])
    proposer.tell_failed(numbers[3])
    proposer.tell(numbers[0], [0.1, 1])  # a second tell is ignored
    trials = proposer.study.trials
    assert trials[numbers[0]].values == [0.8, 1000]
    assert trials[numbers[1]].state == TrialState.COMPLETE
    assert trials[numbers[2]].state == TrialState.PRUNED
    assert trials[numbers[3]].state == TrialState.FAIL
    clone = pickle.loads(pickle.dumps(proposer))
    assert len(clone.study.trials) == len(trials) and clone.space.spec == proposer.space.spec
    assert clone.ask()[1].feasible


def test_space_pickles_without_its_cache():
    space = make_space(FIXED)
    p = space.sample(FixedTrial({}))
    clone = pickle.loads(pickle.dumps(space))
    assert clone._cache == {} and clone.sample(FixedTrial({})) == p


def test_sample_with_fixed_trial_encodes_head_choices():
    data = copy.deepcopy(TIGHT)
    trial = FixedTrial({"stem/width": 4, "num_stages": 1, "block": "plain", "conv": "standard",
                        "stages/0/width": 8, "stages/0/layers": 1, "head": "64-32"})
    p = make_space(data).sample(trial)
    assert [h.width for h in p.arch.head] == [64, 32]
    assert p.params["head"] == "64-32"
    assert p.violations == {"max_params": p.screened_params - 5000}


def test_text_histogram():
    assert text_histogram([]) == "  (none)"
    lines = text_histogram([10, 100, 1000, 1000], bins=3, width=10).splitlines()
    assert len(lines) == 3 and lines[-1].endswith("########## 2")
    assert optuna.logging.get_verbosity() <= optuna.logging.WARNING


# ---------------------------------------------------------------------- search.initial
MNIST_SPACE = Path(__file__).parents[2] / "spaces" / "mnist.yaml"
MNIST_5K = MNIST_SPACE.parent / "archs" / "mnist-5k.yaml"


def mnist_data(*initial) -> dict:
    import yaml

    data = yaml.safe_load(MNIST_SPACE.read_text())
    data["search"]["initial"] = list(initial)
    return data


def test_initial_points_are_asked_first_and_exactly_as_given(tmp_path):
    from trainables.arch import ArchConfig

    arch = ArchConfig.load(MNIST_5K)
    data = mnist_data({"arch": str(MNIST_5K), "train/lr": 0.05},
                      {"stem/width": 8, "num_stages": 3, "stages/0/layers": 2, "train/lr": 0.1})
    space = make_space(data, shape=(1, 28, 28))
    storage = tmp_path / "study.journal"
    proposer = Proposer(space, sampler="tpe", seed=0, storage=storage, study_name="s")
    n0, first = proposer.ask()
    n1, second = proposer.ask()
    assert n0 == 0 and n1 >= 1
    # an over-budget draw of the second point's open values is retried, not dropped
    assert [t.user_attrs.get("initial") for t in proposer.study.trials[1:n1 + 1]] == \
        ["initial[1]"] * n1
    # the network trains as it is written: not rescaled by the fill, nothing resampled
    assert first.arch == arch and first.screened_params == 4498
    assert first.train.lr == 0.05
    assert proposer.study.trials[0].user_attrs["initial"] == str(MNIST_5K)
    # params alone fix what they name; the sampler fills in the rest (fill included)
    assert second.train.lr == 0.1 and len(second.arch.stages) == 3
    assert second.arch.stages[0].layers == 2
    assert second.screened_params <= 5000
    proposer.tell(n0, [0.99, 4498])
    # a resumed study has them stored: nothing is enqueued twice
    resumed = Proposer(space, sampler="tpe", seed=0, storage=storage, study_name="s")
    numbers = [resumed.ask()[0] for _ in range(2)]
    assert numbers[0] >= 2 and all("initial" not in resumed.study.trials[n].user_attrs
                                   for n in numbers)
    # the sampler's own proposals follow
    fresh = [proposer.study.trials[n] for n in numbers]
    assert all(t.state == TrialState.RUNNING for t in fresh)


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"stem/width": 40}, "stem/width=40 is outside the space: expected an integer in [4, 16]"),
    ({"stages/0/padding": "reflect"},
     "stages/0/padding='reflect' is outside the space: expected one of 'same', 'valid'"),
    ({"num_stages": True}, "num_stages=True is outside the space"),
    ({"train/lr": 1.5}, "train/lr=1.5 is outside the space: expected a number in [0.02, 0.2]"),
    ({"train/epochs": 3}, "train/epochs is not a parameter of this point"),
    ({"num_stages": 3, "stages/3/width": 8}, "stages/3/width is not a parameter of this point"),
    ({"arch": str(MNIST_5K), "stem/width": 8}, "stem/width is given beside arch"),
])
def test_initial_points_outside_the_space_name_the_value(entry, fragment):
    with pytest.raises(SpecError) as info:
        check_initial(parse_spec(mnist_data(entry), source="mnist.yaml"))
    assert str(info.value).startswith("mnist.yaml: search.initial[0] (")
    assert fragment in str(info.value), str(info.value)


def test_reading_a_spec_checks_no_initial_point_the_search_start_does():
    # parse_spec builds no network (no search.space import while reading YAML) ...
    spec = parse_spec(mnist_data({"stem/width": 40}), source="mnist.yaml")
    # ... the dry run and preflight (both through check_initial) refuse the point
    with pytest.raises(SpecError, match=r"stem/width=40 is outside the space"):
        dry_run(spec, 1, input_shape=(1, 28, 28), num_classes=10)
    from search.run.preflight import preflight

    with pytest.raises(SpecError, match=r"stem/width=40 is outside the space"):
        preflight(spec, address=None, tracking_uri=None, mlflow=False)


def test_an_initial_network_must_be_one_the_space_builds():
    import yaml

    net = yaml.safe_load(MNIST_5K.read_text())
    net["stages"][0]["kernel"] = 5  # the space fixes kernel 3
    with pytest.raises(SpecError, match=r"the network is outside the space: "
                                        r"arch/stages/0/kernel is 5, the space gives 3"):
        check_initial(parse_spec(mnist_data({"arch": net}), source="mnist.yaml"))
    big = yaml.safe_load(MNIST_5K.read_text())
    big["stages"][3]["width"] = 64
    with pytest.raises(SpecError, match=r"the network is over budget: \+[\d,]+ params over "
                                        r"constraints.max_params"):
        check_initial(parse_spec(mnist_data({"arch": big}), source="mnist.yaml"))
    small = yaml.safe_load(MNIST_5K.read_text())
    for stage in small["stages"]:
        stage["width"] = 8
    small["stem"]["width"] = 4  # 674 params: under the fill's low end (12% of 20,000)
    with pytest.raises(SpecError, match=r"fill_budget would scale it to [\d,]+ params"):
        check_initial(parse_spec(mnist_data({"arch": small}), source="mnist.yaml", max_params=20000))
    # taking the fill's word for it is allowed
    check_initial(parse_spec(mnist_data({"arch": small, "fill_fraction": 0.12}),
                             source="mnist.yaml", max_params=20000))
    # a network for other data fails when the search meets the data
    spec = parse_spec(mnist_data(str(MNIST_5K)), source="mnist.yaml")
    with pytest.raises(SpecError, match=r"takes 1x28x28 inputs in 10 classes, the data has "
                                        r"3x32x32 images in 10"):
        SearchSpace(spec, input_shape=(3, 32, 32), num_classes=10)
