from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trainables.arch import (
    ACTIVATIONS,
    BACKBONE_STAGES,
    BLOCK_TYPES,
    CONV_TYPES,
    DOWNSAMPLES,
    ORDERS,
    PADDINGS,
    POOLINGS,
    TRANSITIONS,
    ArchConfig,
    ArchError,
    HeadLayer,
    StageConfig,
    StemConfig,
)

# Probabilities and densities on a grid: canonical() prints them with :g (6 significant digits).
fractions = st.sampled_from([0.0, 0.1, 0.25, 0.5])
densities = st.sampled_from([1.0, 0.75, 0.3, 0.05])

@st.composite
def stage_dicts(draw: st.DrawFn) -> dict:
    """A stage that passes StageConfig.validate (the whole net may still shrink to 0x0)."""
    block = draw(st.sampled_from(BLOCK_TYPES))
    agg = block in ("densenet", "sparsenet")
    d = {
        "block": block, "conv": draw(st.sampled_from(CONV_TYPES)),
        "width": draw(st.integers(1, 256)), "layers": draw(st.integers(1, 12)),
        "kernel": draw(st.integers(1, 7)),
        "downsample": draw(st.sampled_from([d for d in DOWNSAMPLES if not (agg and d == "stride")])),
        "compression": draw(st.sampled_from([1.0, 0.5, 0.25])) if agg else 1.0,
        "bias": draw(st.booleans()),
        "padding": draw(st.sampled_from(PADDINGS)) if block == "plain" else "same",
        # the published forms (aggregating / residual stages only)
        "order": draw(st.sampled_from(ORDERS)) if agg else "post",
        "transition": draw(st.sampled_from(TRANSITIONS)) if agg else "auto",
        "bottleneck": draw(st.sampled_from([0, 0, 2, 4])) if agg else 0,
        "shortcut_bn": draw(st.booleans()) if block == "residual" else True,
    }
    if d["transition"] == "never":
        d["compression"] = 1.0  # compression is the transition's
    return d


stem_dicts = st.fixed_dictionaries({
    "width": st.integers(1, 128), "kernel": st.integers(1, 7), "stride": st.integers(1, 4),
    "conv": st.sampled_from(CONV_TYPES), "bias": st.booleans(), "bn_act": st.booleans(),
})
backbone_dicts = st.sampled_from(sorted(BACKBONE_STAGES)).flatmap(lambda name: st.fixed_dictionaries({
    "name": st.just(name), "trainable": st.sampled_from(BACKBONE_STAGES[name]),
    "weights": st.sampled_from([None, "w/resnet.pt", "v/densenet.pth"]),
}))


@st.composite
def arch_dicts(draw: st.DrawFn) -> dict:
    d = {
        "in_channels": draw(st.integers(1, 4)),
        "input_size": [draw(st.integers(8, 64)), draw(st.integers(8, 64))],
        "num_classes": draw(st.integers(2, 100)),
        "batch_norm": draw(st.booleans()), "activation": draw(st.sampled_from(ACTIVATIONS)),
        "dropout": draw(fractions), "pooling": draw(st.sampled_from(POOLINGS)),
        "head": draw(st.lists(st.fixed_dictionaries({"width": st.integers(1, 2048), "density": densities}),
                              max_size=4)),
        "head_batch_norm": draw(st.booleans()), "head_dropout": draw(fractions),
        "mask_seed": draw(st.integers(0, 3)),
    }
    if draw(st.booleans()):
        d |= {"in_channels": 3, "stem": None, "stages": [], "backbone": draw(backbone_dicts)}
    else:
        d |= {"stem": draw(st.none() | stem_dicts), "stages": draw(st.lists(stage_dicts(), max_size=3)),
              "final_bn_act": draw(st.booleans())}
    return d


def to_arch(d: dict) -> ArchConfig:
    try:
        return ArchConfig.from_dict(d)
    except ArchError:
        assume(False)
        raise


archs = arch_dicts().map(to_arch)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(archs)
def test_round_trips(arch: ArchConfig) -> None:
    flat = arch.to_flat()
    assert all(k.startswith("arch/") for k in flat)
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert ArchConfig.from_flat(flat) == arch
    assert ArchConfig.from_flat({**flat, "train/lr": 0.1}) == arch  # other prefixes are ignored
    assert ArchConfig.from_dict(arch.to_dict()) == arch
    assert ArchConfig.from_yaml(arch.to_yaml()) == arch
    assert hash(arch) == hash(ArchConfig.from_flat(flat))


def net_identity(arch: ArchConfig) -> dict:
    """What makes two configs different networks: mask_seed matters only with a sparse head."""
    flat = arch.to_flat()
    if not any(h.sparse for h in arch.head):
        flat.pop("arch/mask_seed")
    return flat


