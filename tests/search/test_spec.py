"""The YAML spec: shipped files load, bad files give one precise error, fuzzed specs never crash."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.spec import (
    Choice,
    FloatRange,
    IntRange,
    SearchSpec,
    SpecError,
    load_spec,
    parse_duration,
    parse_spec,
    possible_values,
)
from trainables.data import DataConfig

SPACES = sorted((Path(__file__).parents[2] / "spaces").glob("*.yaml"))

VALID = {
    "name": "tiny",
    "data": {"name": "digits", "val_fraction": 0.2},
    "objectives": {"val_accuracy": "max", "nonzero_params": "min", "macs": "min"},
    "constraints": {"max_params": 5000, "max_macs": None},
    "search": {
        "sampler": "tpe",
        "num_samples": 4,
        "max_concurrent": 2,
        "seed": 1,
        "early_stopping": {"scheduler": "asha", "grace_epochs": 1, "reduction_factor": 2},
        "fill_budget": {"fraction": {"float": [0.5, 1.0]}},
    },
    "resources": {"cpu": 0.5, "gpu": 0},
    "train": {
        "epochs": 2,
        "lr": {"float": [0.001, 0.1], "log": True},
        "prune_rounds": {"choice": [0, 1]},
        "prune_rate": {"float": [0.2, 0.5]},
    },
    "space": {
        "backbone": "none",
        "stem": {"width": {"int": [4, 16], "step": 4}},
        "num_stages": {"int": [1, 2]},
        "block": {"choice": ["plain", "residual", "densenet", "sparsenet"]},
        "conv": {"choice": ["standard", "separable"]},
        "stages": {
            "width": [{"int": [8, 32], "log": True}, 16],
            "growth": {"int": [4, 8]},
            "downsample": {"choice": ["none", "stride", "maxpool"]},
            "compression": {"float": [0.5, 1.0]},
        },
        "head": {"choice": [[], [32], [64, 16]]},
        "head_sparse": {"choice": [False, True]},
        "head_density": {"float": [0.1, 0.9]},
        "dropout": {"float": [0.0, 0.3]},
    },
}


def write(tmp_path: Path, data: object, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_spaces_load_and_round_trip(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.data.name in ("digits", "mnist", "cifar10", "cifar100", "imagefolder")
    assert parse_spec(spec.to_dict(), source=str(path)) == spec
    assert all(not isinstance(v, (dict, list, tuple)) for v in spec.to_flat().values())


def test_shipped_spaces_are_the_documented_set():
    assert {p.name for p in SPACES} >= {
        "quickstart.yaml", "cifar10.yaml", "cifar100.yaml", "mnist.yaml", "intel-scenes.yaml"}
    quick = load_spec(SPACES[[p.name for p in SPACES].index("quickstart.yaml")])
    assert quick.data.name == "digits" and quick.search.max_concurrent == 2
    assert quick.resources.cpu == 1 and quick.constraints.max_params <= 5000
    assert "--max-params 50000" in (SPACES[0].parent / "cifar10.yaml").read_text()


def test_spaces_offering_a_frozen_trunk_rank_and_budget_what_ships():
    """A headline space with a transfer trunk ranks by deploy_params (the trunk's weights ship)
    and budgets it; the lottery-ticket study, about trained params, keeps nonzero_params."""
    offering = [load_spec(p) for p in SPACES
                if set(possible_values(load_spec(p).space.backbone)) - {"none"}]
    assert {s.name for s in offering} >= {"cifar10", "intel-scenes"}
    for spec in offering:
        assert "deploy_params" in {o.metric for o in spec.objectives}, spec.name
        assert "nonzero_params" not in {o.metric for o in spec.objectives}, spec.name
        assert spec.constraints.max_deploy_params, spec.name
    study = load_spec(SPACES[0].parent / "studies" / "lottery-ticket.yaml")
    assert [o.metric for o in study.objectives] == ["val_accuracy", "nonzero_params"]


def test_readme_example_is_a_valid_spec():
    readme = (SPACES[0].parent / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(yaml.safe_load(example), source="README.md")
    assert spec.constraints.max_params == 50000
    assert spec.train["weight_decay"] == FloatRange(1e-5, 1e-3, log=True)
    assert len(spec.space.stages.width) == 4


def test_valid_spec_parses_into_typed_sections(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    assert isinstance(spec, SearchSpec) and spec.source.endswith("spec.yaml")
    assert spec.data == DataConfig(name="digits", val_fraction=0.2)
    assert spec.directions == ["maximize", "minimize", "minimize"]
    assert spec.search.fill_budget.fraction == FloatRange(0.5, 1.0)
    assert spec.search.fill_budget.bands == 1  # no bands unless asked for
    assert spec.search.early_stopping.reduction_factor == 2
    assert spec.resources.cpu == 0.5 and spec.resources.gpu == 0.0
    assert spec.train["lr"] == FloatRange(0.001, 0.1, log=True)
    assert spec.train["epochs"] == 2
    assert spec.space.stem.width == IntRange(4, 16, step=4)
    assert spec.space.stages.width == (IntRange(8, 32, log=True), 16)
    assert spec.space.head == Choice(((), (32,), (64, 16)))
    # defaults fill what the file leaves out
    assert spec.space.pooling == "gap" and spec.search.max_rejects == 1000


def test_defaults_for_a_minimal_spec(tmp_path):
    spec = load_spec(write(tmp_path, {"data": {"name": "digits"}}, "mini.yaml"))
    assert spec.name == "mini"
    assert [(o.metric, o.mode) for o in spec.objectives] == [
        ("val_accuracy", "max"), ("nonzero_params", "min")]
    assert spec.constraints.max_params is None and spec.train == {}


def test_round_trip_and_flat_params(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    again = load_spec(write(tmp_path, spec.to_yaml(), "again.yaml"))
    assert again == spec
    flat = spec.to_flat()
    assert flat["spec/search/num_samples"] == 4
    assert flat["spec/constraints/max_params"] == 5000
    assert flat["spec/train/lr"] == "{float: [0.001, 0.1], log: true}"
    assert flat["spec/space/head"] == "{choice: [[], [32], [64, 16]]}"
    assert flat["spec/space/stages/width"] == "[{int: [8, 32], log: true}, 16]"
    assert all(k.startswith("spec/") for k in flat)


@pytest.mark.parametrize(("text", "seconds"), [
    (90, 90.0), ("90", 90.0), ("90s", 90.0), ("45m", 2700.0), ("1.5h", 5400.0),
    ("2h30m", 9000.0), ("2h 30m", 9000.0), ("1h15m30s", 4530.0), ("45m10s", 2710.0),
    # not durations: no number, units out of order, zero or negative, a word
    ("h", None), ("", None), ("m30", None), ("30m2h", None), ("0m", None), (-1, None),
    ("2 days", None),
])
def test_durations_in_seconds_or_h_m_s_parts(text, seconds):
    assert parse_duration(text) == seconds


def test_overrides_replace_file_values(tmp_path):
    path = write(tmp_path, VALID)
    spec = load_spec(path, num_samples=40, max_params=50_000, seed=7, data_path="/data/x.npz")
    assert spec.search.num_samples == 40
    assert spec.constraints.max_params == 50_000
    assert spec.search.seed == 7
    assert spec.data.path == "/data/x.npz"
    assert load_spec(path, time_budget="1.5h").search.time_budget == 5400.0
    assert load_spec(path, time_budget="2h30m").search.time_budget == 9000.0
    plain = load_spec(path)
    assert plain.search.num_samples == 4
    assert dataclasses.replace(spec.data, path=plain.data.path) == plain.data  # only the path


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"max_params": 0}, "constraints.max_params=0 (command-line override) is invalid"),
        ({"num_samples": -1}, "search.num_samples=-1 (command-line override)"),
        ({"seed": 1.5}, "search.seed=1.5 (command-line override)"),
        ({"time_budget": "soon"}, "search.time_budget='soon' (command-line override) is invalid"),
        ({"time_budget": 0}, "search.time_budget=0 (command-line override)"),
    ],
)
def test_bad_overrides(tmp_path, override, fragment):
    with pytest.raises(SpecError, match=re.escape(fragment)):
        load_spec(write(tmp_path, VALID), **override)


def _with(path: str, value: object) -> dict:
    """VALID with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    d = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return d


# (spec data, expected fragments of the one message: field path, value, what is allowed)
BAD = [
    (_with("space.stages.width", {"int": [8, -3]}),
     ["space.stages.width.int[1]=-3", "expected an integer >= 1"]),
    (_with("space.stages.width", [{"int": [8, 32]}, {"int": [4, 0]}]),
     ["space.stages.width[1].int[1]=0", "an integer >= 1"]),
    (_with("space.stages.widht", 8),
     ["space.stages.widht is not a known key", "did you mean 'width'?"]),
    (_with("space.blok", "plain"), ["space.blok is not a known key", "did you mean 'block'?"]),
    (_with("serach", {}), ["serach is not a known key", "did you mean 'search'?"]),
    (_with("space.block", {"choice": ["plain", "resnet"]}),
     ["space.block.choice[1]='resnet'", "one of plain, residual, densenet, sparsenet"]),
    (_with("space.block", {"choice": []}), ["space.block.choice=[]", "a non-empty list"]),
    (_with("space.block", {"choice": ["plain", "plain"]}),
     ["space.block.choice[1]='plain'", "listed twice"]),
    (_with("space.block", {"chioce": ["plain"]}),
     ["space.block.chioce is not a known key", "did you mean 'choice'?"]),
    (_with("space.block", {"int": [1, 2]}), ["space.block=", "a fixed value or {choice: [...]}"]),
    (_with("space.stem", {"width": {"float": [4.0, 8.0]}}),
     ["space.stem.width=", "{int: [lo, hi]} or {choice: [...]}"]),
    (_with("space.stem", {"width": {"int": [16, 4]}}),
     ["space.stem.width.int=[16, 4]", "lo <= hi"]),
    (_with("space.stem", {"width": {"int": [4, 16], "step": 0}}),
     ["space.stem.width.step=0", "an integer >= 1"]),
    (_with("space.stem", {"width": {"int": [4, 16], "step": 2, "log": True}}),
     ["space.stem.width.step=2", "1 with log: true"]),
    (_with("space.stem", {"stride": 9}), ["space.stem.stride=9", "an integer in [1, 4]"]),
    (_with("space.dropout", {"float": [0.0, 1.5]}),
     ["space.dropout.float[1]=1.5", "a number in [0.0, 1.0]"]),
    (_with("space.dropout", {"float": [0.0, 0.5], "log": True}),
     ["space.dropout.float[0]=0.0", "> 0 with log: true"]),
    (_with("space.dropout", {"float": [0.1, 0.5], "step": 2}),
     ["space.dropout.step", "not allowed with float"]),
    (_with("space.stages.compression", {"float": [0.0, 1.0]}),
     ["space.stages.compression.float[0]=0.0", "(0.0, 1.0]"]),
    (_with("space.head", {"choice": [[], [1, 2, 3, 4, 5]]}),
     ["space.head.choice[1]=[1, 2, 3, 4, 5]", "at most 4 hidden layers"]),
    (_with("space.head", [128, 0]), ["space.head=[128, 0]", "integers >= 1"]),
    (_with("space.head_density", 0.0), ["space.head_density=0.0", "(0.0, 1.0]"]),
    (_with("space.backbone", "vgg"), ["space.backbone='vgg'", "one of none, resnet18, densenet121"]),
    (_with("space.backbone_trainable", "layer3"),
     ["space.backbone_trainable='layer3'", "stage1"]),
    (_with("space.stages.width", [8]),
     ["space.stages.width=[8]", "one value per stage: 2"]),
    (_with("space.stages.downsample", "stride"),
     ["space.stages.downsample='stride'", "densenet/sparsenet stages"]),
    (_with("space.stem", None) | {"space": {**VALID["space"], "stem": None, "num_stages": 0}},
     ["space.num_stages=0", "at least 1 stage when space.stem is null"]),
    (_with("train.lr", {"float": [0.0, 0.1]}), ["train.lr.float[0]=0.0", "a number > 0"]),
    (_with("train.optimizer", "lbfgs"), ["train", "train.optimizer='lbfgs'", "sgd, adamw, adam"]),
    (_with("train.epochs", {"int": [0, 3]}), ["train.epochs.int[0]=0", "an integer >= 1"]),
    (_with("train.epoch", 3), ["train.epoch is not a known key", "did you mean 'epochs'?"]),
    (_with("train.lr", {"int": [1, 2]}), ["train.lr=", "{float: [lo, hi]} or {choice: [...]}"]),
    (_with("data.name", "imagenet"), ["data.name='imagenet'", "digits, mnist"]),
    (_with("data.val_fraction", 1.5), ["data.val_fraction=1.5", "(0, 1)"]),
    (_with("data", ...), ["data is missing", "DataConfig"]),
    (_with("data.pth", "x"), ["data.pth is not a known key", "did you mean 'path'?"]),
    (_with("objectives", {"val_accuracy": "min"}),
     ["objectives.val_accuracy='min'", "expected max"]),
    (_with("objectives", {"nonzero_params": "min"}),
     ["objectives=", "at least one of val_accuracy, val_loss"]),
    (_with("objectives", {"accuracy": "max"}),
     ["objectives.accuracy is not a known key", "did you mean 'val_accuracy'?"]),
    (_with("constraints.max_params", -5), ["constraints.max_params=-5", "an integer >= 1 or null"]),
    (_with("constraints.max_macs", "1e6"), ["constraints.max_macs='1e6'", "an integer >= 1"]),
    (_with("constraints.max_params", None), ["search.fill_budget", "constraints.max_params"]),
    (_with("search.sampler", "cmaes"), ["search.sampler='cmaes'", "one of tpe, nsga2, random"]),
    (_with("search.num_samples", 0), ["search.num_samples=0", "an integer >= 1"]),
    (_with("search.time_budget", "2 days"), ["search.time_budget='2 days'", "90s, 45m, 1.5h"]),
    (_with("search.early_stopping", {"scheduler": "asha", "reduction_factor": 1}),
     ["search.early_stopping.reduction_factor=1", "a number > 1"]),
    (_with("search.early_stopping", {"scheduler": "pbt"}),
     ["search.early_stopping.scheduler='pbt'", "one of asha"]),
    (_with("search.fill_budget", {"fraction": 1.5}),
     ["search.fill_budget.fraction=1.5", "(0, 1]"]),
    (_with("search.fill_budget", {"fraction": {"float": [0.2, 1.0]}, "bands": 0}),
     ["search.fill_budget.bands=0", "an integer >= 1"]),
    (_with("search.fill_budget", {"fraction": 0.9, "bands": 4}),
     ["search.fill_budget.bands=4", "needs a searched fraction", "fraction is 0.9"]),
    (_with("search.fill_budget", {"fraction": {"choice": [0.5, 1.0]}, "bands": 2}),
     ["search.fill_budget.bands=2", "{float: [lo, hi]}", "{'choice': [0.5, 1.0]}"]),
    (_with("search.fill_budget", {"fraction": {"float": [0.2, 1.0]}, "band": 4}),
     ["search.fill_budget.band is not a known key", "did you mean 'bands'?"]),
    (_with("resources.cpu", 0), ["resources.cpu=0", "a number > 0"]),
    (_with("resources.gpu", -1), ["resources.gpu=-1", "a number >= 0"]),
    (_with("name", ""), ["name=''", "a non-empty string"]),
    ([1, 2], ["<top level>=[1, 2]", "a mapping of name, data"]),
]


@pytest.mark.parametrize(("data", "fragments"), BAD, ids=[f[0] for _, f in BAD])
def test_bad_spec_names_file_field_value_and_allowed(tmp_path, data, fragments):
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path):
    path = write(tmp_path, "name: x\ndata:\n  name: digits\nspace: {block: [plain\n")
    with pytest.raises(SpecError, match=re.escape(f"{path}:5:1: invalid YAML")):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read the search spec"):
        load_spec(tmp_path / "nope.yaml")


