from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from trainables.accounting import Accounting, count, count_built, count_module
from trainables.arch import (
    BLOCK_TYPES,
    ArchConfig,
    ArchError,
    BackboneConfig,
    HeadLayer,
    StageConfig,
    StemConfig,
)
from trainables.layers import mask_ones
from trainables.models import build_model

ARCHS = Path(__file__).resolve().parents[2] / "spaces" / "archs"


def real_count(arch: ArchConfig) -> Accounting:
    torch.manual_seed(0)
    return count_module(build_model(arch), (arch.in_channels, *arch.input_size))


def family(block: str, conv: str = "standard") -> ArchConfig:
    agg = block in ("densenet", "sparsenet")
    stages = (StageConfig(block=block, conv=conv, width=4, layers=3),
              StageConfig(block=block, conv=conv, width=6, layers=2,
                          downsample="avgpool" if agg else "stride", compression=0.5 if agg else 1.0))
    return ArchConfig(input_size=(10, 10), stem=StemConfig(width=6), stages=stages,
                      head=(HeadLayer(12, density=0.3), HeadLayer(8)), head_batch_norm=True, dropout=0.1)


@pytest.mark.parametrize("arch", [family(b, c) for b in BLOCK_TYPES for c in ("standard", "separable")],
                         ids=lambda a: a.canonical())
def test_meta_count_equals_real_count(arch: ArchConfig) -> None:
    meta = count(arch)
    assert meta == real_count(arch)
    assert meta.nonzero_params < meta.trainable_params  # the sparse head layer
    assert sum(r.params for r in meta.layers) == meta.total_params
    assert sum(r.macs for r in meta.layers) == meta.macs
    assert sum(r.nonzero_macs for r in meta.layers) == meta.nonzero_macs


@st.composite
def small_archs(draw: st.DrawFn) -> ArchConfig:
    """Small buildable configs of every family (odd kernels; 'same' padding unless plain)."""
    stages = []
    for _ in range(draw(st.integers(0, 3))):
        block = draw(st.sampled_from(BLOCK_TYPES))
        agg = block in ("densenet", "sparsenet")
        downs = ["none", "maxpool", "avgpool"] + ([] if agg else ["stride"])
        stages.append({
            "block": block, "conv": draw(st.sampled_from(["standard", "separable"])),
            "width": draw(st.integers(1, 6)), "layers": draw(st.integers(1, 4)),
            "kernel": draw(st.sampled_from([1, 3, 5])), "downsample": draw(st.sampled_from(downs)),
            "compression": draw(st.sampled_from([1.0, 0.5, 0.3])) if agg else 1.0,
            "bias": draw(st.booleans()),
            "padding": draw(st.sampled_from(["same", "valid"])) if block == "plain" else "same",
        })
    stem = draw(st.none() | st.fixed_dictionaries({
        "width": st.integers(1, 6), "kernel": st.sampled_from([1, 3]), "stride": st.integers(1, 2),
        "conv": st.sampled_from(["standard", "separable"]), "bias": st.booleans()}))
    head = draw(st.lists(st.fixed_dictionaries({
        "width": st.integers(1, 20), "density": st.sampled_from([1.0, 0.5, 0.1, 0.01])}), max_size=3))
    d = {
        "in_channels": draw(st.integers(1, 3)), "input_size": [draw(st.integers(5, 14)), draw(st.integers(5, 14))],
        "num_classes": draw(st.integers(2, 7)), "stem": stem, "stages": stages, "head": head,
        "batch_norm": draw(st.booleans()), "activation": draw(st.sampled_from(["relu", "gelu", "hardswish"])),
        "pooling": draw(st.sampled_from(["gap", "gmp", "maxpool", "flatten", "pool_flatten"])),
        "head_batch_norm": draw(st.booleans()), "mask_seed": draw(st.integers(0, 5)),
    }
    try:
        return ArchConfig.from_dict(d)
    except ArchError:
        assume(False)
        raise


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(small_archs())
def test_random_configs_meta_count_equals_real_count(arch: ArchConfig) -> None:
    meta = count(arch)
    torch.manual_seed(0)
    model = build_model(arch)
    assert meta == count_module(model, (arch.in_channels, *arch.input_size))
    assert meta == count_built(model, (arch.in_channels, *arch.input_size))  # what a trial uses
    assert sum(r.params for r in meta.layers) == meta.total_params
    assert sum(r.macs for r in meta.layers) == meta.macs
    weights = [(h, model.head[i].linear.weight.numel()) for i, h in enumerate(arch.head)]
    assert meta.trainable_params - meta.nonzero_params == sum(n - mask_ones(h.density, n) for h, n in weights)


