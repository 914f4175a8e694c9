"""Deployment arithmetic: flash bytes of stored weights and peak activation SRAM, from shapes.

Pure functions (no torch); :mod:`trainables.accounting` calls them from its shape-only pass, so
the budget screen gets ``flash_bytes`` / ``sram_bytes`` with params and MACs.

Flash (what an int8 runtime stores; ONNX Runtime's QOperator files, TFLite and CMSIS-NN alike):

- conv / linear weights: 1 byte per element (int8), plus one fp32 scale per output channel
  (4 * C_out: per-channel symmetric quantization) and, when the layer has a bias, one int32 per
  output channel (4 * C_out). A BatchNorm right after a conv or linear (its only reader) is
  folded into it: it gives a layer without a bias a bias and costs no bytes of its own.
- a BatchNorm not after a conv (pre-activation, DenseNet's composite layer) is stored as a
  per-channel scale + shift, i.e. a depthwise 1x1 conv: C int8 weights + C fp32 scales + C
  int32 shifts = 9 * C bytes (fp32: 8 * C).
- fp32 (``*_fp32``): 4 bytes per weight and bias, no scales; BatchNorm folded the same way.
- sparse weights: every conv/linear weight is stored as the smaller of ``dense`` (every element)
  and ``bitmask`` (ceil(numel / 8) bytes of a 1-bit-per-element keep mask, then the nonzero
  values in order: 1 byte each for int8, 4 for fp32); ties stay dense. Scales and biases are
  dense in both. The format is chosen per tensor and per precision (int8 bitmask pays off
  below 7/8 density, fp32 below 31/32) and named per layer for int8.

SRAM (MCUNet's layer-by-layer count, Lin et al. 2020): the network runs one op at a time at
batch 1, in the forward's order; 1 byte per activation element for int8, 4 for fp32 (so fp32 is
always 4x int8). While an op runs, its inputs, its output and every tensor a later op still
reads (skips, concatenation inputs) are alive; a tensor is freed after its last use. Ops come in
three kinds:

- ``alloc`` (conv, linear, pooling, concatenation of >= 2 tensors, anything unknown): writes a
  new output tensor; inputs and output are alive together;
- ``elementwise`` (BatchNorm, activations, additions): writes in place over an input that no
  later op reads (as runtimes fuse BN/activation into the conv before them and write a residual
  sum over a dying input), else into a new tensor;
- ``view`` (identity, flatten, dropout at inference, a one-tensor concatenation): no new memory,
  the output shares its input's buffer.

The model's input image is alive from the start until its last use; the output until the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ALLOC",
    "ELEMENTWISE",
    "VIEW",
    "FlowOp",
    "Peak",
    "TensorBytes",
    "bn_bytes",
    "peak_activation",
    "weight_bytes",
]

ALLOC, ELEMENTWISE, VIEW = "alloc", "elementwise", "view"
INT8_SCALE_BYTES = 4  # one fp32 scale per output channel (per-channel symmetric weights)
INT32_BIAS_BYTES = 4


@dataclass(frozen=True)
class TensorBytes:
    """Stored bytes of one conv/linear layer: int8, fp32, dense int8, and the int8 weight format."""

    int8: int  # weights (chosen format) + fp32 per-channel scales + int32 biases
    fp32: int  # weights (chosen format) + fp32 biases
    int8_dense: int  # int8 with the weights dense: what an ONNX / TFLite file stores
    fmt: str  # "dense" | "bitmask": the int8 weights' format


def _stored(numel: int, nonzero: int, value_bytes: int) -> tuple[int, str]:
    dense = numel * value_bytes
    bitmask = math.ceil(numel / 8) + nonzero * value_bytes
    return (bitmask, "bitmask") if bitmask < dense else (dense, "dense")


def weight_bytes(numel: int, nonzero: int, out_channels: int, *, bias: bool) -> TensorBytes:
    """Flash of a conv/linear weight of ``numel`` elements (``nonzero`` of them nonzero) with
    ``out_channels`` output channels, with or without a (possibly BN-folded) bias."""
    if not 0 <= nonzero <= numel or out_channels < 1:
        raise ValueError(f"{numel=}, {nonzero=}, {out_channels=}: expected 0 <= nonzero <= numel, "
                         "out_channels >= 1")
    w8, fmt = _stored(numel, nonzero, 1)
    w32, _ = _stored(numel, nonzero, 4)
    extra8 = INT8_SCALE_BYTES * out_channels + (INT32_BIAS_BYTES * out_channels if bias else 0)
    b32 = 4 * out_channels if bias else 0
    return TensorBytes(int8=w8 + extra8, fp32=w32 + b32, int8_dense=numel + extra8, fmt=fmt)


def bn_bytes(channels: int, *, folded: bool) -> TensorBytes:
    """Flash of a BatchNorm over ``channels``: 0 folded, else a per-channel scale + shift."""
    if folded:
        return TensorBytes(0, 0, 0, "folded")
    int8 = channels * (1 + INT8_SCALE_BYTES + INT32_BIAS_BYTES)  # a depthwise 1x1 conv
    return TensorBytes(int8=int8, fp32=8 * channels, int8_dense=int8, fmt="dense")


@dataclass(frozen=True)
class FlowOp:
    """One op of a forward at batch 1: its kind, input value ids and output value id."""

    kind: str  # ALLOC | ELEMENTWISE | VIEW
    inputs: tuple[int, ...]  # value ids read (value 0 is the model input)
    output: int  # value id written (a fresh id per op)


@dataclass(frozen=True)
class Peak:
    """Peak activation elements (multiply by 1 for int8, 4 for fp32) and the op where it falls."""

    elements: int  # the peak over the whole forward (>= the input's elements)
    op: int  # index of the op at which it is reached; -1: the input alone
    per_op: tuple[int, ...]  # elements alive while each op runs


def peak_activation(ops: Sequence[FlowOp], numel: Sequence[int], *, output: int) -> Peak:
    """The execution model of the module docstring over ``ops`` in order.

    ``numel[v]`` is value v's elements at batch 1 (value 0: the input image); ``output`` is
    the value the model returns (alive to the end).
    """
    n = len(ops)
    last = [-1] * len(numel)
    for i, op in enumerate(ops):
        for v in op.inputs:
            last[v] = i
    last[output] = n
    buffer = [-1] * len(numel)  # value -> buffer id
    size: list[int] = []  # buffer -> elements
    until: list[int] = []  # buffer -> last op index that reads it (through any alias)

    def new_buffer(v: int, at: int) -> None:
        buffer[v] = len(size)
        size.append(numel[v])
        until.append(max(last[v], at))

    new_buffer(0, -1)
    live = {0}
    per_op: list[int] = []
    best, best_at = numel[0], -1
    for i, op in enumerate(ops):
        alive = sum(size[b] for b in live)
        fresh = 0
        if op.kind == VIEW and op.inputs:
            b = buffer[op.inputs[0]]
            buffer[op.output] = b
            until[b] = max(until[b], last[op.output])
        elif op.kind == ELEMENTWISE and (
            reuse := [buffer[v] for v in op.inputs
                      if until[buffer[v]] <= i and size[buffer[v]] == numel[op.output]]
        ):
            b = reuse[0]
            buffer[op.output] = b
            until[b] = max(until[b], last[op.output])
        else:
            new_buffer(op.output, i)
            fresh = numel[op.output]
            live.add(buffer[op.output])
        per_op.append(alive + fresh)
        if alive + fresh > best:
            best, best_at = alive + fresh, i
        live = {b for b in live if until[b] > i}
    return Peak(best, best_at, tuple(per_op))
