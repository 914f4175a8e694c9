"""The published networks, counted exactly (spaces/archs/, docs/published-networks.md).

Each shipped file's parameter count, BatchNorm buffers and MACs are asserted exactly, against
the figure its paper prints (within 5%) and against an independent channel-by-channel count of
the reference code's skeleton (pure arithmetic here, no modules); the shape-only accounting
pass must equal torch's flop counter on a real build of each.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from trainables.accounting import count, count_module
from trainables.arch import ArchConfig, StageConfig
from trainables.models import build_model

pytestmark = pytest.mark.slow  # many seconds of real work without Ray

ARCHS = Path(__file__).resolve().parents[2] / "spaces" / "archs"

# file: (trainable params, BN running mean/var elements, MACs, the paper's printed figure)
PUBLISHED = {
    "densenet-40-12.yaml": (1_019_722, 18_096, 264_812_928, 1.0e6),
    "densenet-bc-100-12.yaml": (769_162, 23_988, 287_929_692, 0.8e6),
    "sparsenet-40-24-c100.yaml": (728_484, 6_992, 282_867_072, 0.76e6),
    "sparsenet-bc-100-24.yaml": (1_461_124, 18_672, 641_003_232, 1.46e6),
    "resnet8-mlperf-tiny.yaml": (78_186, 480, 12_501_632, None),
}


def reference_densenet(depth: int, k: int, *, bc: bool, stem: int, classes: int, sparse: bool) -> tuple[int, int]:
    """(trainable params, BN params) of the reference skeleton: no conv biases; BN-ReLU-conv
    layers (BC: BN-ReLU-1x1 to 4k, BN-ReLU-3x3); transitions BN-ReLU-1x1 to floor(c * C) after
    blocks 1 and 2 (c = 0.5 for BC, else 1), reading the block's (fetched) output; final BN;
    linear classifier with bias."""
    n = (depth - 4) // (6 if bc else 3)
    comp = 0.5 if bc else 1.0
    params, bn = 3 * 9 * stem, 0
    ch = stem
    for block in range(3):
        xs = [ch]  # channels of x0, x1, ...
        for layer in range(1, n + 1):
            idx = [layer - 2**i for i in range(layer.bit_length())] if sparse else range(layer)
            c_in = sum(xs[j] for j in idx)
            if bc:
                params += c_in * 4 * k + 4 * k * 9 * k
                bn += 2 * c_in + 2 * 4 * k
            else:
                params += c_in * 9 * k
                bn += 2 * c_in
            xs.append(k)
        out_idx = [n + 1 - 2**i for i in range((n + 1).bit_length())] if sparse else range(n + 1)
        ch = sum(xs[j] for j in out_idx)
        if block < 2:
            reduced = int(comp * ch)
            params += ch * reduced
            bn += 2 * ch
            ch = reduced
    bn += 2 * ch
    params += ch * classes + classes
    return params + bn, bn


# Keras' layers of MLPerf Tiny's ResNet-8 (keras_model.py, num_filters 16; Conv2D use_bias=True):
# (name, weights + bias) for convs and dense, and the BatchNorm channels (gamma, beta; mean, var).
RESNET8_CONVS = [("conv 3->16", 3 * 9 * 16 + 16), ("s1 conv a", 16 * 9 * 16 + 16), ("s1 conv b", 16 * 9 * 16 + 16),
                 ("s2 conv a/2", 16 * 9 * 32 + 32), ("s2 conv b", 32 * 9 * 32 + 32), ("s2 1x1/2", 16 * 32 + 32),
                 ("s3 conv a/2", 32 * 9 * 64 + 64), ("s3 conv b", 64 * 9 * 64 + 64), ("s3 1x1/2", 32 * 64 + 64),
                 ("dense", 64 * 10 + 10)]
RESNET8_BN_CHANNELS = [16, 16, 16, 32, 32, 64, 64]  # no BN on the 1x1 shortcuts
# MACs: output positions x weights per conv (32x32, 16x16, 8x8 maps), dense 640
RESNET8_MACS = (32 * 32 * 16 * 27 + 2 * 32 * 32 * 16 * 144 + 16 * 16 * 32 * (144 + 288 + 16)
                + 8 * 8 * 64 * (288 + 576 + 32) + 640)


def test_reference_arithmetic_matches_the_table() -> None:
    assert reference_densenet(40, 12, bc=False, stem=16, classes=10, sparse=False) == (1_019_722, 18_096)
    assert reference_densenet(100, 12, bc=True, stem=24, classes=10, sparse=False)[0] == 769_162
    assert reference_densenet(40, 24, bc=False, stem=16, classes=100, sparse=True) == (728_484, 6_992)
    assert reference_densenet(100, 24, bc=True, stem=48, classes=100, sparse=True)[0] == 1_461_124
    assert sum(p for _, p in RESNET8_CONVS) + 2 * sum(RESNET8_BN_CHANNELS) == 78_186
    assert 2 * sum(RESNET8_BN_CHANNELS) == 480
    assert RESNET8_MACS == 12_501_632


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts_exactly(name: str) -> None:
    arch = ArchConfig.load(ARCHS / name)
    trainable, buffers, macs, paper = PUBLISHED[name]
    acc = count(arch)
    assert (acc.trainable_params, acc.nonzero_params, acc.bn_buffers, acc.macs) == (trainable, trainable, buffers, macs)
    assert acc.frozen_params == 0
    if paper is not None:
        assert abs(trainable - paper) / paper <= 0.05
    # the header states the count this tool gives
    assert f"{trainable:,}" in (ARCHS / name).read_text().split("\nin_channels")[0]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shape_pass_equals_the_flop_counter(name: str) -> None:
    arch = ArchConfig.load(ARCHS / name)
    torch.manual_seed(0)
    model = build_model(arch)
    assert count(arch) == count_module(model, (arch.in_channels, *arch.input_size))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, arch.num_classes)


def test_resnet8_with_torchvision_shortcuts_counts_the_old_figure() -> None:
    """shortcut_bn: true (the default) adds BN to the two 1x1 projections: 96 channels."""
    arch = ArchConfig.load(ARCHS / "resnet8-mlperf-tiny.yaml")
    tv = arch.replace(stages=tuple(dataclasses.replace(s, shortcut_bn=True) for s in arch.stages))
    acc = count(tv)
    assert (acc.trainable_params, acc.bn_buffers, acc.macs) == (78_378, 672, 12_501_632)


def test_densenet_with_the_torch_codes_stem() -> None:
    """The DenseNet authors' Torch code starts every CIFAR net with 2k channels: 24 for k=12."""
    arch = ArchConfig.load(ARCHS / "densenet-40-12.yaml")
    assert arch.stem is not None
    wide = arch.replace(stem=dataclasses.replace(arch.stem, width=24))
    assert count(wide).trainable_params == reference_densenet(40, 12, bc=False, stem=24, classes=10,
                                                              sparse=False)[0] == 1_059_298


