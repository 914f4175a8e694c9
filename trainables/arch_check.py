"""The field checks behind :mod:`trainables.arch`'s config dataclasses.

Owns what a valid architecture value is: the allowed choices (``BLOCK_TYPES``, ``POOLINGS``,
...), :class:`ArchError` and its ``"{path}={value!r} is invalid: expected ..."`` messages, a
stage's per-block rules (:func:`_check_stage`), the spatial walk that refuses a network shrinking
its input to 0x0 (:func:`_check_shapes`) and the unknown-key check of ``from_dict``
(:func:`_known`). The dataclasses themselves (pickled by Ray) stay in :mod:`trainables.arch`,
which re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from trainables.errors import ConfigError

if TYPE_CHECKING:
    from trainables.arch import ArchConfig, StageConfig

__all__ = [
    "ACTIVATIONS",
    "BACKBONES",
    "BACKBONE_STAGES",
    "BLOCK_TYPES",
    "CONV_TYPES",
    "DOWNSAMPLES",
    "MAX_BOTTLENECK",
    "ORDERS",
    "PADDINGS",
    "POOLINGS",
    "TRANSITIONS",
    "ArchError",
    "_check",
    "_check_bool",
    "_check_choice",
    "_check_float",
    "_check_int",
    "_check_shapes",
    "_check_stage",
    "_known",
]

CONV_TYPES = ("standard", "separable")
BLOCK_TYPES = ("plain", "residual", "densenet", "sparsenet")
DOWNSAMPLES = ("none", "stride", "maxpool", "avgpool")
POOLINGS = ("gap", "gmp", "maxpool", "flatten", "pool_flatten")
PADDINGS = ("same", "valid")
ACTIVATIONS = ("relu", "relu6", "silu", "hardswish", "gelu")
BACKBONES = ("resnet18", "densenet121")
ORDERS = ("post", "pre")
TRANSITIONS = ("auto", "always", "never")
MAX_BOTTLENECK = 16
# Stages of each torchvision backbone that can be unfrozen (002 trains "layer3" / "denseblock3").
BACKBONE_STAGES: dict[str, tuple[str, ...]] = {
    "resnet18": ("none", "layer1", "layer2", "layer3", "layer4", "all"),
    "densenet121": ("none", "denseblock1", "denseblock2", "denseblock3", "denseblock4", "all"),
}

class ArchError(ConfigError):
    """An invalid architecture value; the message names the field path and the value."""

    # Defined here so the checks can raise it without importing trainables.arch (a cycle);
    # public, pickled and printed as trainables.arch.ArchError, as it always has been.
    __module__ = "trainables.arch"


def _check(cond: bool, path: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ArchError(f"{path}={value!r} is invalid: expected {allowed}")


def _check_int(path: str, value: Any, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    ok = ok and (hi is None or value <= hi)
    rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    _check(ok, path, value, rng)


def _check_choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, path, value, "one of " + ", ".join(choices))


def _check_float(path: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    _check(ok, path, value, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")


def _check_bool(path: str, value: Any) -> None:
    _check(isinstance(value, bool), path, value, "true or false")


def _check_stage(s: StageConfig, path: str) -> None:
    """:meth:`StageConfig.validate`: each field, then the fields that apply to its block."""
    _check_choice(f"{path}.block", s.block, BLOCK_TYPES)
    _check_choice(f"{path}.conv", s.conv, CONV_TYPES)
    _check_int(f"{path}.width", s.width, 1)
    _check_int(f"{path}.layers", s.layers, 1, 64)
    _check_int(f"{path}.kernel", s.kernel, 1, 11)
    _check(s.kernel % 2 == 1 or s.padding == "valid", f"{path}.kernel", s.kernel,
           "an odd kernel size with padding 'same'")
    _check_choice(f"{path}.downsample", s.downsample, DOWNSAMPLES)
    _check_float(f"{path}.compression", s.compression, 0.0, 1.0, lo_open=True)
    _check_bool(f"{path}.bias", s.bias)
    _check_choice(f"{path}.padding", s.padding, PADDINGS)
    _check_choice(f"{path}.order", s.order, ORDERS)
    _check_choice(f"{path}.transition", s.transition, TRANSITIONS)
    _check_int(f"{path}.bottleneck", s.bottleneck, 0, MAX_BOTTLENECK)
    _check_bool(f"{path}.shortcut_bn", s.shortcut_bn)
    aggregating = s.block in ("densenet", "sparsenet")
    if not aggregating:
        for name, default in (("compression", 1.0), ("order", "post"), ("transition", "auto"),
                              ("bottleneck", 0)):
            value = getattr(s, name)
            if value != default:
                raise ArchError(
                    f"{path}.{name}={value!r} is invalid: {name} applies only to "
                    f"densenet/sparsenet blocks, this stage is {s.block!r} (use {default!r})"
                )
    if s.block != "residual" and not s.shortcut_bn:
        raise ArchError(
            f"{path}.shortcut_bn=False is invalid: shortcut_bn applies only to residual "
            f"blocks, this stage is {s.block!r} (use True)"
        )
    if s.transition == "never" and s.compression != 1.0:
        raise ArchError(
            f"{path}.compression={s.compression!r} is invalid with transition='never': "
            "compression is the transition's; expected 1.0 (or transition auto/always)"
        )
    if aggregating and s.downsample == "stride":
        raise ArchError(
            f"{path}.downsample='stride' is invalid for a {s.block} stage: its layers "
            "concatenate same-size maps; expected one of none, maxpool, avgpool"
        )
    if s.block != "plain" and s.padding == "valid":
        raise ArchError(
            f"{path}.padding='valid' is invalid for a {s.block} stage: its skips/concats "
            "need every conv to keep HxW; expected same"
        )


def _check_shapes(a: ArchConfig) -> None:
    """Walk the spatial size through the network; refuse configs that shrink it to 0."""
    h, w = a.input_size
    if a.stem is not None:
        h, w = (-(-h // a.stem.stride), -(-w // a.stem.stride))
    for i, s in enumerate(a.stages):
        if s.downsample != "none":
            if s.downsample == "stride":
                h, w = -(-h // 2), -(-w // 2)
            else:
                h, w = h // 2, w // 2
        if s.padding == "valid":
            convs = s.layers * (2 if s.block == "residual" else 1)
            h, w = h - convs * (s.kernel - 1), w - convs * (s.kernel - 1)
        if h < 1 or w < 1:
            raise ArchError(
                f"stages[{i}] shrinks the {a.input_size[0]}x{a.input_size[1]} input "
                f"to {h}x{w}: use fewer downsampling stages, 'same' padding or a larger input"
            )
    if a.pooling == "pool_flatten" and (h < 2 or w < 2):
        raise ArchError(
            f"pooling='pool_flatten' is invalid: the last feature map is {h}x{w}, a 2x2 "
            "max-pool needs at least 2x2; expected gap, gmp, maxpool or flatten"
        )


def _known(cls: type, d: Any, path: str) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from a mapping; unknown keys name their path."""
    if not isinstance(d, Mapping):
        raise ArchError(f"{path}={d!r} is invalid: expected a mapping")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ArchError(f"{where} is not a known field: expected one of {', '.join(names)}")
    return dict(d)
