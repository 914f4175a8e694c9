"""Weight inheritance (``search.sampler: lamarckian``): a child network starts from its parent's
trained weights, tensor by tensor, where the two share a name.

Every model family names its layers by position (``stages.1.0.conv.weight``,
``head.0.weight``, ``classifier.bias``), so a child made by changing a few values of its
parent (a stage wider or narrower, one more layer, another kernel) shares most names with it.
For each tensor the child has and the parent has under the same name with as many dimensions:

- the overlapping block is copied: the first channels of each channel dimension (a narrower
  child keeps the parent's first channels), the centred part of each kernel dimension (a 5x5
  child kernel gets the parent's 3x3 in its centre, the rest zero, so it computes the same);
- where the child has more *input* channels than the parent (dimension 1 of a conv or linear
  weight: the layer after a widened one), the weights from the new inputs to the inherited
  outputs are zero, so the parent's outputs do not change when the new channels appear; the
  new outputs keep their random initialisation and learn from there (a widening that keeps the
  parent's function, as Net2Net's and LEMONADE's morphisms do, up to the BatchNorm statistics
  of the new channels);
- BatchNorm statistics and affine parameters are copied as the channels they belong to.

A layer the parent lacks starts as the identity where its shape allows, so a deeper child
computes what its parent did (Net2Net's Net2DeeperNet; exact in eval mode, the BatchNorm of a
new layer at its initial statistics): a new plain layer (conv -> BN -> act with as many
channels out as in, stride 1) gets a Dirac kernel and a zero bias (its input, after the
previous layer's ReLU, is >= 0, so the activation passes it unchanged); a new residual block
gets a zero last BatchNorm scale (zero last conv without BatchNorm), so it adds nothing to its
skip. Other new layers (a first layer that changes the channels, a new stage that
downsamples) keep their initialisation and are trained from scratch; :func:`inherit` says how
much of the child came from the parent. Masks (random sparse head layers, pruning) are the child's own: its
nonzero count is what the budget screen counted, so the child's masks are applied again after
the copy. (Shapes, for a conv weight: (out, in / groups, kh, kw); linear: (out, in).)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from trainables.models.network import ConvBnAct
from trainables.models.plain import BasicBlock

__all__ = ["inherit"]


def inherit(child: nn.Module, parent_state: Mapping[str, Tensor]) -> float:
    """Copy ``parent_state`` (a plain state_dict, pruning folded in) into ``child`` in place;
    returns the fraction of the child's parameters (elements) that came from the parent."""
    own = child.state_dict()
    copied = total = 0
    params = {name for name, _ in child.named_parameters()}
    with torch.no_grad():
        for name, dst in own.items():
            if name in params:
                total += dst.numel()
            src = parent_state.get(name)
            if _is_mask(name) or src is None or src.dim() != dst.dim() or src.dim() == 0:
                continue
            n = _copy_overlap(dst, src.to(dst.dtype))
            if name in params:
                copied += n
        for prefix, module in child.named_modules():
            if not any(k.startswith(f"{prefix}.") for k in parent_state):
                _identity(module)
        for module in child.modules():  # the child's masks, not the parent's zeros elsewhere
            mask = getattr(module, "mask", None)
            if isinstance(mask, Tensor) and isinstance(getattr(module, "weight", None), Tensor):
                module.weight.mul_(mask)
    return copied / total if total else 0.0


def _identity(module: nn.Module) -> None:
    """A layer the parent lacks made the identity (see the module docstring), where it can be."""
    if isinstance(module, BasicBlock):
        last = module.conv2
        scale = getattr(last, "bn", None)
        target = scale.weight if isinstance(scale, nn.BatchNorm2d) else None
        if target is None:
            convs = [m for m in last.modules() if isinstance(m, nn.Conv2d)]
            target = convs[-1].weight if convs else None
        if target is not None:
            target.zero_()
    elif isinstance(module, ConvBnAct) and hasattr(module, "act"):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        if convs and all(c.in_channels == c.out_channels and c.stride == (1, 1) for c in convs):
            for c in convs:
                nn.init.dirac_(c.weight, groups=c.groups)
                if c.bias is not None:
                    c.bias.zero_()


def _is_mask(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == "mask" or leaf.endswith("_mask") or leaf == "num_batches_tracked"


def _copy_overlap(dst: Tensor, src: Tensor) -> int:
    """Copy the overlapping block of ``src`` into ``dst`` (see the module docstring); the
    number of elements copied."""
    dst_idx, src_idx = [], []
    for axis, (d, s) in enumerate(zip(dst.shape, src.shape, strict=True)):
        n = min(d, s)
        if axis >= 2:  # a kernel dimension: centred, so the receptive field stays put
            dst_idx.append(slice((d - n) // 2, (d - n) // 2 + n))
            src_idx.append(slice((s - n) // 2, (s - n) // 2 + n))
        else:  # channels / features: the first n
            dst_idx.append(slice(0, n))
            src_idx.append(slice(0, n))
    if dst.dim() >= 2:
        grown_kernel = any(d > s for d, s in zip(dst.shape[2:], src.shape[2:], strict=True))
        keep_out = dst_idx[0]
        if grown_kernel:  # a larger kernel computes the parent's when its rim is zero
            dst[keep_out].zero_()
        if dst.shape[1] > src.shape[1]:  # new inputs: no say in the inherited outputs yet
            dst[keep_out, src.shape[1]:].zero_()
    dst[tuple(dst_idx)] = src[tuple(src_idx)]
    return int(dst[tuple(dst_idx)].numel())