# Small nets with every published form, meta count against torch's flop counter (real build).
SMALL_FORMS = [
    {"block": "densenet", "order": "pre", "bottleneck": 4, "transition": "always", "compression": 0.5},
    {"block": "sparsenet", "order": "pre", "bottleneck": 2, "transition": "always"},
    {"block": "sparsenet", "order": "post", "bottleneck": 4, "transition": "never"},
    {"block": "densenet", "conv": "separable", "order": "pre", "bottleneck": 4},
    {"block": "residual", "shortcut_bn": False},
    {"block": "residual", "conv": "separable", "shortcut_bn": False, "bias": False},
]


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("form", SMALL_FORMS, ids=lambda f: "-".join(f"{v}" for v in f.values()))
def test_published_forms_meta_count_equals_flop_counter(form: dict, batch_norm: bool) -> None:
    agg = form["block"] in ("densenet", "sparsenet")
    first = {k: v for k, v in form.items() if k != "compression"}
    stages = (StageConfig(width=4, layers=3, **first),
              StageConfig(width=6, layers=2, downsample="avgpool" if agg else "stride", **form))
    stem = {"width": 6, "bias": False, "bn_act": not agg}
    arch = ArchConfig.from_dict({"input_size": [10, 10], "stem": stem, "batch_norm": batch_norm,
                                 "final_bn_act": agg, "head": [{"width": 8, "density": 0.5}],
                                 "stages": [dataclasses.asdict(s) for s in stages]})
    torch.manual_seed(0)
    meta = count(arch)
    assert meta == count_module(build_model(arch), (3, 10, 10))
    assert sum(r.params for r in meta.layers) == meta.total_params
    assert sum(r.macs for r in meta.layers) == meta.macs
