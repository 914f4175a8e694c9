"""Plain stacks and residual (ResNet basic-block) stages.

plain:    ``layers`` x [conv -> BN -> act]; the first conv has stride 2 when downsampling by stride.
residual: ``layers`` basic blocks, each conv -> BN -> act -> conv -> BN, plus the skip, then act
          (torchvision's BasicBlock order). The skip is the identity, or a 1x1 conv (stride 2
          when the block downsamples) + BN when the channels or the size change; with
          ``shortcut_bn: false`` that 1x1 conv has no BN (Keras ResNet v1, MLPerf Tiny's ResNet-8).
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.arch import ArchConfig, StageConfig
from trainables.layers import create_activation
from trainables.models.network import ConvBnAct, FeatureMap, conv_map, register_stage


@register_stage("plain")
def build_plain(
    stage: StageConfig, *, arch: ArchConfig, in_map: FeatureMap, stride: int
) -> tuple[nn.Sequential, FeatureMap]:
    layers: list[nn.Module] = []
    fm = in_map
    for i in range(stage.layers):
        s = stride if i == 0 else 1
        layers.append(ConvBnAct(fm.channels, stage.width, stage.kernel, arch=arch, stride=s,
                                conv=stage.conv, bias=stage.bias, padding=stage.padding))
        fm = conv_map(fm, stage.width, stage.kernel, stride=s, padding=stage.padding)
    return nn.Sequential(*layers), fm


class BasicBlock(nn.Module):
    """(N, C_in, H, W) -> (N, C_out, ceil(H/stride), ceil(W/stride)); "same" padding only."""

    def __init__(self, in_ch: int, out_ch: int, stage: StageConfig, *, arch: ArchConfig, stride: int) -> None:
        super().__init__()
        kw = {"arch": arch, "conv": stage.conv, "bias": stage.bias}
        self.conv1 = ConvBnAct(in_ch, out_ch, stage.kernel, stride=stride, **kw)
        # No activation here: it comes after the sum with the skip.
        self.conv2 = ConvBnAct(out_ch, out_ch, stage.kernel, act=False, **kw)
        self.shortcut: nn.Module = nn.Identity()
        if in_ch != out_ch or stride != 1:
            # A 1x1 projection: separable would only add a 1x1 depthwise scale, so always standard.
            self.shortcut = ConvBnAct(in_ch, out_ch, 1, stride=stride, act=False, arch=arch, bias=stage.bias,
                                      bn=stage.shortcut_bn)
        self.act = create_activation(arch.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


@register_stage("residual")
def build_residual(
    stage: StageConfig, *, arch: ArchConfig, in_map: FeatureMap, stride: int
) -> tuple[nn.Sequential, FeatureMap]:
    blocks: list[nn.Module] = []
    fm = in_map
    for i in range(stage.layers):
        s = stride if i == 0 else 1
        blocks.append(BasicBlock(fm.channels, stage.width, stage, arch=arch, stride=s))
        fm = conv_map(fm, stage.width, stage.kernel, stride=s)
    return nn.Sequential(*blocks), fm