def test_every_user_input_error_shares_one_root():
    from search.errors import UserError, user_error_types
    from trainables.arch import ArchError
    from trainables.data import DataError
    from trainables.errors import ConfigError
    from trainables.train import TrainConfigError

    assert user_error_types() == (ConfigError,)
    for cls in (SpecError, UserError, ArchError, DataError, TrainConfigError):
        assert issubclass(cls, ConfigError) and issubclass(cls, ValueError), cls


# ---------------------------------------------------------------------- fuzz
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
    st.sampled_from(["", "plain", "stride", "none", "sgd", "max", "min", "resnet18", "x"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["choice", "int", "float", "log", "step", "x"]), inner,
                        max_size=3),
    ),
    max_leaves=6,
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_specs_raise_only_spec_error(data):
    spec = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(spec)
        path = data.draw(st.sampled_from(paths))
        parent = spec
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["x", "choice", "width", "int"]))] = data.draw(_VALUES)
        else:
            parent[path[-1]] = data.draw(_VALUES)
    try:
        result = parse_spec(spec, source="fuzz.yaml")
    except SpecError as e:
        assert str(e).startswith("fuzz.yaml: ")
    else:
        assert isinstance(result, SearchSpec)
        assert parse_spec(result.to_dict(), source="fuzz.yaml") == result


