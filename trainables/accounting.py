"""Exact parameter and MAC accounting, per layer and in total.

- :func:`count` counts an :class:`ArchConfig` without weights: it builds the network on the
  meta device and runs a shape-only forward in which each conv/linear/pool/flatten layer just
  computes its output shape and MACs (milliseconds; the budget screen's cost).
- :func:`count_built` counts a built model (real or meta, possibly pruned) with the same
  shape-only pass: what a trial (every round) and the budget screen use.
- :func:`count_module` counts a real (possibly pruned) model: one real forward under
  ``torch.utils.flop_counter.FlopCounterMode`` gives the MACs, its weights the nonzeros. Its
  first use in a process costs ~1.5 s (torch compiles its flop registry), each later one tens
  of ms: the reference, not the hot path.

The shape-only pass and the flop counter share no shape or MAC code, and the tests hold them
equal on every family, on random configs and on pruned models, so torch's own flop counter
checks the fast arithmetic.

Definitions (the search's objectives use these):

- ``trainable_params``: elements of parameters with ``requires_grad``; ``frozen_params``: the rest.
- ``deploy_params`` (a property): every parameter the deployed model carries, ``nonzero_params``
  + ``frozen_params``: a frozen transfer trunk ships all its weights (resnet18: 11.2M) though
  none of them trains. It equals ``nonzero_params`` for a net trained from scratch.
- ``nonzero_params``: trainable elements that are not structurally zero. Conv/linear weights
  count their nonzeros after any mask (a :class:`SparseLinear` mask, a ``torch.nn.utils.prune``
  ``*_mask``); biases and norm parameters count in full. On the meta device a SparseLinear
  weight counts ``round(density * numel)`` (its mask's exact ones) and everything else in full.
- ``bn_buffers``: BatchNorm running mean + running var elements (not ``num_batches_tracked``).
- ``macs``: conv + linear multiply-accumulates for one sample (no bias adds): torch's flop
  formulas / 2, i.e. output positions x weight elements. ``nonzero_macs`` scales each
  conv/linear layer's MACs by its weight density (nonzero / numel).

Per-layer rows follow execution order, Keras-style: one row per conv (a separable conv is one
"Separable Conv" row), BatchNorm, pooling, flatten, dense layer and active dropout; activations
have no row. A row's ``params`` is Keras' count: parameters plus BatchNorm running mean/var
(a BN row over C channels is 4*C), so the rows sum to :attr:`Accounting.total_params`.

This module owns what is counted (rows, totals, flash and SRAM from the dataflow); how the
forward is traced (the shape rules, the meta pass, the flop counter) is
:mod:`trainables._trace`, a module private to this one (tests and bench/deploy.py reach
:func:`trace_shapes` from here).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainables._trace import (
    NO_ROW,
    Flow,
    SkipInitOnMeta,
    shape_rule,
    trace_flop_counter,
    trace_shapes,
    weight_param,
)
from trainables._trace import Trace as Trace  # re-exported: was defined here
from trainables.arch import ArchConfig
from trainables.deploy import budgets as deploy
from trainables.layers import SeparableConv2d, SparseLinear
from trainables.models import build_model

# Row type names, first match wins (SparseLinear before its base class nn.Linear).
_ROW_TYPES: tuple[tuple[type[nn.Module], str], ...] = (
    (SeparableConv2d, "Separable Conv"),
    (nn.Conv2d, "Convolution"),
    (_BatchNorm, "Batch Norm"),
    (nn.MaxPool2d, "Max Pool"),
    (nn.AvgPool2d, "Avg Pool"),
    (nn.AdaptiveAvgPool2d, "Global Avg Pool"),
    (nn.AdaptiveMaxPool2d, "Global Max Pool"),
    (nn.Flatten, "flatten"),
    (SparseLinear, "Sparse Dense"),
    (nn.Linear, "Dense"),
    (nn.Dropout, "Dropout"),
)


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer table."""

    name: str  # module path in the model, e.g. "stages.1.blocks.0.conv"
    type: str  # "Convolution", "Separable Conv", "Batch Norm", "Max Pool", "flatten", "Dense", ...
    params: int  # Keras-style: all parameters + BatchNorm running mean/var
    trainable: int  # parameter elements with requires_grad
    nonzero: int  # trainable elements that are not structurally zero
    macs: int  # multiply-accumulates for one sample
    nonzero_macs: int  # macs scaled by the weight density
    output_shape: tuple[int, ...]  # one sample: (H, W, C) for maps, (C,) for vectors
    flash_bytes: int  # int8 storage: weights (weight_format) + fp32 channel scales + int32 biases
    flash_bytes_fp32: int  # fp32 storage: weights (smaller of dense / bitmask) + biases
    weight_format: str  # int8 weights: dense | bitmask ("a/b": depthwise/pointwise); folded BN; "-"
    sram_bytes: int  # int8 peak activation bytes while this row's ops run (batch 1)