def test_separable_model_2_of_study_004() -> None:
    acc = count(ArchConfig.load(ARCHS / "cnn104k_separable.yaml"))
    rows = [(r.type, r.params, r.macs, r.output_shape) for r in acc.layers if r.type == "Separable Conv"]
    # Study 004's table gives 167936 and 149504 MACs for the two strided separable convs: it
    # counts their depthwise part twice (32*9*8*8 = 18432 and 64*9*4*4 = 9216 extra). Ours:
    # depthwise at the output size + pointwise, 18432 + 131072 and 9216 + 131072. Its stride-1
    # rows (280576 = 18432 + 262144) agree with ours, as do all of its params.
    assert rows == [
        ("Separable Conv", 2400, 149504, (8, 8, 64)),
        ("Separable Conv", 8896, 140288, (4, 4, 128)),
        *[("Separable Conv", 17664, 280576, (4, 4, 128))] * 4,
    ]
    assert acc.total_params == 104106  # the study's total
    assert acc.macs == 1678592 - 18432 - 9216


def test_sparse_head_nonzeros_and_macs() -> None:
    arch = ArchConfig(stem=StemConfig(width=8), stages=(), input_size=(4, 4),
                      head=(HeadLayer(512, density=0.25), HeadLayer(128, density=0.1)))
    acc = count(arch)
    first, second = (r for r in acc.layers if r.type == "Sparse Dense")
    assert (first.params, first.nonzero, first.macs, first.nonzero_macs) == (8 * 512 + 512, 1024 + 512, 4096, 1024)
    kept = round(0.1 * 512 * 128)
    assert (second.params, second.nonzero, second.macs, second.nonzero_macs) == (
        512 * 128 + 128, kept + 128, 512 * 128, kept)
    assert acc.trainable_params - acc.nonzero_params == (4096 - 1024) + (512 * 128 - kept)


def test_pruned_weights_count_as_zero() -> None:
    arch = ArchConfig(input_size=(8, 8), stem=StemConfig(width=4), stages=(StageConfig(width=8),),
                      head=(HeadLayer(16, density=0.5),))
    torch.manual_seed(0)
    model = build_model(arch)
    before = count_module(model, (3, 8, 8))
    conv = model.stages[0].blocks[0].conv  # 8*4*3*3 = 288 weights
    prune.l1_unstructured(conv, "weight", amount=96)
    prune.l1_unstructured(model.head[0].linear, "weight", amount=0.25)  # on top of the 0.5 mask
    after = count_module(model, (3, 8, 8))
    assert count_built(model, (3, 8, 8)) == after  # a trial's per-round count, same figures
    assert after.trainable_params == before.trainable_params
    # the head's 64 masked zeros are the smallest magnitudes: pruning 25% of 128 removes 32 of
    # them and no kept weight, so only the conv's 96 are new zeros
    assert before.nonzero_params - after.nonzero_params == 96
    row = next(r for r in after.layers if r.name == "stages.0.blocks.0.conv")
    assert row.nonzero == 288 - 96 + 8 and row.macs == 288 * 64 and row.nonzero_macs == 192 * 64
    prune.remove(conv, "weight")  # permanent: plain zeros in a plain weight still count as zeros
    assert count_module(model, (3, 8, 8)).nonzero_params == after.nonzero_params


def test_counting_leaves_the_model_as_it_was() -> None:
    model = build_model(ArchConfig(input_size=(8, 8), head=(HeadLayer(4),), head_batch_norm=True))
    model.train()
    model.stages[0].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count_module(model, (3, 8, 8))
    count_built(model, (3, 8, 8))
    assert model.training and not model.stages[0].training and model.head.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    forwards = [m for m in model.modules() if "forward" in m.__dict__]
    assert forwards == []  # the pass-through patches are gone
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_bn_buffers_are_mean_and_var_only() -> None:
    acc = count(ArchConfig.load(ARCHS / "cnn704k.yaml"))
    assert acc.bn_buffers == 2 * (32 + 64 + 5 * 128 + 128) == 1728
    assert count(ArchConfig(batch_norm=False)).bn_buffers == 0


def test_backbone_frozen_params() -> None:
    trunk = 11_689_512 - (512 * 1000 + 1000)  # torchvision resnet18 minus its ImageNet fc
    layer4 = sum(p.numel() for p in build_model_layer4().parameters())
    arch = ArchConfig(stem=None, stages=(), backbone=BackboneConfig(trainable="layer4", weights="/no/such.pt"))
    acc = count(arch)  # the weights file is never opened
    assert acc.frozen_params == trunk - layer4
    assert acc.trainable_params == acc.nonzero_params == layer4 + 512 * 10 + 10
    assert acc.deploy_params == trunk + 512 * 10 + 10  # every weight it ships, frozen ones too
    assert acc.bn_buffers == 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)
    frozen_rows = [r for r in acc.layers if r.trainable == 0 and r.type == "Convolution"]
    assert frozen_rows and frozen_rows[0].name == "backbone.conv1"
    assert sum(r.params for r in acc.layers) == acc.total_params


