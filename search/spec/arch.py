"""Reading the ``space`` section: every ArchConfig dimension, fixed or searched, checked by
the rules of the ArchConfig part that holds it, and the rules that tie space fields together
(:func:`read_arch_space`). Used by :func:`search.spec.parse.parse_spec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from search.spec.dims import is_int, plain, possible_values, stage_value
from search.spec.model import (
    AGGREGATING_BLOCKS,
    BACKBONE_TRAINABLE,
    MAX_STAGES,
    ArchSpace,
    StagesSpace,
    StemSpace,
)
from search.spec.reader import (
    Reader,
    annotation_kind,
    arch_check,
    bool_check,
    one_of,
    read_dim,
)
from trainables.arch import (
    ACTIVATIONS,
    BACKBONES,
    BLOCK_TYPES,
    CONV_TYPES,
    POOLINGS,
    ArchConfig,
    HeadLayer,
    StageConfig,
    StemConfig,
)

__all__ = ["read_arch_space"]


def _stem_check(name: str) -> Callable[[Any], str | None]:
    return arch_check(lambda v: StemConfig(**{name: v}).validate())


def _stage_check(name: str) -> Callable[[Any], str | None]:
    # Fields that apply to one kind of block are checked on a stage of that kind.
    base = ({"block": "densenet"} if name in ("compression", "order", "transition", "bottleneck")
            else {"block": "residual"} if name == "shortcut_bn" else {})
    return arch_check(lambda v: StageConfig(**{**base, name: v}).validate())


def _net_check(name: str) -> Callable[[Any], str | None]:
    return arch_check(lambda v: ArchConfig(**{name: v}))


def _head_check(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and all(is_int(w) and w >= 1 for w in v)
    if not ok:
        return "a list of hidden layer widths (integers >= 1), e.g. [512, 128] or []"
    if len(v) > ArchConfig.MAX_HEAD_LAYERS:
        return f"at most {ArchConfig.MAX_HEAD_LAYERS} hidden layers"
    return None



_STEM_FIELDS = {f.name: _stem_check(f.name) for f in fields(StemSpace)}
_STAGE_FIELDS = {f.name: _stage_check("width" if f.name == "growth" else f.name)
                 for f in fields(StagesSpace)}
_NET_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "backbone": one_of(("none", *BACKBONES)),
    "backbone_trainable": one_of(BACKBONE_TRAINABLE),
    "num_stages": lambda v: None if is_int(v) and 0 <= v <= MAX_STAGES else (
        f"an integer in [0, {MAX_STAGES}]"),
    "block": one_of(BLOCK_TYPES),
    "conv": one_of(CONV_TYPES),
    "batch_norm": _net_check("batch_norm"),
    "activation": one_of(ACTIVATIONS),
    "dropout": _net_check("dropout"),
    "pooling": one_of(POOLINGS),
    "head": _head_check,
    "head_sparse": bool_check,
    "head_density": arch_check(lambda v: HeadLayer(density=v).validate()),
    "head_batch_norm": _net_check("head_batch_norm"),
    "head_dropout": _net_check("head_dropout"),
    "mask_seed": _net_check("mask_seed"),
    "final_bn_act": _net_check("final_bn_act"),
}
# The field each space key stands for, so its kind (int/float/categorical) comes from the real
# ArchConfig annotations; keys not listed are categorical.
_NET_KIND_SOURCE: dict[str, tuple[type, str]] = {
    "num_stages": (ArchConfig, "mask_seed"),  # an int
    "dropout": (ArchConfig, "dropout"),
    "head_density": (HeadLayer, "density"),
    "head_dropout": (ArchConfig, "head_dropout"),
    "mask_seed": (ArchConfig, "mask_seed"),
}


def _net_kind(name: str) -> str:
    return annotation_kind(*_NET_KIND_SOURCE[name]) if name in _NET_KIND_SOURCE else "cat"


def read_arch_space(r: Reader, d: Any) -> ArchSpace:
    names = [f.name for f in fields(ArchSpace)]
    kw = r.mapping(d, "space", names)
    out: dict[str, Any] = {}
    for k, v in kw.items():
        path = f"space.{k}"
        if k == "stem":
            out[k] = None if v is None else _stem_space(r, v)
        elif k == "stages":
            out[k] = _stages_space(r, v)
        elif k == "backbone_weights":
            if v is not None and not isinstance(v, str):
                r.invalid(path, v, "a file path or null")
            if v is not None:
                # Trials run in their own directories (and maybe on other nodes): make the path
                # absolute now, relative to where the search is started, and fail before training.
                w = Path(v).expanduser().resolve()
                if not w.is_file():
                    r.invalid(path, v, f"an existing state_dict file (no file at {w})")
                v = str(w)
            out[k] = v
        else:
            out[k] = read_dim(r, v, path, _net_kind(k), _NET_FIELDS[k])
    space = ArchSpace(**out)
    _check_space(r, space)
    return space


def _stem_space(r: Reader, d: Any) -> StemSpace:
    kw = r.mapping(d, "space.stem", list(_STEM_FIELDS))
    return StemSpace(**{k: read_dim(r, v, f"space.stem.{k}", annotation_kind(StemConfig, k),
                                _STEM_FIELDS[k]) for k, v in kw.items()})


def _stages_space(r: Reader, d: Any) -> StagesSpace:
    kw = r.mapping(d, "space.stages", list(_STAGE_FIELDS))
    out = {}
    for k, v in kw.items():
        path = f"space.stages.{k}"
        kind = annotation_kind(StageConfig, "width" if k == "growth" else k)
        if isinstance(v, list):  # one value per stage
            if not v:
                r.invalid(path, v, "a value or a non-empty list with one value per stage")
            out[k] = tuple(read_dim(r, x, f"{path}[{i}]", kind, _STAGE_FIELDS[k])
                           for i, x in enumerate(v))
        else:
            out[k] = read_dim(r, v, path, kind, _STAGE_FIELDS[k])
    return StagesSpace(**out)


def _check_space(r: Reader, s: ArchSpace) -> None:
    """Rules that tie several space fields together."""
    backbones = possible_values(s.backbone)
    if "none" not in backbones:
        return  # stem and stages are never used
    blocks = set(possible_values(s.block))
    stage_counts = possible_values(s.num_stages)
    max_stages, min_stages = max(stage_counts), min(stage_counts)
    if s.stem is None and min_stages < 1:
        r.invalid("space.num_stages", plain(s.num_stages),
                  "at least 1 stage when space.stem is null")
    for f in fields(StagesSpace):
        dim = getattr(s.stages, f.name)
        if isinstance(dim, tuple) and len(dim) < max_stages:
            r.invalid(f"space.stages.{f.name}", plain(dim),
                      f"one value per stage: {max_stages} (the most space.num_stages allows)")
    for i in range(max_stages):
        sfx = f"[{i}]" if isinstance(s.stages.downsample, tuple) else ""
        down = set(possible_values(stage_value(s.stages.downsample, i)))
        if blocks & set(AGGREGATING_BLOCKS) and down == {"stride"}:
            r.invalid(f"space.stages.downsample{sfx}", "stride",
                      "none, maxpool or avgpool as a possible value: densenet/sparsenet stages "
                      "concatenate same-size maps and cannot use stride")
        sfx = f"[{i}]" if isinstance(s.stages.padding, tuple) else ""
        pads = set(possible_values(stage_value(s.stages.padding, i)))
        if "plain" not in blocks and pads == {"valid"}:
            r.invalid(f"space.stages.padding{sfx}", "valid",
                      "same: only plain stages can shrink (skips and concatenations need HxW kept)")
        # The published forms apply to one kind of block: a value no possible block uses is a
        # mistake in the file, not something to ignore.
        for name, default, kinds in (("order", "post", AGGREGATING_BLOCKS),
                                     ("transition", "auto", AGGREGATING_BLOCKS),
                                     ("bottleneck", 0, AGGREGATING_BLOCKS),
                                     ("shortcut_bn", True, ("residual",))):
            dim = getattr(s.stages, name)
            sfx = f"[{i}]" if isinstance(dim, tuple) else ""
            values = possible_values(stage_value(dim, i))
            if not blocks & set(kinds) and default not in values:
                r.invalid(f"space.stages.{name}{sfx}", plain(stage_value(dim, i)),
                          f"{default!r}: {name} applies only to {'/'.join(kinds)} stages, and "
                          f"space.block allows {', '.join(sorted(blocks))}")
        trans = set(possible_values(stage_value(s.stages.transition, i)))
        comps = possible_values(stage_value(s.stages.compression, i))
        if blocks & set(AGGREGATING_BLOCKS) and trans == {"never"} and 1.0 not in comps:
            sfx = f"[{i}]" if isinstance(s.stages.compression, tuple) else ""
            r.invalid(f"space.stages.compression{sfx}", plain(stage_value(s.stages.compression, i)),
                      "1.0 as a possible value: space.stages.transition is never, and compression "
                      "is the transition's")
