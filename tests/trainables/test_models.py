from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from trainables.arch import (
    BLOCK_TYPES,
    ArchConfig,
    ArchError,
    BackboneConfig,
    HeadLayer,
    StageConfig,
    StemConfig,
)
from trainables.layers import SeparableConv2d, SparseLinear
from trainables.models import STAGE_BUILDERS, build_head, build_model, register_stage
from trainables.models.plain import BasicBlock
from trainables.models.sparsenet import AggregationBlock, dense_fetch, sparse_fetch


def small_arch(block: str, conv: str, stage_kw: dict | None = None, **kw) -> ArchConfig:
    """Two stages of ``block`` (the second downsampling) on a 3x12x10 input, with a sparse head."""
    down = "stride" if block in ("plain", "residual") else "maxpool"
    sk = stage_kw or {}
    stages = (
        StageConfig(block=block, conv=conv, width=4, layers=2, **sk),
        StageConfig(block=block, conv=conv, width=6, layers=3, downsample=down,
                    **({"compression": 0.5 if block in ("densenet", "sparsenet") else 1.0} | sk)),
    )
    base = {"input_size": (12, 10), "num_classes": 5, "stem": StemConfig(width=5), "stages": stages,
            "head": (HeadLayer(8, density=0.5), HeadLayer(6)), "head_batch_norm": True}
    return ArchConfig(**(base | kw))


@pytest.mark.parametrize(("block", "conv"), list(itertools.product(BLOCK_TYPES, ("standard", "separable"))))
def test_every_family_runs_and_gets_gradients(block: str, conv: str) -> None:
    _runs_and_gets_gradients(small_arch(block, conv, dropout=0.1, head_dropout=0.1), conv)


# The published forms (stage fields, arch fields), on every family they apply to.
PUBLISHED_FORMS = [
    *[(b, {"order": "pre"}, {}) for b in ("densenet", "sparsenet")],
    *[(b, {"bottleneck": 4}, {}) for b in ("densenet", "sparsenet")],
    *[(b, {"transition": "always"}, {}) for b in ("densenet", "sparsenet")],
    *[(b, {"order": "pre", "bottleneck": 4, "transition": "always", "bias": False},
       {"final_bn_act": True, "stem": StemConfig(width=5, bias=False, bn_act=False)})
      for b in ("densenet", "sparsenet")],
    ("sparsenet", {"order": "pre", "bottleneck": 2}, {"batch_norm": False, "final_bn_act": True}),
    ("densenet", {"transition": "never", "compression": 1.0}, {}),
    ("residual", {"shortcut_bn": False}, {}),
    ("residual", {"shortcut_bn": False, "bias": False}, {"final_bn_act": True}),
    ("plain", {}, {"final_bn_act": True}),
]


def _form_id(form: tuple) -> str:
    block, sk, kw = form
    return "-".join([block, *(f"{k}={v}" for k, v in sk.items()), *(k for k in kw)])


@pytest.mark.parametrize("conv", ["standard", "separable"])
@pytest.mark.parametrize("form", PUBLISHED_FORMS, ids=_form_id)
def test_published_forms_run_and_get_gradients(form: tuple, conv: str) -> None:
    block, sk, kw = form
    _runs_and_gets_gradients(small_arch(block, conv, sk, **({"dropout": 0.1} | kw)), conv)


def _runs_and_gets_gradients(arch: ArchConfig, conv: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch)
    out = model(torch.randn(2, 3, 12, 10))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # Biases right before a BatchNorm get an exactly-zero gradient (BN removes the mean).
        if p.dim() >= 2:
            assert p.grad.abs().sum() > 0, name
    convs = [m for m in model.stages.modules() if isinstance(m, SeparableConv2d)]
    assert bool(convs) == (conv == "separable")