@st.composite
def near_pairs(draw: st.DrawFn) -> tuple[ArchConfig, ArchConfig]:
    """Two configs that share most fields: the second takes each flat key from either."""
    a, b = draw(archs), draw(archs)
    fa, fb = a.to_flat(), b.to_flat()
    if fa.keys() == fb.keys():
        mixed = {k: fa[k] if draw(st.booleans()) else fb[k] for k in fa}
    else:
        mixed = {k: v for k, v in fb.items() if k.split("/")[1] not in {"stem", "stages", "num_stages"}}
        mixed |= {k: v for k, v in fa.items() if k.split("/")[1] in {"stem", "stages", "num_stages"}}
    try:
        return a, ArchConfig.from_flat(mixed)
    except ArchError:
        assume(False)
        raise


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(near_pairs())
def test_canonical_differs_for_different_nets(pair: tuple[ArchConfig, ArchConfig]) -> None:
    a, b = pair
    assume(net_identity(a) != net_identity(b))
    assert a.canonical() != b.canonical()
    assert a.key() != b.key()
    assert len(a.key()) == 12


def test_canonical_examples() -> None:
    arch = ArchConfig(
        stem=StemConfig(width=32, stride=2),
        stages=(StageConfig(block="residual", conv="separable", width=32, layers=2),
                StageConfig(block="residual", conv="separable", width=64, layers=2, downsample="stride")),
        head=(HeadLayer(128, density=0.3),),
    )
    assert arch.canonical() == "sep|s32/2|res2x32,res2x64/s|gap|h128@0.3|r0"
    assert str(ArchConfig.load(Path(__file__).resolve().parents[2] / "spaces/archs/cnn704k.yaml")) == (
        "std|s32/2|plain1x64/s,plain1x128/s,plain4x128|maxpool|h128|hbn")
    # mask_seed names the net only when a head layer is sparse
    assert ArchConfig(mask_seed=1).canonical() == ArchConfig().canonical()
    assert arch.replace(mask_seed=1).canonical() != arch.canonical()


def test_canonical_names_the_published_forms() -> None:
    dense = StageConfig(block="densenet", width=12, layers=16, bias=False, order="pre", bottleneck=4,
                        compression=0.5, transition="always")
    arch = ArchConfig(stem=StemConfig(width=24, bias=False, bn_act=False),
                      stages=(dense, dataclasses.replace(dense, transition="never", compression=1.0)),
                      final_bn_act=True)
    assert arch.canonical() == "std|s24nbraw|dense16x12c0.5nbpreb4tr,dense16x12nbpreb4notr|gap|fbn"
    res = StageConfig(block="residual", width=32, downsample="stride", shortcut_bn=False)
    assert ArchConfig(stages=(res,)).canonical() == "std|s32|res1x32/snosbn|gap"


def test_old_names_and_keys_are_unchanged() -> None:
    """Configs that leave the published-form fields at their defaults keep their run names and
    dedup keys (the values recorded before those fields existed)."""
    archs = Path(__file__).resolve().parents[2] / "spaces" / "archs"
    assert ArchConfig().key() == "297a3f951f59"
    assert ArchConfig.load(archs / "sparsenet_cifar.yaml").key() == "4dc3b2d6c6ba"
    assert ArchConfig.load(archs / "cnn704k.yaml").key() == "fcf24d713400"
    assert ArchConfig().canonical() == "std|s32|plain1x32|gap"
    # a flat dict recorded before the fields existed still loads, with the defaults
    old = {k: v for k, v in ArchConfig().to_flat().items()
           if k.rsplit("/", 1)[-1] not in {"bn_act", "order", "transition", "bottleneck", "shortcut_bn",
                                           "final_bn_act"}}
    assert ArchConfig.from_flat(old) == ArchConfig()
    # and a non-default value changes both
    pre = ArchConfig(final_bn_act=True)
    assert pre.key() != ArchConfig().key() and pre.canonical() != ArchConfig().canonical()


