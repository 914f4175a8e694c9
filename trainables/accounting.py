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
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from trainables import deploy
from trainables.arch import ArchConfig
from trainables.deploy import ALLOC, ELEMENTWISE, VIEW, FlowOp
from trainables.layers import SeparableConv2d, SparseLinear
from trainables.models import build_model

# Leaves without parameters that do not change the data's shape: no row.
_NO_ROW = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Identity)
# Leaves that keep the shape and do no conv/linear MACs.
_PASS_THROUGH = (*_NO_ROW, _BatchNorm, nn.Dropout)
# Execution-model kinds of leaves (trainables.deploy): views share their input's buffer;
# elementwise leaves write in place over a dying input; every other leaf allocates.
_VIEW_LEAVES = (nn.Identity, nn.Flatten, nn.Dropout)
_ELEMENTWISE_LEAVES = (_BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
_ADD_FUNCS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
                        torch.Tensor.add_, torch.Tensor.__iadd__})

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
    def total_params(self) -> int:
        """Keras' "Total params": trainable + frozen parameters + BatchNorm running mean/var."""
        return self.trainable_params + self.frozen_params + self.bn_buffers

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the totals, ``total_params`` and ``layers`` as a list of dicts."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["total_params"] = self.total_params
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
    return _account(model, rows, *_trace_shapes(model, rows, (arch.in_channels, *arch.input_size)))


def meta_model(arch: ArchConfig) -> nn.Module:
    """``arch`` built on the meta device: shapes and masks' counts, no storage, no init."""
    if arch.backbone is not None and arch.backbone.weights is not None:
        # Weights do not change any count; never touch the file in the budget screen.
        arch = arch.replace(backbone=dataclasses.replace(arch.backbone, weights=None))
    with torch.device("meta"), _SkipInitOnMeta():
        return build_model(arch)


def count_built(model: nn.Module, input_shape: tuple[int, int, int]) -> Accounting:
    """Count a built model (real or meta, possibly pruned) for one (C, H, W) sample.

    The shape-only pass of :func:`count` on the model as it is: no real forward, no data, the
    weights are read only for their nonzeros (~ms). A leaf with parameters but no shape rule
    (not in this project's families) makes it fall back to :func:`count_module`.
    """
    rows = _row_modules(model)
    unknown = [m for m in model.modules()
               if not m._modules and _shape_rule(m) is None and next(m.parameters(), None) is not None]
    if unknown:
        return count_module(model, input_shape)
    return _account(model, rows, *_trace_shapes(model, rows, input_shape))


def count_module(model: nn.Module, input_shape: tuple[int, int, int]) -> Accounting:
    """Count a built (real, possibly pruned) model for one (C, H, W) sample.

    Runs one no-grad eval forward on the model's device under ``FlopCounterMode``; the
    train/eval flags are restored afterwards and no weight or BatchNorm statistic changes.
    """
    rows = _row_modules(model)
    return _account(model, rows, *_trace_flop_counter(model, rows, input_shape))


