"""The shape-only pass and the flop-counter trace behind :mod:`trainables.accounting`, and
private to it (only accounting imports this module).

Owns how a forward is traced, not what is counted from it:

- :func:`trace_shapes`: a forward on meta tensors in which each conv/linear/pool/flatten
  leaf only computes its output shape and MACs by a shape rule (``_SHAPE_RULES``), and the
  cat/add between leaves is shape arithmetic (:class:`_ShapeOnlyOps`): the budget screen's
  hot path (~5 ms a net).
- :func:`trace_flop_counter`: one real no-grad forward under torch's ``FlopCounterMode``,
  the reference the tests hold the shape rules to.
- :class:`Flow`: the forward's dataflow at batch 1, which :mod:`trainables.deploy` turns
  into flash and peak SRAM.
- :class:`SkipInitOnMeta`: a meta-device build without weight initialisation.

The names are private to the accounting pair; :mod:`trainables.accounting` re-exports the
ones tests and benches reach for (``accounting.trace_shapes``).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from trainables.deploy.budgets import ALLOC, ELEMENTWISE, VIEW, FlowOp

__all__ = [
    "NO_ROW",
    "Flow",
    "SkipInitOnMeta",
    "Trace",
    "_sample_shape",
    "shape_rule",
    "trace_flop_counter",
    "trace_shapes",
    "weight_param",
]

# Leaves without parameters that do not change the data's shape: no row.
NO_ROW = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Identity)
# Leaves that keep the shape and do no conv/linear MACs.
_PASS_THROUGH = (*NO_ROW, _BatchNorm, nn.Dropout)
# Execution-model kinds of leaves (trainables.deploy): views share their input's buffer;
# elementwise leaves write in place over a dying input; every other leaf allocates.
_VIEW_LEAVES = (nn.Identity, nn.Flatten, nn.Dropout)
_ELEMENTWISE_LEAVES = (_BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
_ADD_FUNCS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
                        torch.Tensor.add_, torch.Tensor.__iadd__})

# A trace: the row modules' one-sample output shapes in execution order (first call), the
# MACs each leaf module did, and the dataflow of the forward (None: not recorded).
Trace = tuple[dict[nn.Module, tuple[int, ...]], dict[nn.Module, int], "Flow | None"]


class Flow:
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

    def finish(self, out: Any) -> Flow:
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
    """Records the tensor ops between leaves of a real forward into a :class:`Flow`."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.flow.tensor_op(func, args, out)
        return out


def trace_flop_counter(model: nn.Module, rows: dict[str, nn.Module], input_shape: tuple[int, int, int]) -> Trace:
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
    flow = Flow(x)

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


def trace_shapes(model: nn.Module, rows: dict[str, nn.Module], input_shape: tuple[int, int, int],
                  *, record: bool = True) -> Trace:
    """A forward on meta tensors where known leaves only compute their output shape and MACs.

    torch's meta kernels are Python decompositions costing 0.1-4 ms per op here (BatchNorm,
    elementwise ops and ``cat`` the slowest), and FlopCounterMode adds its own dispatch: a
    median ~37 ms of CPU per random search-space net, against ~5 ms for this pass (measured
    with torch 2.14 on this project's 2-core CPU box). Unknown leaves run their own forward.

    With ``record`` it also records the dataflow (:class:`Flow`) for flash and SRAM; without,
    the pass is today's params/MACs-only one (the baseline bench/deploy.py times it against).
    """
    macs: dict[nn.Module, int] = defaultdict(int)
    x = torch.empty((1, *input_shape), device="meta")
    flow = Flow(x) if record else None

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
            rule = shape_rule(m)
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


class SkipInitOnMeta(TorchFunctionMode):
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

    def __init__(self, flow: Flow | None = None) -> None:
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


# rule(module, input shape) -> (output shape, MACs); MACs match torch's flop formulas / 2.
_ShapeRule = Callable[[nn.Module, tuple[int, ...]], tuple[tuple[int, ...], int]]


def shape_rule(m: nn.Module) -> _ShapeRule | None:
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
    return (n, m.out_channels, *out), n * math.prod(out) * weight_param(m).numel()


def _linear_rule(m: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    assert isinstance(m, nn.Linear)
    return (*shape[:-1], m.out_features), math.prod(shape[:-1]) * weight_param(m).numel()


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


def weight_param(m: nn.Module) -> torch.Tensor:
    """The weight parameter (``weight_orig`` once ``torch.nn.utils.prune`` has wrapped it)."""
    return m._parameters.get("weight_orig", m._parameters.get("weight"))


def _sample_shape(out: Any) -> tuple[int, ...]:
    """One sample's shape, channels last: (1, C, H, W) -> (H, W, C); (1, C) -> (C,)."""
    if not isinstance(out, torch.Tensor):
        return ()
    shape = tuple(out.shape[1:])
    return (*shape[1:], shape[0]) if len(shape) == 3 else shape