# ---------------------------------------------------------------------- search.initial
MNIST_5K = Path(__file__).parents[2] / "spaces" / "archs" / "mnist-5k.yaml"


def test_initial_points_load_arch_files_and_round_trip(tmp_path, monkeypatch):
    (tmp_path / "archs").mkdir()
    (tmp_path / "archs" / "net.yaml").write_text(MNIST_5K.read_text())
    inline = yaml.safe_load(MNIST_5K.read_text())
    inline["stages"][3]["width"] = 40
    data = yaml.safe_load((MNIST_5K.parents[1] / "mnist.yaml").read_text())
    data["search"]["initial"] = [
        "archs/net.yaml",  # relative to the spec file (the cwd has no archs/)
        {"arch": str(MNIST_5K), "train/lr": 0.05, "label": "five-k"},
        {"arch": inline},
        {"stem/width": 8, "num_stages": 3},
    ]
    monkeypatch.chdir(tmp_path.parent)
    spec = load_spec(write(tmp_path, data))
    points = spec.search.initial
    assert [p.label for p in points] == ["archs/net.yaml", "five-k", "initial[2]", "initial[3]"]
    assert points[0].arch == points[1].arch and points[0].arch.stages[3].width == 48
    assert points[1].params == {"train/lr": 0.05} and points[2].arch.stages[3].width == 40
    assert points[3].arch is None and points[3].params == {"stem/width": 8, "num_stages": 3}
    # the resolved spec holds the networks inline: a resume or a submitted job needs no file
    again = parse_spec(yaml.safe_load(spec.to_yaml()), source="elsewhere.yaml")
    assert again.search.initial == points