@dataclass(frozen=True)
class Accounting:
    """Totals for one network plus its per-layer rows (see the module docstring)."""

    trainable_params: int
    nonzero_params: int  # the search's "params" objective
    frozen_params: int
    bn_buffers: int
    macs: int
    nonzero_macs: int
    flash_bytes: int  # int8 weights + per-channel fp32 scales + int32 biases, BN folded, sparse
    flash_bytes_fp32: int  # fp32 weights + biases, BN folded, sparse where smaller
    flash_bytes_dense: int  # int8 with every weight dense: the weight initializers of an int8 ONNX
    sram_bytes: int  # int8 peak activation bytes at batch 1 (trainables.deploy's execution model)
    sram_bytes_fp32: int  # the same peak at 4 bytes per element
    sram_peak_op: str  # where the peak falls: a module path, or "cat"/"add" after one; "input"
    layers: tuple[LayerRow, ...]

    @property
    def deploy_params(self) -> int:
        """Every parameter the deployed model carries: the trained nonzeros + the frozen trunk
        (pretrained weights are dense; pruning never touches frozen layers)."""
        return self.nonzero_params + self.frozen_params

    @property
    def total_params(self) -> int:
        """Keras' "Total params": trainable + frozen parameters + BatchNorm running mean/var."""
        return self.trainable_params + self.frozen_params + self.bn_buffers

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the totals, ``total_params`` and ``layers`` as a list of dicts."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["total_params"] = self.total_params
        d["deploy_params"] = self.deploy_params
        d["layers"] = [
            {**dataclasses.asdict(row), "output_shape": list(row.output_shape)} for row in self.layers
        ]
        return d

    def table(self) -> str:
        """A fixed-width per-layer table, a totals line and a summary line."""
        header = ("#", "Layer", "Type", "Params", "Trainable", "Nonzero", "MACs", "Output",
                  "Flash B", "Format", "SRAM B")
        body = [
            (str(i), r.name, r.type, f"{r.params:,}", f"{r.trainable:,}", f"{r.nonzero:,}",
             f"{r.macs:,}", str(r.output_shape), f"{r.flash_bytes:,}", r.weight_format,
             f"{r.sram_bytes:,}")
            for i, r in enumerate(self.layers, 1)
        ]
        last = str(self.layers[-1].output_shape) if self.layers else "-"
        total = ("", "Total", "-", f"{self.total_params:,}", f"{self.trainable_params:,}",
                 f"{self.nonzero_params:,}", f"{self.macs:,}", last, f"{self.flash_bytes:,}", "-",
                 f"{self.sram_bytes:,}")
        rows = [header, *body, total]
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        right = {0, 3, 4, 5, 6, 8, 10}  # numeric columns

        def fmt(r: tuple[str, ...]) -> str:
            cells = (v.rjust(w) if c in right else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(tuple("-" * w for w in widths)))
        summary = (
            f"trainable {self.trainable_params:,} | nonzero {self.nonzero_params:,} | "
            f"frozen {self.frozen_params:,} | BN buffers {self.bn_buffers:,} | "
            f"MACs {self.macs:,} | nonzero MACs {self.nonzero_macs:,} | "
            f"int8 flash {self.flash_bytes:,} B (fp32 {self.flash_bytes_fp32:,}) | "
            f"int8 SRAM peak {self.sram_bytes:,} B at {self.sram_peak_op} (fp32 {self.sram_bytes_fp32:,})"
        )
        return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total), summary])


def count(arch: ArchConfig) -> Accounting:
    """Count ``arch`` without weights, data or files: a meta-device build and a shape-only pass.

    The budget screen's cost (milliseconds). Tested equal to :func:`count_module` on a real
    build, whose MACs come from torch's own flop counter on a real forward.
    """
    model = meta_model(arch)
    rows = _row_modules(model)
    return _account(model, rows, *trace_shapes(model, rows, (arch.in_channels, *arch.input_size)))


def meta_model(arch: ArchConfig) -> nn.Module:
    """``arch`` built on the meta device: shapes and masks' counts, no storage, no init."""
    if arch.backbone is not None and arch.backbone.weights is not None:
        # Weights do not change any count; never touch the file in the budget screen.
        arch = arch.replace(backbone=dataclasses.replace(arch.backbone, weights=None))
    with torch.device("meta"), SkipInitOnMeta():
        return build_model(arch)