# (nested dict given to from_dict, the message it must raise: field path and value)
BAD = [
    ({"in_channels": 0}, "in_channels=0 is invalid"),
    ({"input_size": [32]}, "input_size=(32,) is invalid"),
    ({"input_size": [32, 0]}, "input_size[1]=0 is invalid"),
    ({"num_classes": 1}, "num_classes=1 is invalid"),
    ({"batch_norm": "yes"}, "batch_norm='yes' is invalid"),
    ({"activation": "tanh"}, "activation='tanh' is invalid"),
    ({"dropout": 1.0}, "dropout=1.0 is invalid"),
    ({"pooling": "avg"}, "pooling='avg' is invalid"),
    ({"head": [8, 8, 8, 8, 8]}, "head=5 is invalid"),
    ({"head": [{"width": 0}]}, "head[0].width=0 is invalid"),
    ({"head": [{"width": 8, "density": 0}]}, "head[0].density=0 is invalid"),
    ({"head": [{"width": 8, "dense": True}]}, "head[0].dense is not a known field"),
    ({"head_dropout": -0.1}, "head_dropout=-0.1 is invalid"),
    ({"mask_seed": -1}, "mask_seed=-1 is invalid"),
    ({"stem": {"stride": 5}}, "stem.stride=5 is invalid"),
    ({"stem": {"colour": 1}}, "stem.colour is not a known field"),
    ({"stem": None, "stages": []}, "stages=() is invalid"),
    ({"stages": [{"block": "plian"}]}, "stages[0].block='plian' is invalid"),
    ({"stages": [{}, {"layers": 0}]}, "stages[1].layers=0 is invalid"),
    ({"stages": [{"widht": 3}]}, "stages[0].widht is not a known field"),
    ({"stages": [{"compression": 0.5}]}, "stages[0].compression=0.5 is invalid"),
    ({"stages": [{"block": "densenet", "downsample": "stride"}]}, "stages[0].downsample='stride' is invalid"),
    ({"stages": [{"block": "residual", "padding": "valid"}]}, "stages[0].padding='valid' is invalid"),
    ({"stages": [{}, {"block": "sparsenet", "padding": "valid"}]}, "stages[1].padding='valid' is invalid"),
    ({"input_size": [4, 4], "stages": [{"downsample": "maxpool"}] * 3}, "stages[2] shrinks the 4x4 input to 0x0"),
    ({"input_size": [4, 4], "stages": [{"downsample": "maxpool"}] * 2, "pooling": "pool_flatten"},
     "pooling='pool_flatten' is invalid: the last feature map is 1x1"),
    ({"stem": None, "stages": [], "backbone": {"name": "vgg"}}, "backbone.name='vgg' is invalid"),
    ({"stem": None, "stages": [], "backbone": {"trainable": "layer9"}}, "backbone.trainable='layer9' is invalid"),
    ({"backbone": {"name": "resnet18"}}, "backbone='resnet18' replaces stem and stages"),
    ({"stages": [{"block": "densenet", "order": "bn-first"}]}, "stages[0].order='bn-first' is invalid"),
    ({"stages": [{"order": "pre"}]}, "stages[0].order='pre' is invalid: order applies only to densenet"),
    ({"stages": [{"block": "sparsenet", "transition": "yes"}]}, "stages[0].transition='yes' is invalid"),
    ({"stages": [{"block": "residual", "transition": "always"}]}, "stages[0].transition='always' is invalid"),
    ({"stages": [{"block": "densenet", "bottleneck": -1}]}, "stages[0].bottleneck=-1 is invalid"),
    ({"stages": [{"block": "densenet", "bottleneck": 17}]}, "stages[0].bottleneck=17 is invalid"),
    ({"stages": [{"block": "plain", "bottleneck": 4}]}, "stages[0].bottleneck=4 is invalid"),
    ({"stages": [{"block": "densenet", "transition": "never", "compression": 0.5}]},
     "stages[0].compression=0.5 is invalid with transition='never'"),
    ({"stages": [{"block": "densenet", "shortcut_bn": False}]}, "stages[0].shortcut_bn=False is invalid"),
    ({"stages": [{"block": "residual", "shortcut_bn": "no"}]}, "stages[0].shortcut_bn='no' is invalid"),
    ({"stem": {"bn_act": 1}}, "stem.bn_act=1 is invalid"),
    ({"final_bn_act": "yes"}, "final_bn_act='yes' is invalid"),
    ({"stem": None, "stages": [], "backbone": {"name": "resnet18"}, "final_bn_act": True},
     "final_bn_act=True is invalid"),
    ({"colour": "red"}, "colour is not a known field"),
]


@pytest.mark.parametrize(("d", "message"), BAD, ids=[m for _, m in BAD])
def test_validation_errors_name_the_field_and_value(d: dict, message: str) -> None:
    with pytest.raises(ArchError) as e:
        ArchConfig.from_dict(d)
    assert message in str(e.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "net.yaml"
    path.write_text("stages:\n  - {block: residual, width: -3}\n")
    with pytest.raises(ArchError, match=r"net.yaml: stages\[0\].width=-3 is invalid"):
        ArchConfig.load(path)
    path.write_text("stages: [\n")
    with pytest.raises(ArchError, match=r"net\.yaml: not valid YAML"):
        ArchConfig.load(path)
    with pytest.raises(ArchError, match="cannot read architecture file"):
        ArchConfig.load(tmp_path / "missing.yaml")