@pytest.mark.parametrize(("entry", "fragments"), [
    ("nope.yaml", ["search.initial[0]='nope.yaml' is invalid", "an existing architecture file",
                   "tried"]),
    (3, ["search.initial[0]=3 is invalid", "an architecture file, or a mapping"]),
    ({"arch": {"stages": [{"width": 0}]}}, ["search.initial[0].arch is not a valid network",
                                            "width=0"]),
    ({"train/lr": {"float": [0.1, 0.2]}}, ["search.initial[0].train/lr=", "a number"]),
    ({"arch": 5}, ["search.initial[0].arch=5 is invalid"]),
    ({"label": "", "train/lr": 0.01}, ["search.initial[0].label='' is invalid"]),
])
def test_bad_initial_entries_name_the_entry(tmp_path, entry, fragments):
    data = copy.deepcopy(VALID)
    data["search"]["initial"] = [entry]
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message, message


def test_more_initial_points_than_trials_is_an_error(tmp_path):
    data = copy.deepcopy(VALID)
    data["search"]["initial"] = [{"train/lr": 0.01}] * 5  # num_samples is 4
    with pytest.raises(SpecError, match=r"search.initial holds 5 points, more than "
                                        r"search.num_samples=4"):
        load_spec(write(tmp_path, data))
    load_spec(write(tmp_path, data), num_samples=5)  # the override makes room
