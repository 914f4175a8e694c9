"""The budget screen: a network's counts from one meta-device build (milliseconds, no
weights), the nonzero params it delivers after its pruning rounds, and the fill that scales
every width of a sampled shape to land just under a params target (``search.fill_budget``).

Pure functions of an ArchConfig and a TrainConfig; :class:`search.space.searchspace.SearchSpace`
caches the screens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainables import pruning
from trainables.accounting import Accounting, count_built, meta_model
from trainables.arch import ArchConfig
from trainables.layers import SparseLinear
from trainables.train import TrainConfig

__all__ = [
    "FILL_STEPS",
    "FILL_TOLERANCE",
    "OUTPUT_RATE_FACTOR",
    "Screen",
    "delivered_params",
    "fill",
    "nonzero_weights",
    "scale_widths",
    "screen",
]

# pruning.prune_step prunes the output layer at half the rate (Frankle & Carbin), its default.
OUTPUT_RATE_FACTOR = 0.5
# fill_budget: at most this many counts to land in [FILL_TOLERANCE * target, target].
FILL_STEPS = 8
FILL_TOLERANCE = 0.97


@dataclass(frozen=True)
class Screen:
    accounting: Accounting
    body: tuple[int, ...]  # nonzero weights of each prunable layer but the output layer
    output: int  # nonzero weights of the output layer (0 when there is none)


def screen(arch: ArchConfig) -> Screen:
    """Counts of ``arch`` built once on the meta device (milliseconds, no weights)."""
    model = meta_model(arch)
    acc = count_built(model, (arch.in_channels, *arch.input_size))
    out = pruning.output_layer(model)
    prunable = pruning.prunable(model)
    return Screen(
        accounting=acc,
        body=tuple(nonzero_weights(m) for m, _ in prunable if m is not out),
        output=sum(nonzero_weights(m) for m, _ in prunable if m is out),
    )


def nonzero_weights(m: torch.nn.Module) -> int:
    if isinstance(m, SparseLinear):
        return m.nonzero_weights
    return m.weight.numel()


def delivered_params(screen: Screen, train: TrainConfig) -> int:
    """Nonzero params after ``train.prune_rounds`` rounds, as ``pruning.prune_step`` counts:
    each round keeps round(survivors * (1 - rate)) per group (all body layers together for a
    global scope, each layer for a layer scope; the output layer alone at half the rate)."""
    acc = screen.accounting
    if train.prune_rounds == 0 or not (screen.body or screen.output):
        return acc.nonzero_params
    body = [sum(screen.body)] if train.prune_scope == "global" else list(screen.body)
    out = screen.output
    for _ in range(train.prune_rounds):
        body = [round(b * (1 - train.prune_rate)) for b in body]
        out = round(out * (1 - train.prune_rate * OUTPUT_RATE_FACTOR))
    return acc.nonzero_params - sum(screen.body) - screen.output + sum(body) + out


def scale_widths(arch: ArchConfig, s: float) -> ArchConfig:
    """Every conv width (stem, stage widths and growth rates) and head width times ``s``."""
    if s == 1.0:
        return arch

    def sc(w: int) -> int:
        return max(1, round(w * s))

    stem = arch.stem if arch.stem is None else dataclasses.replace(arch.stem, width=sc(arch.stem.width))
    return arch.replace(
        stem=stem,
        stages=tuple(dataclasses.replace(st, width=sc(st.width)) for st in arch.stages),
        head=tuple(dataclasses.replace(h, width=sc(h.width)) for h in arch.head),
    )



def fill(arch: ArchConfig, train: TrainConfig, target: float,
         screen: Callable[[ArchConfig], Screen]) -> ArchConfig:
    """Scale every width by one factor so the delivered params land just under ``target``.

    Params grow about quadratically in a width factor s (conv weights are in x out), so
    the first guesses are s * sqrt(aim / params); once counts bracket the target, s is
    interpolated between them on log-log axes. Returns the largest scaled arch under
    ``target`` (the smallest one counted when none is).
    """
    aim = target * (1 + FILL_TOLERANCE) / 2  # the middle of the accepted window
    under: tuple[float, int, ArchConfig] | None = None  # largest s counted under target
    over: tuple[float, int, ArchConfig] | None = None  # smallest s counted over it
    counted: set[ArchConfig] = set()
    s = 1.0
    for _ in range(4 * FILL_STEPS):
        if len(counted) >= FILL_STEPS:
            break
        scaled = scale_widths(arch, s)
        if scaled in counted:  # rounding to integer widths hid the step
            if under is None:
                s *= 0.9  # still over the target: take a bigger step down
                continue
            if over is None or over[0] / under[0] < 1.01:
                break
            mid = math.sqrt(under[0] * over[0])  # bisect the bracket instead
            if scale_widths(arch, mid) in counted:
                break  # no integer widths between the two
            s = mid
            continue
        counted.add(scaled)
        p = delivered_params(screen(scaled), train)
        if p <= target:
            if under is None or s > under[0]:
                under = (s, p, scaled)
            if p >= FILL_TOLERANCE * target:
                break
        elif over is None or s < over[0]:
            over = (s, p, scaled)
        if under is not None and over is not None:
            (s0, p0, _), (s1, p1, _) = under, over
            t = math.log(aim / p0) / math.log(p1 / p0) if p1 > p0 and p0 > 0 else 0.5
            s = math.exp(math.log(s0) + min(max(t, 0.1), 0.9) * math.log(s1 / s0))
        else:
            ref = under or over
            assert ref is not None
            s = ref[0] * math.sqrt(aim / max(ref[1], 1))
    if under is not None:
        return under[2]
    assert over is not None
    return over[2]
