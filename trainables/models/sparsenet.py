"""DenseNet and SparseNet aggregation stages (study 001).

A block of L layers keeps the list ``x = [x0, x1, ..., xL]`` (x0 = the block input, x_l = the
output of layer l, each ``width`` = growth-rate channels). Layer l (1-based) is
conv -> BN -> act on the concatenation of a subset of ``x[0:l]``:

- densenet: all of them, x0 .. x(l-1);
- sparsenet (Zhu et al. 2018, "Sparsely Aggregated Convolutional Networks", arXiv 1801.05895):
  only offsets 1, 2, 4, 8, ... back, i.e. ``concat(x[l-1], x[l-2], x[l-4], ...)`` for every
  power of two <= l, so about log2(l) inputs instead of l.

The block output is the same aggregate taken at position L+1: densenet concatenates x0..xL;
sparsenet concatenates x[L], x[L-1], x[L-3], ... (offsets 1, 2, 4, ... <= L+1 from L+1), as the
authors' code does (``expFetch`` applied after the last layer). With ``compression`` < 1 a
1x1 transition conv -> BN -> act to floor(compression * channels) follows the block.

The papers' forms, as options (defaults: the forms above, which every front so far measured):

- ``order: pre``: each layer (and the transition) is BN -> act -> conv on its concatenated
  input, the DenseNet paper's composite function H_l (Huang et al. 2017, sec. 3);
- ``bottleneck: b``: each layer is 1x1 conv to b * growth channels, then the kxk conv to growth
  (DenseNet-B: b = 4), each with its own BN and act in the stage's order;
- ``transition: always``: the 1x1 transition also at compression 1.0 (the papers put one after
  every block but the last; its 2x2 average pool is the next stage's ``downsample: avgpool``);
  ``never``: no transition. The transition reads the block's aggregated output (for sparsenet
  the fetched subset, as ``add_transition`` does in the SparseNet authors' code).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from trainables.arch import ArchConfig, StageConfig
from trainables.models.network import FeatureMap, conv_unit, register_stage

# fetch(position) -> indices into x (x0 = block input) concatenated as input at that position.
Fetch = Callable[[int], tuple[int, ...]]


def dense_fetch(position: int) -> tuple[int, ...]:
    """DenseNet: every earlier output, x0 .. x(position-1)."""
    return tuple(range(position))


def sparse_fetch(position: int) -> tuple[int, ...]:
    """SparseNet: x[position - 2**i] for every 2**i <= position, nearest first."""
    return tuple(position - 2**i for i in range(position.bit_length()))


class AggregationBlock(nn.Module):
    """(N, C0, H, W) -> (N, sum of the fetched channels, H, W); same-size maps only."""

    def __init__(self, layers: list[nn.Module], fetch: Fetch) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        # Resolved once: which x[j] each layer (and the output, last entry) concatenates.
        self.inputs = tuple(fetch(p) for p in range(1, len(layers) + 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer, idx in zip(self.layers, self.inputs[:-1], strict=True):
            outputs.append(layer(torch.cat([outputs[j] for j in idx], dim=1)))
        return torch.cat([outputs[j] for j in self.inputs[-1]], dim=1)


def _build_aggregation(
    stage: StageConfig, arch: ArchConfig, in_map: FeatureMap, fetch: Fetch
) -> tuple[nn.Sequential, FeatureMap]:
    # "same" padding only (ArchConfig refuses "valid" here): every x[j] keeps the block's HxW.
    channels = [in_map.channels] + [stage.width] * stage.layers  # of x0, x1, ..., xL
    layers = [_layer(stage, arch, sum(channels[j] for j in fetch(p))) for p in range(1, stage.layers + 1)]
    block = AggregationBlock(layers, fetch)
    out_ch = sum(channels[j] for j in block.inputs[-1])
    parts: list[nn.Module] = [block]
    if stage.transition == "always" or (stage.transition == "auto" and stage.compression < 1.0):
        reduced = max(1, math.floor(stage.compression * out_ch))
        parts.append(conv_unit(stage.order, out_ch, reduced, 1, arch=arch, bias=stage.bias))
        out_ch = reduced
    return nn.Sequential(*parts), FeatureMap(out_ch, in_map.height, in_map.width)


def _layer(stage: StageConfig, arch: ArchConfig, in_ch: int) -> nn.Module:
    """One layer: [1x1 bottleneck to bottleneck * growth] -> kxk conv to growth, in the stage's order."""
    conv = conv_unit(stage.order, in_ch if not stage.bottleneck else stage.bottleneck * stage.width,
                     stage.width, stage.kernel, arch=arch, conv=stage.conv, bias=stage.bias)
    if not stage.bottleneck:
        return conv
    # The 1x1 is standard: a separable 1x1 would only add a per-channel scale.
    reduce = conv_unit(stage.order, in_ch, stage.bottleneck * stage.width, 1, arch=arch, bias=stage.bias)
    return nn.Sequential(OrderedDict(reduce=reduce, conv=conv))


@register_stage("densenet")
def build_densenet(
    stage: StageConfig, *, arch: ArchConfig, in_map: FeatureMap, stride: int
) -> tuple[nn.Sequential, FeatureMap]:
    # stride is always 1: ArchConfig refuses "stride" downsampling for aggregating stages.
    return _build_aggregation(stage, arch, in_map, dense_fetch)


@register_stage("sparsenet")
def build_sparsenet(
    stage: StageConfig, *, arch: ArchConfig, in_map: FeatureMap, stride: int
) -> tuple[nn.Sequential, FeatureMap]:
    return _build_aggregation(stage, arch, in_map, sparse_fetch)
