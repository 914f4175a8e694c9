"""Assembly shared by the conv families: stem -> stages -> pooling -> head -> classifier.

Each stage family (plain, residual, densenet, sparsenet) registers one builder under its
``StageConfig.block`` name with :func:`register_stage`; :func:`build_network` wraps every
stage the same way (2x2 pool before it for maxpool/avgpool downsampling, dropout after it) and
tracks the feature-map shape at build time, so ``maxpool`` pooling and ``flatten`` heads know
their sizes without a dry run. :func:`build_head` is also used by the transfer family.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainables.arch import ArchConfig, ArchError, StageConfig
from trainables.layers import (
    SparseLinear,
    conv_output_size,
    create_activation,
    create_conv2d,
    layer_seed,
)


@dataclass(frozen=True)
class FeatureMap:
    """Shape of one sample's feature map: (channels, height, width)."""

    channels: int
    height: int
    width: int


# builder(stage, arch=..., in_map=..., stride=...) -> (module, out_map); stride is 2 for the
# first conv of a "stride"-downsampling stage, else 1.
StageBuilder = Callable[..., tuple[nn.Module, FeatureMap]]

STAGE_BUILDERS: dict[str, StageBuilder] = {}


def register_stage(block: str) -> Callable[[StageBuilder], StageBuilder]:
    """Decorator: register ``builder`` for ``StageConfig.block == block``; names are unique."""

    def add(builder: StageBuilder) -> StageBuilder:
        if block in STAGE_BUILDERS:
            raise ValueError(f"stage builder {block=} is already registered ({STAGE_BUILDERS[block]})")
        STAGE_BUILDERS[block] = builder
        return builder

    return add


class ConvBnAct(nn.Sequential):
    """conv -> BatchNorm2d (when the arch has batch_norm and ``bn``) -> activation (unless ``act=False``)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        arch: ArchConfig,
        stride: int = 1,
        conv: str = "standard",
        bias: bool = True,
        padding: str = "same",
        act: bool = True,
        bn: bool = True,
    ) -> None:
        parts: OrderedDict[str, nn.Module] = OrderedDict(
            conv=create_conv2d(in_ch, out_ch, kernel, stride=stride, conv=conv, bias=bias, padding=padding)
        )
        if arch.batch_norm and bn:
            parts["bn"] = nn.BatchNorm2d(out_ch)
        if act:
            parts["act"] = create_activation(arch.activation)
        super().__init__(parts)


class BnActConv(nn.Sequential):
    """Pre-activation: BatchNorm2d over the input (when the arch has batch_norm) -> activation -> conv.

    The DenseNet/SparseNet papers' composite layer (and their transitions): the BN normalises the
    ``in_ch`` channels a layer reads, so it counts 2 * in_ch parameters (+ 2 * in_ch buffers).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        arch: ArchConfig,
        stride: int = 1,
        conv: str = "standard",
        bias: bool = True,
        padding: str = "same",
    ) -> None:
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if arch.batch_norm:
            parts["bn"] = nn.BatchNorm2d(in_ch)
        parts["act"] = create_activation(arch.activation)
        parts["conv"] = create_conv2d(in_ch, out_ch, kernel, stride=stride, conv=conv, bias=bias,
                                      padding=padding)
        super().__init__(parts)


def conv_unit(order: str, in_ch: int, out_ch: int, kernel: int, *, arch: ArchConfig, **kw: object) -> nn.Sequential:
    """One conv with its BN and activation: :class:`ConvBnAct` ("post") or :class:`BnActConv` ("pre")."""
    if order == "pre":
        return BnActConv(in_ch, out_ch, kernel, arch=arch, **kw)  # type: ignore[arg-type]
    if order != "post":
        raise ValueError(f"order={order!r} is invalid: expected post or pre")
    return ConvBnAct(in_ch, out_ch, kernel, arch=arch, **kw)  # type: ignore[arg-type]


def bn_act(channels: int, *, arch: ArchConfig) -> nn.Sequential:
    """BatchNorm2d (when the arch has batch_norm) -> activation: a pre-activation net's last step."""
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if arch.batch_norm:
        parts["bn"] = nn.BatchNorm2d(channels)
    parts["act"] = create_activation(arch.activation)
    return nn.Sequential(parts)


def conv_map(fm: FeatureMap, out_ch: int, kernel: int, *, stride: int = 1, padding: str = "same") -> FeatureMap:
    """The :class:`FeatureMap` after a :func:`create_conv2d` conv."""
    return FeatureMap(
        out_ch,
        conv_output_size(fm.height, kernel, stride=stride, padding=padding),
        conv_output_size(fm.width, kernel, stride=stride, padding=padding),
    )


class Network(nn.Module):
    """(N, C, H, W) -> stem -> stages -> pool (N, F) -> head -> classifier (N, num_classes)."""

    def __init__(
        self,
        *,
        stem: nn.Module,
        stages: nn.Sequential,
        pool: nn.Sequential,
        head: nn.Sequential,
        classifier: nn.Linear,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.pool = pool
        self.head = head
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.pool(self.stages(self.stem(x)))))