def test_pre_activation_layer_bottleneck_and_transition() -> None:
    # x0: 6 channels, growth 4, bottleneck 4 (16 channels), transition at compression 1.0
    stage = StageConfig(block="densenet", width=4, layers=2, order="pre", bottleneck=4, transition="always",
                        bias=False)
    arch = ArchConfig(stem=StemConfig(width=6, bias=False, bn_act=False), stages=(stage,), input_size=(8, 8),
                      final_bn_act=True)
    model = build_model(arch)
    assert list(model.stem._modules) == ["conv"]  # a bare conv: the first layer starts with BN -> act
    block, transition = model.stages[0].blocks
    first = block.layers[0]
    assert list(first._modules) == ["reduce", "conv"]
    assert list(first.reduce._modules) == ["bn", "act", "conv"]  # BN -> act -> conv
    assert first.reduce.bn.num_features == 6 and first.reduce.conv.out_channels == 16
    assert first.reduce.conv.kernel_size == (1, 1) and first.conv.conv.kernel_size == (3, 3)
    assert first.conv.bn.num_features == 16 and first.conv.conv.out_channels == 4
    assert block.layers[1].reduce.conv.in_channels == 10
    assert list(transition._modules) == ["bn", "act", "conv"]
    assert transition.conv.in_channels == transition.conv.out_channels == 14
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert list(model.pool._modules) == ["final", "pool", "flatten"]
    assert model.pool.final.bn.num_features == 14
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(("transition", "compression", "has_transition"), [
    ("auto", 1.0, False), ("auto", 0.5, True), ("always", 1.0, True), ("always", 0.5, True), ("never", 1.0, False),
])
def test_transition_choices(transition: str, compression: float, has_transition: bool) -> None:
    stage = StageConfig(block="sparsenet", width=3, layers=4, transition=transition, compression=compression)
    model = build_model(ArchConfig(stem=StemConfig(width=5), stages=(stage,), input_size=(6, 6)))
    parts = list(model.stages[0].blocks)
    assert len(parts) == (2 if has_transition else 1)
    # the sparse block's output: x4, x3, x1 (3 channels each), 9 in all; the transition reads it
    out = math.floor(compression * 9) if has_transition else 9
    if has_transition:
        assert parts[1].conv.in_channels == 9
    assert model.classifier.in_features == out


def test_residual_projection_without_batch_norm() -> None:
    stages = (StageConfig(block="residual", width=4), StageConfig(block="residual", width=8, downsample="stride",
                                                                   shortcut_bn=False))
    model = build_model(ArchConfig(stem=StemConfig(width=4), stages=stages, input_size=(8, 8)))
    (block,) = model.stages[1].blocks
    assert list(block.shortcut._modules) == ["conv"]
    assert block.shortcut.conv.bias is not None  # bias: true (Keras' default)
    assert hasattr(block.conv2, "bn")  # only the shortcut loses its BN


def test_registry_has_every_block_and_refuses_duplicates() -> None:
    assert set(STAGE_BUILDERS) == set(BLOCK_TYPES)
    with pytest.raises(ValueError, match="block='plain' is already registered"):
        register_stage("plain")(lambda *a, **k: None)
    assert STAGE_BUILDERS["plain"].__name__ == "build_plain"


# Which x[j] (x0 = block input) layer l concatenates, l = 1..8, and (last) the block output.
SPARSE_TABLE = [(0,), (1, 0), (2, 1), (3, 2, 0), (4, 3, 1), (5, 4, 2), (6, 5, 3), (7, 6, 4, 0), (8, 7, 5, 1)]
DENSE_TABLE = [tuple(range(p)) for p in range(1, 10)]


def test_fetch_tables() -> None:
    assert [sparse_fetch(p) for p in range(1, 10)] == SPARSE_TABLE
    assert [dense_fetch(p) for p in range(1, 10)] == DENSE_TABLE
    assert sparse_fetch(16) == (15, 14, 12, 8, 0)


class Tag(nn.Module):
    """Records the tags (channel values) of its input and outputs one channel tagged ``index``."""

    def __init__(self, index: int, seen: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.index, self.seen = index, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(int(v) for v in x[0, :, 0, 0]))
        return torch.full_like(x[:, :1], float(self.index))