def bn_folding(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[nn.Module, nn.Module]:
    """Which BatchNorm folds into which conv/linear (the pairs flash counts as folded): a BN whose
    input is a conv's or linear's output that nothing else reads. One shape-only pass."""
    rows = _row_modules(model)
    _, _, flow = _trace_shapes(model, rows, input_shape)
    assert flow is not None
    return _Deployment(model, rows, flow).folded


# A trace: the row modules' one-sample output shapes in execution order (first call), the
# MACs each leaf module did, and the dataflow of the forward (None: not recorded).
Trace = tuple[dict[nn.Module, tuple[int, ...]], dict[nn.Module, int], "_Flow | None"]


class _Flow:
    """The forward's dataflow at batch 1: one :class:`FlowOp` per leaf call and per tensor op
    between leaves (cat, add, ...), each value's elements, and which op produced each value.

    Tensors are told apart by object identity (all are kept alive during the pass, so ids are
    never reused); an op that returns its input object (an in-place ReLU, nn.Identity) rebinds
    the object to the op's output value. Ops inside a leaf (``depth`` > 0) are not recorded.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.ids: dict[int, int] = {id(x): 0}
        self.keep: list[torch.Tensor] = [x]
        self.numel: list[int] = [x.numel()]
        self.ops: list[FlowOp] = []
        self.modules: list[nn.Module | None] = []  # the leaf of each op (None: a tensor op)
        self.names: list[str] = []  # a tensor op's function name ("" for a leaf)
        self.producer: list[int] = [-1]  # value -> op index that wrote it (-1: the input)
        self.uses: list[int] = [0]  # value -> how many op inputs read it
        self.output = 0
        self.depth = 0

    def op(self, kind: str, module: nn.Module | None, inputs: Any, out: torch.Tensor,
           name: str = "") -> None:
        ins = tuple(v for t in inputs if isinstance(t, torch.Tensor)
                    and (v := self.ids.get(id(t))) is not None)
        if kind == ALLOC and any(t is out for t in inputs):
            kind = VIEW  # a leaf that returns its input object (an empty nn.Sequential)
        for v in ins:
            self.uses[v] += 1
        vid = len(self.numel)
        self.ids[id(out)] = vid
        self.keep.append(out)
        self.numel.append(out.numel())
        self.producer.append(len(self.ops))
        self.uses.append(0)
        self.ops.append(FlowOp(kind, ins, vid))
        self.modules.append(module)
        self.names.append(name)

    def tensor_op(self, func: Any, args: tuple, out: Any) -> None:
        """Record a torch function called between leaves (if it returned a tensor)."""
        if self.depth or not isinstance(out, torch.Tensor):
            return
        # Only ops on activations: a pruned layer's pre-hook computes weight_orig * weight_mask.
        tensors = list(args[0]) if func is torch.cat else args
        if not any(isinstance(t, torch.Tensor) and id(t) in self.ids for t in tensors):
            return
        if func is torch.cat:
            tensors = list(args[0])
            self.op(VIEW if len(tensors) == 1 else ALLOC, None, tensors, out, "cat")
        elif func in _ADD_FUNCS:
            self.op(ELEMENTWISE, None, args[:2], out, "add")
        else:
            self.op(ALLOC, None, args, out, getattr(func, "__name__", "op"))

    def finish(self, out: Any) -> _Flow:
        if isinstance(out, torch.Tensor):
            self.output = self.ids.get(id(out), 0)
        self.keep.clear()
        self.ids.clear()
        return self


def _leaf_kind(m: nn.Module) -> str:
    if isinstance(m, _VIEW_LEAVES):
        return VIEW
    return ELEMENTWISE if isinstance(m, _ELEMENTWISE_LEAVES) else ALLOC


class _RecordOps(TorchFunctionMode):
    """Records the tensor ops between leaves of a real forward into a :class:`_Flow`."""

    def __init__(self, flow: _Flow) -> None:
        super().__init__()
        self.flow = flow

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.flow.tensor_op(func, args, out)
        return out


def _trace_flop_counter(model: nn.Module, rows: dict[str, nn.Module], input_shape: tuple[int, int, int]) -> Trace:
    from torch.utils.flop_counter import FlopCounterMode

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    counter = FlopCounterMode(display=False)
    leaf_flops: dict[nn.Module, int] = defaultdict(int)
    starts: dict[nn.Module, int] = {}

    def leaf_pre(m: nn.Module, _args: Any) -> None:
        starts[m] = counter.get_total_flops()

    def leaf_post(m: nn.Module, _args: Any, _out: Any) -> None:
        leaf_flops[m] += counter.get_total_flops() - starts[m]

    x = torch.zeros((1, *input_shape), device=device)
    flow = _Flow(x)

    def flow_pre(_m: nn.Module, _args: Any) -> None:
        flow.depth += 1

    def flow_post(m: nn.Module, args: Any, out: Any) -> None:
        flow.depth -= 1
        if not flow.depth and isinstance(out, torch.Tensor):
            flow.op(_leaf_kind(m), m, args, out)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(leaf_pre),
                                         m.register_forward_hook(leaf_post),
                                         m.register_forward_pre_hook(flow_pre),
                                         m.register_forward_hook(flow_post))]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()  # batch 1: BatchNorm1d refuses one sample in train mode
        with _row_shapes(rows) as shapes, torch.no_grad(), counter, _RecordOps(flow):
            flow.finish(model(x))
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    unattributed = counter.get_total_flops() - sum(leaf_flops.values())
    if unattributed:
        # Our families and the torchvision trunks do every matmul/conv inside a leaf module.
        raise ValueError(f"{unattributed // 2} MACs ran outside any leaf module: cannot attribute them")
    return shapes, {m: f // 2 for m, f in leaf_flops.items()}, flow


def _trace_shapes(model: nn.Module, rows: dict[str, nn.Module], input_shape: tuple[int, int, int],
                  *, record: bool = True) -> Trace:
    """A forward on meta tensors where known leaves only compute their output shape and MACs.

    torch's meta kernels are Python decompositions costing 0.1-4 ms per op here (BatchNorm,
    elementwise ops and ``cat`` the slowest), and FlopCounterMode adds its own dispatch: a
    median ~37 ms of CPU per random search-space net, against ~5 ms for this pass (measured
    with torch 2.14 on this project's 2-core CPU box). Unknown leaves run their own forward.

    With ``record`` it also records the dataflow (:class:`_Flow`) for flash and SRAM; without,
    the pass is today's params/MACs-only one (the baseline bench/deploy.py times it against).
    """
    macs: dict[nn.Module, int] = defaultdict(int)
    x = torch.empty((1, *input_shape), device="meta")
    flow = _Flow(x) if record else None

    def shape_only(m: nn.Module, rule: _ShapeRule) -> Callable[[torch.Tensor], torch.Tensor]:
        kind = _leaf_kind(m)

        def forward(x: torch.Tensor) -> torch.Tensor:
            out, leaf_macs = rule(m, tuple(x.shape))
            macs[m] += leaf_macs
            if flow is None:
                return x if out == tuple(x.shape) and leaf_macs == 0 else x.new_empty(out)
            # A view returns its input object, as nn.Identity and eval-mode dropout do; every
            # other leaf a new tensor, so later readers of its input stay told apart.
            flow.depth += 1
            y = x if kind == VIEW and out == tuple(x.shape) else x.new_empty(out)
            flow.depth -= 1
            flow.op(kind, m, (x,), y)
            return y

        return forward

    def own_pre(_m: nn.Module, _args: Any) -> None:
        assert flow is not None
        flow.depth += 1

    def own_post(m: nn.Module, args: Any, out: Any) -> None:
        assert flow is not None
        flow.depth -= 1
        if not flow.depth and isinstance(out, torch.Tensor):
            flow.op(_leaf_kind(m), m, args, out)

    patched: dict[nn.Module, _ShapeRule] = {}
    unpatched: list[nn.Module] = []
    for m in model.modules():
        if not m._modules:
            rule = _shape_rule(m)
            if rule is None:
                unpatched.append(m)
            else:
                patched[m] = rule
    own = {m: m.__dict__["forward"] for m in patched if "forward" in m.__dict__}
    hooks = [] if flow is None else [
        h for m in unpatched for h in (m.register_forward_pre_hook(own_pre), m.register_forward_hook(own_post))]
    try:
        for m, rule in patched.items():
            m.forward = shape_only(m, rule)  # an instance attribute: hooks still run
        with _row_shapes(rows) as shapes, torch.no_grad(), _ShapeOnlyOps(flow):
            out = model(x)
            if flow is not None:
                flow.finish(out)
    finally:
        for h in hooks:
            h.remove()
        for m in patched:
            del m.forward
            if m in own:
                m.forward = own[m]
    return shapes, macs, flow


class _SkipInitOnMeta(TorchFunctionMode):
    """Skips weight initialisation of meta tensors (there is no data to fill): about a third of
    a meta build's time. A torch function mode is thread-local: other threads are unaffected."""

    _INIT = frozenset({torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_,
                       torch.Tensor.fill_, nn.init.kaiming_uniform_, nn.init.uniform_,
                       nn.init.normal_, nn.init.constant_})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._INIT:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


class _ShapeOnlyOps(TorchFunctionMode):
    """Concatenations and additions between modules (dense/sparse aggregation, residual sums)
    as shape arithmetic: torch's meta ``cat`` alone costs ~1 ms per call here."""

    _ADD = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__})
    _ADD_INPLACE = frozenset({torch.Tensor.add_, torch.Tensor.__iadd__})

    def __init__(self, flow: _Flow | None = None) -> None:
        super().__init__()
        self.flow = flow

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = self._shape_only(func, args, kwargs or {})
        if self.flow is not None:
            self.flow.tensor_op(func, args, out)
        return out

    def _shape_only(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func is torch.cat and not kwargs.get("out"):
            tensors = list(args[0])
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % tensors[0].dim()
            shape = list(tensors[0].shape)
            shape[dim] = sum(t.shape[dim] for t in tensors)
            return tensors[0].new_empty(shape)
        if func in self._ADD and all(isinstance(a, torch.Tensor) for a in args[:2]):
            return args[0].new_empty(torch.broadcast_shapes(args[0].shape, args[1].shape))
        if func in self._ADD_INPLACE:
            return args[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def _row_shapes(rows: dict[str, nn.Module]) -> Iterator[dict[nn.Module, tuple[int, ...]]]:
    """Collects each row module's first output shape; dict order = execution order."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def hook(m: nn.Module, _args: Any, out: Any) -> None:
        shapes.setdefault(m, _sample_shape(out))

    handles = [m.register_forward_hook(hook) for m in rows.values()]
    try:
        yield shapes
    finally:
        for h in handles:
            h.remove()


def _account(
    model: nn.Module,
    rows: dict[str, nn.Module],
    shapes: dict[nn.Module, tuple[int, ...]],
    macs: dict[nn.Module, int],
    flow: _Flow | None = None,
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
    """Flash and SRAM from a recorded :class:`_Flow` (see :mod:`trainables.deploy`)."""

    def __init__(self, model: nn.Module, rows: dict[str, nn.Module], flow: _Flow) -> None:
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
                        and _weight(prod).shape[0] == m.num_features and prod not in self.folded.values():
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
            w = _weight(p)
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


# rule(module, input shape) -> (output shape, MACs); MACs match torch's flop formulas / 2.
_ShapeRule = Callable[[nn.Module, tuple[int, ...]], tuple[tuple[int, ...], int]]


def _shape_rule(m: nn.Module) -> _ShapeRule | None:
    for cls, rule in _SHAPE_RULES:
        if isinstance(m, cls):
            return rule
    return None


def _conv_rule(m: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    assert isinstance(m, nn.Conv2d)
    n, _, *sizes = shape
    out = []
    for i, size in enumerate(sizes):
        if m.padding == "same":
            out.append(size)
        else:
            pad = 0 if m.padding == "valid" else m.padding[i]
            out.append((size + 2 * pad - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1)
    # every output position does one MAC per weight: (C_out, C_in/groups, kH, kW)
    return (n, m.out_channels, *out), n * math.prod(out) * _weight(m).numel()


def _linear_rule(m: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    assert isinstance(m, nn.Linear)
    return (*shape[:-1], m.out_features), math.prod(shape[:-1]) * _weight(m).numel()


def _pool_rule(m: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    assert isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))
    k, s, p = (_pair(v) for v in (m.kernel_size, m.stride, m.padding))
    d = _pair(m.dilation) if isinstance(m, nn.MaxPool2d) else (1, 1)
    out = []
    for i, size in enumerate(shape[-2:]):
        o = (size + 2 * p[i] - d[i] * (k[i] - 1) - 1 + (s[i] - 1 if m.ceil_mode else 0)) // s[i] + 1
        if m.ceil_mode and (o - 1) * s[i] >= size + p[i]:
            o -= 1  # the last window may not start in the right padding
        out.append(o)
    return (*shape[:-2], *out), 0


def _adaptive_rule(m: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    assert isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    size = _pair(m.output_size)
    return (*shape[:-2], *(shape[-2 + i] if size[i] is None else size[i] for i in range(2))), 0


def _flatten_rule(m: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    assert isinstance(m, nn.Flatten)
    start, end = m.start_dim % len(shape), m.end_dim % len(shape)
    return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :]), 0


def _same_rule(m: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    return shape, 0


_SHAPE_RULES: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], _ShapeRule], ...] = (
    (_PASS_THROUGH, _same_rule),
    (nn.Conv2d, _conv_rule),
    (nn.Linear, _linear_rule),
    ((nn.MaxPool2d, nn.AvgPool2d), _pool_rule),
    ((nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), _adaptive_rule),
    (nn.Flatten, _flatten_rule),
)


def _pair(v: Any) -> tuple[Any, Any]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _weight(m: nn.Module) -> torch.Tensor:
    """The weight parameter (``weight_orig`` once ``torch.nn.utils.prune`` has wrapped it)."""
    return m._parameters.get("weight_orig", m._parameters.get("weight"))


def _row_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that get a row, by name: separable convs (one unit) and non-trivial leaves."""
    rows: dict[str, nn.Module] = {}

    def walk(name: str, m: nn.Module) -> None:
        children = [(n, c) for n, c in m._modules.items() if c is not None]
        if isinstance(m, SeparableConv2d):
            rows[name] = m
        elif not children:
            # Dropout(0) is a no-op (the transfer family's default): no row either.
            if not isinstance(m, _NO_ROW) and not (isinstance(m, nn.Dropout) and m.p == 0):
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


def _sample_shape(out: Any) -> tuple[int, ...]:
    """One sample's shape, channels last: (1, C, H, W) -> (H, W, C); (1, C) -> (C,)."""
    if not isinstance(out, torch.Tensor):
        return ()
    shape = tuple(out.shape[1:])
    return (*shape[1:], shape[0]) if len(shape) == 3 else shape


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
    weight = _weight(m)
    if macs == 0 or weight is None or weight.numel() == 0:
        return macs
    name = "weight_orig" if "weight_orig" in m._parameters else "weight"
    return macs * _nonzero(m, name, weight) // weight.numel()