def build_stage(stage: StageConfig, *, arch: ArchConfig, in_map: FeatureMap) -> tuple[nn.Sequential, FeatureMap]:
    """[2x2 pool] -> the registered block builder -> [dropout]."""
    if stage.block not in STAGE_BUILDERS:
        raise ValueError(f"block={stage.block!r} has no registered builder: expected one of "
                         + ", ".join(STAGE_BUILDERS))
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    fm = in_map
    if stage.downsample in ("maxpool", "avgpool"):
        parts["pool"] = nn.MaxPool2d(2) if stage.downsample == "maxpool" else nn.AvgPool2d(2)
        fm = FeatureMap(fm.channels, fm.height // 2, fm.width // 2)
    stride = 2 if stage.downsample == "stride" else 1
    parts["blocks"], fm = STAGE_BUILDERS[stage.block](stage, arch=arch, in_map=fm, stride=stride)
    if arch.dropout > 0:
        parts["drop"] = nn.Dropout(arch.dropout)
    return nn.Sequential(parts), fm


def build_pool(pooling: str, fm: FeatureMap) -> tuple[nn.Sequential, int]:
    """Pooling into the head plus Flatten; returns (module, features per sample)."""
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if pooling == "gap":
        parts["pool"] = nn.AdaptiveAvgPool2d(1)
    elif pooling == "gmp":
        parts["pool"] = nn.AdaptiveMaxPool2d(1)
    elif pooling == "maxpool":
        # Keras MaxPooling2D(pool_size=final HxW): one window over the whole map (004's Model 1).
        parts["pool"] = nn.MaxPool2d((fm.height, fm.width))
    elif pooling == "pool_flatten":
        # Keras MaxPooling2D(2) then Flatten (study 000): (C, H, W) -> C * (H//2) * (W//2)
        parts["pool"] = nn.MaxPool2d(2)
        fm = FeatureMap(fm.channels, fm.height // 2, fm.width // 2)
    elif pooling != "flatten":
        raise ValueError(f"pooling={pooling!r} is invalid: expected gap, gmp, maxpool, flatten "
                         "or pool_flatten")
    parts["flatten"] = nn.Flatten()
    flat = pooling in ("flatten", "pool_flatten")
    features = fm.channels * fm.height * fm.width if flat else fm.channels
    return nn.Sequential(parts), features


def build_head(arch: ArchConfig, in_features: int) -> tuple[nn.Sequential, nn.Linear]:
    """Hidden head layers and the output layer for ``in_features`` pooled features.

    Each hidden layer: Linear, or SparseLinear (density < 1, mask seeded by (mask_seed, index))
    -> BatchNorm1d (head_batch_norm) -> activation -> Dropout (head_dropout > 0).
    """
    layers: list[nn.Module] = []
    for i, h in enumerate(arch.head):
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if h.sparse:
            parts["linear"] = SparseLinear(
                in_features, h.width, density=h.density, seed=layer_seed(arch.mask_seed, i)
            )
        else:
            parts["linear"] = nn.Linear(in_features, h.width)
        if arch.head_batch_norm:
            parts["bn"] = nn.BatchNorm1d(h.width)
        parts["act"] = create_activation(arch.activation)
        if arch.head_dropout > 0:
            parts["drop"] = nn.Dropout(arch.head_dropout)
        layers.append(nn.Sequential(parts))
        in_features = h.width
    return nn.Sequential(*layers), nn.Linear(in_features, arch.num_classes)


def build_network(arch: ArchConfig) -> Network:
    """The stem/stages network of a (non-backbone) ``arch``."""
    fm = FeatureMap(arch.in_channels, *arch.input_size)
    stem: nn.Module = nn.Identity()
    if arch.stem is not None:
        st = arch.stem
        try:
            stem = ConvBnAct(fm.channels, st.width, st.kernel, arch=arch, stride=st.stride,
                             conv=st.conv, bias=st.bias, bn=st.bn_act, act=st.bn_act)
        except ValueError as e:  # a config ArchConfig accepts but no conv can build
            raise ArchError(f"stem: {e}") from None
        fm = conv_map(fm, st.width, st.kernel, stride=st.stride)
    stages: list[nn.Module] = []
    for i, stage in enumerate(arch.stages):
        try:
            module, fm = build_stage(stage, arch=arch, in_map=fm)
        except ValueError as e:
            raise ArchError(f"stages[{i}]: {e}") from None
        stages.append(module)
    pool, features = build_pool(arch.pooling, fm)
    if arch.final_bn_act:
        # BN -> act on the last stage's output, first thing in ``pool`` (the papers' last step)
        pool = nn.Sequential(OrderedDict([("final", bn_act(fm.channels, arch=arch)), *pool.named_children()]))
    head, classifier = build_head(arch, features)
    return Network(stem=stem, stages=nn.Sequential(*stages), pool=pool, head=head, classifier=classifier)