@pytest.mark.parametrize(("fetch", "table"), [(sparse_fetch, SPARSE_TABLE), (dense_fetch, DENSE_TABLE)])
def test_aggregation_forward_wiring(fetch, table) -> None:
    seen: list[tuple[int, ...]] = []
    block = AggregationBlock([Tag(i, seen) for i in range(1, 9)], fetch)
    out = block(torch.zeros(1, 1, 2, 2))  # x0 is tagged 0
    assert seen == table[:-1]
    assert tuple(int(v) for v in out[0, :, 0, 0]) == table[-1]


def test_sparsenet_channels_match_the_table() -> None:
    # x0 has 5 channels, each layer adds k=3: layer l's conv sees 5 per x0 and 3 per other input.
    arch = ArchConfig(in_channels=5, stem=None, stages=(StageConfig(block="sparsenet", width=3, layers=8),),
                      input_size=(4, 4))
    model = build_model(arch)
    block = model.stages[0].blocks[0]
    in_ch = [layer.conv.in_channels for layer in block.layers]
    assert in_ch == [sum(5 if j == 0 else 3 for j in row) for row in SPARSE_TABLE[:-1]]
    assert in_ch == [5, 8, 6, 11, 9, 9, 9, 14]
    assert block(torch.zeros(1, 5, 4, 4)).shape[1] == 12  # x8, x7, x5, x1
    assert model.classifier.in_features == 12


def test_densenet_channels_and_compression() -> None:
    stage = StageConfig(block="densenet", width=4, layers=3, compression=0.5)
    arch = ArchConfig(stem=StemConfig(width=6), stages=(stage,), input_size=(8, 8))
    model = build_model(arch)
    block, transition = model.stages[0].blocks
    assert [layer.conv.in_channels for layer in block.layers] == [6, 10, 14]
    assert transition.conv.in_channels == 18 and transition.conv.out_channels == 9  # floor(0.5 * 18)
    assert transition.conv.kernel_size == (1, 1)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


def test_residual_skips() -> None:
    stages = (StageConfig(block="residual", width=4, layers=2),
              StageConfig(block="residual", width=8, layers=1, downsample="stride"))
    model = build_model(ArchConfig(stem=StemConfig(width=4), stages=stages, input_size=(9, 9)))
    first, second = model.stages[0].blocks
    (third,) = model.stages[1].blocks
    assert all(isinstance(b, BasicBlock) for b in (first, second, third))
    assert isinstance(first.shortcut, nn.Identity) and isinstance(second.shortcut, nn.Identity)
    proj = third.shortcut.conv
    assert proj.kernel_size == (1, 1) and proj.stride == (2, 2) and proj.out_channels == 8
    assert not hasattr(third.conv2, "act")  # the activation follows the sum
    x = torch.randn(1, 4, 9, 9)
    assert third(x).shape == (1, 8, 5, 5)
    assert (third(x) >= 0).all()


@pytest.mark.parametrize(("down", "module", "size"), [("maxpool", nn.MaxPool2d, 4), ("avgpool", nn.AvgPool2d, 4),
                                                     ("stride", None, 5)])
def test_downsampling(down: str, module, size: int) -> None:
    arch = ArchConfig(stem=StemConfig(width=3), stages=(StageConfig(width=4, downsample=down),),
                      input_size=(9, 9), pooling="flatten")
    model = build_model(arch)
    stage = model.stages[0]
    if module is None:
        assert "pool" not in stage._modules and stage.blocks[0].conv.stride == (2, 2)
    else:
        assert isinstance(stage.pool, module) and stage.blocks[0].conv.stride == (1, 1)
    assert model.classifier.in_features == 4 * size * size