def count_built(model: nn.Module, input_shape: tuple[int, int, int]) -> Accounting:
    """Count a built model (real or meta, possibly pruned) for one (C, H, W) sample.

    The shape-only pass of :func:`count` on the model as it is: no real forward, no data, the
    weights are read only for their nonzeros (~ms). A leaf with parameters but no shape rule
    (not in this project's families) makes it fall back to :func:`count_module`.
    """
    rows = _row_modules(model)
    unknown = [m for m in model.modules()
               if not m._modules and shape_rule(m) is None and next(m.parameters(), None) is not None]
    if unknown:
        return count_module(model, input_shape)
    return _account(model, rows, *trace_shapes(model, rows, input_shape))


def count_module(model: nn.Module, input_shape: tuple[int, int, int]) -> Accounting:
    """Count a built (real, possibly pruned) model for one (C, H, W) sample.

    Runs one no-grad eval forward on the model's device under ``FlopCounterMode``; the
    train/eval flags are restored afterwards and no weight or BatchNorm statistic changes.
    """
    rows = _row_modules(model)
    return _account(model, rows, *trace_flop_counter(model, rows, input_shape))


def bn_folding(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[nn.Module, nn.Module]:
    """Which BatchNorm folds into which conv/linear (the pairs flash counts as folded): a BN whose
    input is a conv's or linear's output that nothing else reads. One shape-only pass."""
    rows = _row_modules(model)
    _, _, flow = trace_shapes(model, rows, input_shape)
    assert flow is not None
    return _Deployment(model, rows, flow).folded


def _account(
    model: nn.Module,
    rows: dict[str, nn.Module],
    shapes: dict[nn.Module, tuple[int, ...]],
    macs: dict[nn.Module, int],
    flow: Flow | None = None,
) -> Accounting:
    names = {m: n for n, m in rows.items()}
    modules = list(model.modules())
    params = [(m, n, p) for m in modules for n, p in m._parameters.items() if p is not None]
    trainable = [(m, n, p) for m, n, p in params if p.requires_grad]
    dep = _Deployment(model, rows, flow) if flow is not None else None
    layers = tuple(_row(names[m], m, shape, macs, dep) for m, shape in shapes.items())
    return Accounting(
        trainable_params=sum(p.numel() for _, _, p in trainable),
        nonzero_params=sum(_nonzero(m, n, p) for m, n, p in trainable),
        frozen_params=sum(p.numel() for _, _, p in params if not p.requires_grad),
        bn_buffers=sum(_bn_buffers(m) for m in modules),
        macs=sum(macs.values()),
        nonzero_macs=sum(_nonzero_macs(m, n) for m, n in macs.items()),
        flash_bytes=sum(r.flash_bytes for r in layers),
        flash_bytes_fp32=sum(r.flash_bytes_fp32 for r in layers),
        flash_bytes_dense=0 if dep is None else sum(dep.flash(m).int8_dense for m in shapes),
        sram_bytes=0 if dep is None else dep.peak.elements,
        sram_bytes_fp32=0 if dep is None else 4 * dep.peak.elements,
        sram_peak_op="" if dep is None else dep.peak_op(),
        layers=layers,
    )


class _Deployment:
    """Flash and SRAM from a recorded :class:`Flow` (see :mod:`trainables.deploy`)."""

    def __init__(self, model: nn.Module, rows: dict[str, nn.Module], flow: Flow) -> None:
        self.model, self.flow = model, flow
        self.peak = deploy.peak_activation(flow.ops, flow.numel, output=flow.output)
        self.row_of: dict[nn.Module, nn.Module] = {}
        for m in rows.values():
            for sub in (m.modules() if isinstance(m, SeparableConv2d) else (m,)):
                self.row_of[sub] = m
        self.sram: dict[nn.Module, int] = defaultdict(int)
        self.folded: dict[nn.Module, nn.Module] = {}  # BN -> the conv/linear it folds into
        for i, (op, m) in enumerate(zip(flow.ops, flow.modules, strict=True)):
            row = self.row_of.get(m) if m is not None else None
            if row is not None:
                self.sram[row] = max(self.sram[row], self.peak.per_op[i])
            if isinstance(m, _BatchNorm) and len(op.inputs) == 1:
                v = op.inputs[0]
                src = flow.producer[v]
                prod = flow.modules[src] if src >= 0 else None
                if isinstance(prod, (nn.Conv2d, nn.Linear)) and flow.uses[v] == 1 \
                        and weight_param(prod).shape[0] == m.num_features and prod not in self.folded.values():
                    self.folded[m] = prod
        self.has_folded_bn = set(self.folded.values())

    def flash(self, row: nn.Module) -> deploy.TensorBytes:
        """A row's stored bytes: its convs/linears, a (folded or not) BN, or other parameters."""
        if isinstance(row, _BatchNorm):
            return deploy.bn_bytes(row.num_features, folded=row in self.folded)
        parts = [p for p in (row.modules() if isinstance(row, SeparableConv2d) else (row,))
                 if isinstance(p, (nn.Conv2d, nn.Linear))]
        if not parts:
            n = sum(p.numel() for p in row.parameters())
            return deploy.TensorBytes(n, 4 * n, n, "dense" if n else "-")
        sizes = []
        for p in parts:
            w = weight_param(p)
            name = "weight_orig" if "weight_orig" in p._parameters else "weight"
            bias = p.bias is not None or p in self.has_folded_bn
            sizes.append(deploy.weight_bytes(w.numel(), _nonzero(p, name, w), w.shape[0], bias=bias))
        fmts = [t.fmt for t in sizes]
        return deploy.TensorBytes(sum(t.int8 for t in sizes), sum(t.fp32 for t in sizes),
                                  sum(t.int8_dense for t in sizes),
                                  fmts[0] if len(set(fmts)) == 1 else "/".join(fmts))

    def peak_op(self) -> str:
        i = self.peak.op
        if i < 0:
            return "input"
        names = {m: n for n, m in self.model.named_modules()}
        m = self.flow.modules[i]
        if m is not None:
            return names.get(m, type(m).__name__)
        before = next((names.get(p, "") for p in reversed(self.flow.modules[:i]) if p is not None), "")
        return f"{self.flow.names[i]} after {before}" if before else self.flow.names[i]


def _row_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that get a row, by name: separable convs (one unit) and non-trivial leaves."""
    rows: dict[str, nn.Module] = {}

    def walk(name: str, m: nn.Module) -> None:
        children = [(n, c) for n, c in m._modules.items() if c is not None]
        if isinstance(m, SeparableConv2d):
            rows[name] = m
        elif not children:
            # Dropout(0) is a no-op (the transfer family's default): no row either.
            if not isinstance(m, NO_ROW) and not (isinstance(m, nn.Dropout) and m.p == 0):
                rows[name] = m
        else:
            for n, c in children:
                walk(f"{name}.{n}" if name else n, c)

    walk("", model)
    return rows


def _row(name: str, m: nn.Module, shape: tuple[int, ...], macs: dict[nn.Module, int],
         dep: _Deployment | None) -> LayerRow:
    parts = list(m.modules()) if isinstance(m, SeparableConv2d) else [m]
    params = [(sub, n, p) for sub in parts for n, p in sub._parameters.items() if p is not None]
    flash = dep.flash(m) if dep is not None else deploy.TensorBytes(0, 0, 0, "")
    return LayerRow(
        name=name,
        type=next((label for cls, label in _ROW_TYPES if isinstance(m, cls)), type(m).__name__),
        params=sum(p.numel() for _, _, p in params) + sum(_bn_buffers(sub) for sub in parts),
        trainable=sum(p.numel() for _, _, p in params if p.requires_grad),
        nonzero=sum(_nonzero(sub, n, p) for sub, n, p in params if p.requires_grad),
        macs=sum(macs.get(sub, 0) for sub in parts),
        nonzero_macs=sum(_nonzero_macs(sub, macs.get(sub, 0)) for sub in parts),
        output_shape=shape,
        flash_bytes=flash.int8,
        flash_bytes_fp32=flash.fp32,
        weight_format=flash.fmt,
        sram_bytes=dep.sram.get(m, 0) if dep is not None else 0,
    )


def _bn_buffers(m: nn.Module) -> int:
    if not isinstance(m, _BatchNorm) or m.running_mean is None or m.running_var is None:
        return 0
    return m.running_mean.numel() + m.running_var.numel()


def _nonzero(module: nn.Module, name: str, param: torch.Tensor) -> int:
    """Elements of ``param`` (named ``name`` in ``module``) that are not structurally zero."""
    sparse_weight = isinstance(module, SparseLinear) and name in ("weight", "weight_orig")
    if param.is_meta:
        return module.nonzero_weights if sparse_weight else param.numel()
    value = param.detach()
    masked = sparse_weight
    prune_mask = getattr(module, name.removesuffix("_orig") + "_mask", None) if name.endswith("_orig") else None
    if isinstance(prune_mask, torch.Tensor):  # torch.nn.utils.prune: weight = weight_orig * weight_mask
        value, masked = value * prune_mask, True
    if sparse_weight:
        value = value * module.mask
    if masked or value.dim() >= 2:
        return int(torch.count_nonzero(value))
    return param.numel()


def _nonzero_macs(m: nn.Module, macs: int) -> int:
    """``m``'s MACs scaled by its weight density (exact for convs and linears: integer division)."""
    weight = weight_param(m)
    if macs == 0 or weight is None or weight.numel() == 0:
        return macs
    name = "weight_orig" if "weight_orig" in m._parameters else "weight"
    return macs * _nonzero(m, name, weight) // weight.numel()
