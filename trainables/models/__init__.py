"""Model families: ``build_model(arch)`` builds the network an :class:`ArchConfig` describes.

Conv families register a stage builder per ``StageConfig.block`` (plain, residual in
:mod:`.plain`; densenet, sparsenet in :mod:`.sparsenet`) and share the stem/pooling/head
assembly of :mod:`.network`; an ``arch.backbone`` goes to :mod:`.transfer`. Every model has the
hidden head layers as ``model.head`` (nn.Sequential) and the output layer as ``model.classifier``.
"""

from __future__ import annotations

from torch import nn

from trainables.arch import ArchConfig
from trainables.models import plain, sparsenet  # noqa: F401  (importing registers their stage builders)
from trainables.models.network import STAGE_BUILDERS, build_head, build_network, register_stage

__all__ = ["STAGE_BUILDERS", "build_head", "build_model", "register_stage"]


def build_model(arch: ArchConfig) -> nn.Module:
    """The network for ``arch`` on the current default device (``with torch.device("meta")`` works)."""
    if arch.backbone is not None:
        from trainables.models.transfer import build_transfer_model

        return build_transfer_model(arch)
    return build_network(arch)