def build_model_layer4() -> nn.Module:
    from torchvision.models import resnet18

    with torch.device("meta"):
        return resnet18().layer4


def test_to_dict_and_table() -> None:
    acc = count(ArchConfig.load(ARCHS / "cnn704k.yaml"))
    d = json.loads(json.dumps(acc.to_dict()))
    assert {k: d[k] for k in ("trainable_params", "nonzero_params", "frozen_params", "bn_buffers",
                              "macs", "nonzero_macs", "total_params", "deploy_params")} == {
        "trainable_params": 703114, "nonzero_params": 703114, "frozen_params": 0, "bn_buffers": 1728,
        "macs": 12035328, "nonzero_macs": 12035328, "total_params": 704842,
        "deploy_params": 703114}  # trained from scratch: what ships is what trains
    assert d["layers"][0] == {"name": "stem.conv", "type": "Convolution", "params": 896, "trainable": 896,
                              "nonzero": 896, "macs": 221184, "nonzero_macs": 221184,
                              "output_shape": [16, 16, 32],
                              # int8: 864 weights + 32 fp32 scales + 32 int32 biases (BN folded);
                              # fp32: 4 * (864 + 32); SRAM: the 3x32x32 input + the 32x16x16 output
                              "flash_bytes": 1120, "flash_bytes_fp32": 3584, "weight_format": "dense",
                              "sram_bytes": 11264}
    lines = acc.table().splitlines()
    assert len(lines) == 1 + 1 + 19 + 1 + 1 + 1
    assert lines[-2].split() == ["Total", "-", "704,842", "703,114", "703,114", "12,035,328", "(10,)",
                                 f"{acc.flash_bytes:,}", "-", f"{acc.sram_bytes:,}"]
    assert "BN buffers 1,728" in lines[-1]
    # fixed width: every row's type starts under "Type", its MACs end under the end of "MACs"
    type_at, macs_end = lines[0].index("Type"), lines[0].index("MACs") + len("MACs")
    for line, row in zip(lines[2:-3], acc.layers, strict=True):
        assert line[type_at:].startswith(row.type)
        assert line[:macs_end].endswith(f"{row.macs:,}")


def test_shipped_arch_yamls_count_like_their_builds() -> None:
    paths = sorted(ARCHS.glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        arch = ArchConfig.load(path)
        assert count(arch) == real_count(arch), path.name


@pytest.mark.filterwarnings("ignore::UserWarning")  # randomly initialised trunk: no weights here
@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_backbones_meta_count_equals_real_count(name: str) -> None:
    arch = ArchConfig(stem=None, stages=(), input_size=(32, 32), head=(HeadLayer(16, density=0.5),),
                      backbone=BackboneConfig(name=name, trainable="all"), pooling="gmp")
    meta = count(arch)
    assert meta == real_count(arch)
    assert meta.frozen_params == 0 and meta.macs > 10**7


@pytest.mark.parametrize("layer", [
    nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(2, dilation=2), nn.AvgPool2d(3, 2, 1, ceil_mode=True),
    nn.AvgPool2d((2, 3)), nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(3, 4, (3, 5), stride=(3, 2), dilation=2),
    nn.Conv2d(3, 6, 3, groups=3, padding="valid"), nn.AdaptiveAvgPool2d((None, 2)), nn.AdaptiveMaxPool2d(3),
    nn.Flatten(2), nn.Sequential(nn.Flatten(), nn.Linear(3 * 11 * 13, 5)),
], ids=repr)
def test_shape_rules_match_real_layers(layer: nn.Module) -> None:
    # count()'s shape-only pass against a real forward under FlopCounterMode, layer by layer.
    model = nn.Sequential(layer)
    assert count_module(model, (3, 11, 13)) == _shape_only_count(model, (3, 11, 13))


def _shape_only_count(model: nn.Module, input_shape: tuple[int, int, int]) -> Accounting:
    from trainables import accounting

    rows = accounting._row_modules(model)
    return accounting._account(model, rows, *accounting.trace_shapes(model, rows, input_shape))


def test_count_built_falls_back_to_the_flop_counter_for_unknown_layers() -> None:
    class Scale(nn.Module):  # a leaf with a parameter and no shape rule
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    model = nn.Sequential(Scale(), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    acc = count_built(model, (3, 8, 8))
    assert acc == count_module(model, (3, 8, 8))
    assert acc.macs == 4 * 27 * 36 + 144 * 2 and acc.trainable_params == 3 + 112 + 290