@pytest.mark.parametrize(("pooling", "module", "features"), [
    ("gap", nn.AdaptiveAvgPool2d, 4), ("gmp", nn.AdaptiveMaxPool2d, 4), ("maxpool", nn.MaxPool2d, 4),
    ("flatten", None, 4 * 3 * 5), ("pool_flatten", nn.MaxPool2d, 4 * 1 * 2),
])
def test_pooling_into_the_head(pooling: str, module, features: int) -> None:
    arch = ArchConfig(stem=StemConfig(width=4, stride=2), stages=(), input_size=(6, 10), pooling=pooling)
    model = build_model(arch)
    assert model.classifier.in_features == features
    if module is None:
        assert list(model.pool._modules) == ["flatten"]
    else:
        assert isinstance(model.pool.pool, module)
    if pooling == "maxpool":
        assert model.pool.pool.kernel_size == (3, 5)  # the final HxW: Keras MaxPool to 1x1
    if pooling == "pool_flatten":
        assert model.pool.pool.kernel_size == 2  # 3x5 -> 1x2, then flatten
    x = torch.randn(2, 3, 6, 10)
    assert model(x).shape == (2, 10)


def test_head_layers_and_classifier() -> None:
    arch = ArchConfig(head=(HeadLayer(16, density=0.25), HeadLayer(8)), head_batch_norm=True,
                      head_dropout=0.3, activation="silu", mask_seed=3)
    head, classifier = build_head(arch, 12)
    assert [list(layer._modules) for layer in head] == [["linear", "bn", "act", "drop"]] * 2
    sparse, dense = head[0].linear, head[1].linear
    assert isinstance(sparse, SparseLinear) and sparse.density == 0.25 and sparse.nonzero_weights == 48
    assert type(dense) is nn.Linear and dense.in_features == 16
    assert isinstance(head[0].act, nn.SiLU) and head[0].drop.p == 0.3
    assert classifier.in_features == 8 and classifier.out_features == 10
    # The same (mask_seed, index) draws the same mask; another mask_seed another one.
    again, _ = build_head(arch, 12)
    other, _ = build_head(arch.replace(mask_seed=4), 12)
    assert torch.equal(again[0].linear.mask, sparse.mask)
    assert not torch.equal(other[0].linear.mask, sparse.mask)
    model = build_model(arch)
    assert isinstance(model.classifier, nn.Linear) and model.head[0].linear.in_features == 32


def test_conv_bn_act_order_and_switches() -> None:
    model = build_model(ArchConfig(batch_norm=False, activation="relu6", dropout=0.2))
    assert list(model.stem._modules) == ["conv", "act"]
    assert isinstance(model.stem.act, nn.ReLU6)
    assert isinstance(model.stages[0].drop, nn.Dropout) and model.stages[0].drop.p == 0.2
    bn = build_model(ArchConfig())
    assert list(bn.stem._modules) == ["conv", "bn", "act"]
    assert "drop" not in bn.stages[0]._modules


def test_valid_padding_shrinks_plain_stages() -> None:
    # 003's MNIST style: no padding, 28 -> 26 -> 24 -> pool 12 -> 10.
    stages = (StageConfig(width=4, layers=2, padding="valid"),
              StageConfig(width=8, layers=1, padding="valid", downsample="maxpool"))
    arch = ArchConfig(in_channels=1, input_size=(28, 28), stem=None, stages=stages, pooling="flatten")
    model = build_model(arch)
    assert model.classifier.in_features == 8 * 10 * 10
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"stages": (StageConfig(), StageConfig(kernel=4))},
     r"stages\[1\].kernel=4 is invalid: expected an odd kernel size with padding 'same'"),
    ({"stem": StemConfig(kernel=2)}, r"stem.kernel=2 is invalid: expected an odd kernel size"),
])
def test_unbuildable_configs_are_refused_naming_the_field(kwargs: dict, message: str) -> None:
    # Refused when the config is made, long before build_model: the budget screen never sees it.
    with pytest.raises(ArchError, match=message):
        ArchConfig(**kwargs)


def test_backbone_goes_to_the_transfer_family() -> None:
    arch = ArchConfig(stem=None, stages=(), head=(HeadLayer(16),), input_size=(32, 32),
                      backbone=BackboneConfig(name="resnet18", trainable="layer4"))
    with torch.device("meta"):
        model = build_model(arch)
    assert model.classifier.in_features == 16 and model.classifier.out_features == 10
    assert model.head[0].linear.in_features == 512
