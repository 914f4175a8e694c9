"""ArchConfig: the one description of a network in sparse-search.

Everything passes this around: the search space builds it from an Optuna trial, the budget
screen counts it (``trainables.accounting``), ``trainables.models.build_model`` builds it,
MLflow logs its flat form, and its canonical string names runs and deduplicates configs.

Conventions (so published Keras tables can be matched):
- a *separable* conv is a depthwise kxk conv **without bias** followed by a pointwise 1x1 conv
  **with bias** (Keras ``SeparableConv2D``);
- every conv is followed by BatchNorm (when ``batch_norm``) and the activation, unless a stage
  asks for the pre-activation order (``order: pre``, BN -> act -> conv: the DenseNet/SparseNet
  papers' composite layer);
- "params" in the search means *nonzero trainable* parameters after masks.

Round trip: ``ArchConfig.from_flat(a.to_flat()) == a`` and ``from_dict(to_dict())`` likewise.

This module owns what a valid architecture value is (the allowed choices, :class:`ArchError`
and its ``"{path}={value!r} is invalid: expected ..."`` messages, a stage's per-block rules,
the spatial walk that refuses a network shrinking its input to 0x0, the unknown-key check of
``from_dict``), then the dataclasses themselves (Ray pickles them), their conversions and names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from trainables.errors import ConfigError

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


__all__ = [
    # the choices and the flat-key prefix
    "ACTIVATIONS", "BACKBONES", "BACKBONE_STAGES", "BLOCK_TYPES", "CONV_TYPES", "DOWNSAMPLES",
    "FLAT_PREFIX", "MAX_BOTTLENECK", "ORDERS", "PADDINGS", "POOLINGS", "TRANSITIONS",
    # the configs and their error
    "ArchConfig", "ArchError", "BackboneConfig", "HeadLayer", "StageConfig", "StemConfig",
]

FLAT_PREFIX = "arch"
_BLOCK_ABBR = {"plain": "plain", "residual": "res", "densenet": "dense", "sparsenet": "sparse"}


@dataclass(frozen=True)
class StemConfig:
    """The first conv, applied to the raw input before any stage."""

    width: int = 32  # output channels
    kernel: int = 3  # square kernel size (pixels)
    stride: int = 1  # 2 halves the resolution (004's Model 1 uses stride 2 everywhere)
    conv: str = "standard"  # standard | separable (separable on 1-3 input channels rarely pays)
    bias: bool = True  # conv bias (Keras default True; redundant but counted when BN follows)
    # BN -> act after the conv (the default, as every network measured so far); false: a bare
    # conv, for pre-activation stages that start each layer with BN -> act (DenseNet's first conv)
    bn_act: bool = True

    def validate(self, path: str = "stem") -> None:
        _check_int(f"{path}.width", self.width, 1)
        _check_int(f"{path}.kernel", self.kernel, 1, 11)
        # "same" padding is k//2 on each side: only odd kernels keep HxW.
        _check(self.kernel % 2 == 1, f"{path}.kernel", self.kernel, "an odd kernel size")
        _check_int(f"{path}.stride", self.stride, 1, 4)
        _check_choice(f"{path}.conv", self.conv, CONV_TYPES)
        _check_bool(f"{path}.bias", self.bias)
        _check_bool(f"{path}.bn_act", self.bn_act)


@dataclass(frozen=True)
class StageConfig:
    """A run of blocks at one resolution.

    ``width`` is the output channels for plain/residual and the growth rate k (channels each
    layer adds) for densenet/sparsenet. ``layers`` is the number of convs for plain, of basic
    blocks (two convs + skip) for residual, and of conv layers inside the block for
    densenet/sparsenet.

    The last four fields give the published forms; their defaults are the forms every front
    measured so far used, so those results (and their run names) stay valid:
    ``order``, ``transition`` and ``bottleneck`` apply to densenet/sparsenet stages only,
    ``shortcut_bn`` to residual stages only.
    """

    block: str = "plain"  # plain | residual | densenet | sparsenet
    conv: str = "standard"  # standard | separable
    width: int = 32  # channels (plain/residual) or growth rate (densenet/sparsenet)
    layers: int = 1  # see the class docstring
    kernel: int = 3  # square kernel (pixels)
    downsample: str = "none"  # at stage start: none | stride (first conv stride 2) | maxpool | avgpool (2x2)
    compression: float = 1.0  # densenet/sparsenet: a 1x1 transition to floor(c*channels) when < 1
    bias: bool = True  # conv bias
    padding: str = "same"  # same keeps HxW at stride 1; valid shrinks by kernel-1 (003's MNIST nets)
    # densenet/sparsenet layer and transition: post = conv -> BN -> act (default, the fronts so
    # far); pre = BN -> act -> conv on the concatenated input (the DenseNet/SparseNet papers)
    order: str = "post"
    # densenet/sparsenet: the 1x1 transition conv (to floor(compression * channels)) after the
    # block. auto = only when compression < 1 (default); always = also at 1.0 (the papers: every
    # block but the last; the 2x2 average pool is the next stage's downsample: avgpool); never
    transition: str = "auto"
    # densenet/sparsenet: 0 = none (default); b > 0 = a 1x1 conv to b * growth channels before
    # each layer's kxk conv (the papers' BC variants: 4, i.e. 4k channels)
    bottleneck: int = 0
    # residual: BN after the 1x1 projection shortcut (default; torchvision); false = a bare 1x1
    # conv (Keras ResNet v1 as in MLPerf Tiny's ResNet-8)
    shortcut_bn: bool = True

    def validate(self, path: str = "stage") -> None:
        _check_stage(self, path)


@dataclass(frozen=True)
class HeadLayer:
    """One hidden dense layer of the head (before the output layer)."""

    width: int = 128  # units
    density: float = 1.0  # fraction of weights kept by a fixed seeded random mask; 1.0 = dense

    def validate(self, path: str = "head") -> None:
        _check_int(f"{path}.width", self.width, 1)
        _check_float(f"{path}.density", self.density, 0.0, 1.0, lo_open=True)

    @property
    def sparse(self) -> bool:
        return self.density < 1.0


@dataclass(frozen=True)
class BackboneConfig:
    """A torchvision backbone replacing stem + stages (transfer learning, study 002)."""

    name: str = "resnet18"  # resnet18 | densenet121
    trainable: str = "none"  # none | one named stage (layer3, denseblock3, ...) | all
    weights: str | None = None  # local state_dict path; None: torchvision cache if present, else random init

    def validate(self, path: str = "backbone") -> None:
        _check_choice(f"{path}.name", self.name, BACKBONES)
        _check_choice(f"{path}.trainable", self.trainable, BACKBONE_STAGES[self.name])
        _check(self.weights is None or isinstance(self.weights, str), f"{path}.weights",
               self.weights, "a file path or null")


@dataclass(frozen=True)
class ArchConfig:
    """A whole network. Frozen, validated on construction, hashable."""

    in_channels: int = 3  # input planes (1 for MNIST, 3 for CIFAR)
    input_size: tuple[int, int] = (32, 32)  # (H, W) in pixels
    num_classes: int = 10
    stem: StemConfig | None = field(default_factory=StemConfig)  # None: stages see the raw input
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    batch_norm: bool = True  # BN after every conv
    activation: str = "relu"
    dropout: float = 0.0  # dropout after each stage (probability)
    # into the head: gap (global avg) | gmp (global max) | maxpool (to 1x1) | flatten |
    # pool_flatten (a 2x2 max-pool, then flatten: study 000's Conv-Pool trunk end)
    pooling: str = "gap"
    head: tuple[HeadLayer, ...] = ()  # 0-4 hidden dense layers, then the output layer
    head_batch_norm: bool = False  # BN1d after each hidden head layer (004's Dense 128 + BN)
    head_dropout: float = 0.0  # dropout before each head linear layer after the first
    backbone: BackboneConfig | None = None  # transfer learning; then stem/stages must be empty
    mask_seed: int = 0  # seeds the random masks of sparse head layers
    # BN (when batch_norm) -> act after the last stage, before pooling: pre-activation nets end
    # with it (the DenseNet/SparseNet papers). Default false, as every front measured so far.
    final_bn_act: bool = False

    MAX_HEAD_LAYERS: ClassVar[int] = 4

    def __post_init__(self) -> None:
        # Normalise sequences given as lists (YAML, JSON) so the config stays hashable.
        object.__setattr__(self, "input_size", tuple(self.input_size))
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "head", tuple(self.head))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        _check_int("in_channels", self.in_channels, 1, 64)
        _check(len(self.input_size) == 2, "input_size", self.input_size, "[height, width]")
        for i, s in enumerate(self.input_size):
            _check_int(f"input_size[{i}]", s, 1, 4096)
        _check_int("num_classes", self.num_classes, 2)
        _check_bool("batch_norm", self.batch_norm)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_float("dropout", self.dropout, 0.0, 1.0)
        _check(self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        _check_choice("pooling", self.pooling, POOLINGS)
        _check(len(self.head) <= self.MAX_HEAD_LAYERS, "head", len(self.head),
               f"at most {self.MAX_HEAD_LAYERS} hidden layers")
        for i, h in enumerate(self.head):
            _check(isinstance(h, HeadLayer), f"head[{i}]", h, "a HeadLayer")
            h.validate(f"head[{i}]")
        _check_bool("head_batch_norm", self.head_batch_norm)
        _check_float("head_dropout", self.head_dropout, 0.0, 1.0)
        _check(self.head_dropout < 1.0, "head_dropout", self.head_dropout, "a number in [0, 1)")
        _check_int("mask_seed", self.mask_seed, 0)
        _check_bool("final_bn_act", self.final_bn_act)
        if self.backbone is not None:
            _check(isinstance(self.backbone, BackboneConfig), "backbone", self.backbone,
                   "a BackboneConfig")
            self.backbone.validate()
            if self.stem is not None or self.stages:
                raise ArchError(
                    f"backbone={self.backbone.name!r} replaces stem and stages: expected "
                    f"stem: null and stages: [] (got stem={self.stem!r}, {len(self.stages)} stages)"
                )
            _check(self.in_channels == 3, "in_channels", self.in_channels,
                   "3 for a torchvision backbone")
            _check(self.batch_norm, "batch_norm", self.batch_norm,
                   "true with a torchvision backbone (its BatchNorm layers are part of it)")
            _check(not self.final_bn_act, "final_bn_act", self.final_bn_act,
                   "false with a torchvision backbone (its trunk ends as torchvision builds it)")
            # densenet121's trunk pools 5 times with kernel 2 after a stride-4 stem: < 29 px
            # reaches 0x0 (resnet18 pads every pooling, so any size works).
            min_side = 29 if self.backbone.name == "densenet121" else 1
            _check(min(self.input_size) >= min_side, "input_size", list(self.input_size),
                   f"at least {min_side}x{min_side} for {self.backbone.name}")
            return
        if self.stem is not None:
            _check(isinstance(self.stem, StemConfig), "stem", self.stem, "a StemConfig or null")
            self.stem.validate()
        _check(self.stem is not None or len(self.stages) > 0, "stages", self.stages,
               "at least one stage when there is no stem")
        for i, s in enumerate(self.stages):
            _check(isinstance(s, StageConfig), f"stages[{i}]", s, "a StageConfig")
            s.validate(f"stages[{i}]")
        _check_shapes(self)

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (YAML/JSON friendly)."""
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        d["head"] = [dataclasses.asdict(h) for h in self.head]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, path: str = "") -> ArchConfig:
        """Build from a nested dict; unknown keys are errors naming their path."""
        if not isinstance(d, Mapping):
            raise ArchError(f"{path or 'arch'}={d!r} is invalid: expected a mapping")
        kw = _known(cls, d, path)
        p = f"{path}." if path else ""
        if "stem" in kw and kw["stem"] is not None:
            kw["stem"] = StemConfig(**_known(StemConfig, kw["stem"], f"{p}stem"))
        if "stages" in kw:
            _check(isinstance(kw["stages"], (list, tuple)), f"{p}stages", kw["stages"], "a list")
            kw["stages"] = tuple(
                StageConfig(**_known(StageConfig, s, f"{p}stages[{i}]"))
                for i, s in enumerate(kw["stages"])
            )
        if "head" in kw:
            _check(isinstance(kw["head"], (list, tuple)), f"{p}head", kw["head"], "a list")
            kw["head"] = tuple(
                HeadLayer(**({"width": h} if isinstance(h, int) else _known(HeadLayer, h, f"{p}head[{i}]")))
                for i, h in enumerate(kw["head"])
            )
        if kw.get("backbone") is not None:
            kw["backbone"] = BackboneConfig(**_known(BackboneConfig, kw["backbone"], f"{p}backbone"))
        try:
            return cls(**kw)
        except ArchError as e:
            raise ArchError(f"{p}{e}") from None

    def to_flat(self, prefix: str = FLAT_PREFIX) -> dict[str, Any]:
        """Flat dict of scalars keyed like ``arch/stages/0/width`` (for Ray Tune and MLflow).

        Counts are explicit (``arch/num_stages``, ``arch/num_head``) so empty lists and a missing
        stem/backbone survive the round trip.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "input_size":
                out[f"{prefix}/input_size/0"], out[f"{prefix}/input_size/1"] = v
            elif f.name in ("stem", "backbone"):
                out[f"{prefix}/{f.name}"] = v is not None
                if v is not None:
                    for sf in fields(v):
                        out[f"{prefix}/{f.name}/{sf.name}"] = getattr(v, sf.name)
            elif f.name in ("stages", "head"):
                out[f"{prefix}/num_{f.name}"] = len(v)
                for i, item in enumerate(v):
                    for sf in fields(item):
                        out[f"{prefix}/{f.name}/{i}/{sf.name}"] = getattr(item, sf.name)
            else:
                out[f"{prefix}/{f.name}"] = v
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], prefix: str = FLAT_PREFIX) -> ArchConfig:
        """Inverse of :meth:`to_flat`; keys outside ``prefix/`` are ignored."""
        pre = prefix + "/"
        sub = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
        d: dict[str, Any] = {}
        for f in fields(cls):
            n = f.name
            if n == "input_size":
                if "input_size/0" in sub:
                    d[n] = [sub["input_size/0"], sub["input_size/1"]]
            elif n in ("stem", "backbone"):
                if n in sub:
                    d[n] = ({k.split("/", 1)[1]: v for k, v in sub.items()
                             if k.startswith(n + "/")} if sub[n] else None)
            elif n in ("stages", "head"):
                if f"num_{n}" in sub:
                    d[n] = [
                        {k.split("/", 2)[2]: v for k, v in sub.items() if k.startswith(f"{n}/{i}/")}
                        for i in range(int(sub[f"num_{n}"]))
                    ]
            elif n in sub:
                d[n] = sub[n]
        return cls.from_dict(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ArchConfig:
        data = yaml.safe_load(text)
        if isinstance(data, Mapping) and "arch" in data and len(data) == 1:
            data = data["arch"]
        return cls.from_dict(data or {})

    @classmethod
    def load(cls, path: str | Path) -> ArchConfig:
        """Load an architecture YAML; errors are prefixed with the file path."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ArchError(f"{p}: cannot read architecture file ({e.strerror})") from None
        try:
            return cls.from_yaml(text)
        except yaml.YAMLError as e:
            raise ArchError(f"{p}: not valid YAML: {e}") from None
        except ArchError as e:
            raise ArchError(f"{p}: {e}") from None

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def replace(self, **changes: Any) -> ArchConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ naming
    @property
    def conv_kind(self) -> str:
        kinds = {s.conv for s in self.stages}
        if self.backbone is not None:
            return self.backbone.name
        if kinds == {"separable"}:
            return "sep"
        if kinds == {"standard"} or not kinds:
            return "std"
        return "mix"

    def canonical(self) -> str:
        """Short readable name, e.g. ``sep|s32/2|res2x32,res2x64/s|gap|h128@0.3|r0``.

        Encodes every field that changes the network (the mask seed only when a head layer
        is sparse; backbone weights by file name), so two different networks do not share a
        name (tested); :meth:`key` hashes the full config for a fixed-length id.
        """
        parts: list[str] = [self.conv_kind]
        if self.backbone is not None:
            b = self.backbone
            parts.append(f"train:{b.trainable}" + ("" if b.weights is None else f"@{Path(b.weights).name}"))
        if self.stem is not None:
            st = self.stem
            tok = f"s{st.width}" + (f"/{st.stride}" if st.stride != 1 else "")
            tok += (f"k{st.kernel}" if st.kernel != 3 else "") + ("sep" if st.conv == "separable" else "")
            tok += "" if st.bias else "nb"
            tok += "" if st.bn_act else "raw"
            parts.append(tok)
        stage_toks = []
        for s in self.stages:
            tok = f"{_BLOCK_ABBR[s.block]}{s.layers}x{s.width}"
            tok += {"none": "", "stride": "/s", "maxpool": "/m", "avgpool": "/a"}[s.downsample]
            tok += f"k{s.kernel}" if s.kernel != 3 else ""
            tok += f"c{s.compression:g}" if s.compression != 1.0 else ""
            tok += "" if s.bias else "nb"
            tok += "v" if s.padding == "valid" else ""
            # The published forms (absent at their defaults: older names stay as they were).
            tok += "pre" if s.order == "pre" else ""
            tok += f"b{s.bottleneck}" if s.bottleneck else ""
            tok += {"auto": "", "always": "tr", "never": "notr"}[s.transition]
            tok += "" if s.shortcut_bn else "nosbn"
            if self.conv_kind == "mix":
                tok += "+sep" if s.conv == "separable" else "+std"
            stage_toks.append(tok)
        if stage_toks:
            parts.append(",".join(stage_toks))
        parts.append(self.pooling)
        if self.head:
            parts.append("h" + "-".join(
                f"{h.width}" + (f"@{h.density:g}" if h.sparse else "") for h in self.head))
        opts = []
        if not self.batch_norm:
            opts.append("nobn")
        if self.activation != "relu":
            opts.append(self.activation)
        if self.dropout:
            opts.append(f"d{self.dropout:g}")
        if self.head_batch_norm:
            opts.append("hbn")
        if self.head_dropout:
            opts.append(f"hd{self.head_dropout:g}")
        if any(h.sparse for h in self.head):
            opts.append(f"r{self.mask_seed}")
        if self.final_bn_act:
            opts.append("fbn")
        if opts:
            parts.append(",".join(opts))
        in_tok = f"in{self.in_channels}x{self.input_size[0]}x{self.input_size[1]}c{self.num_classes}"
        if in_tok != "in3x32x32c10":
            parts.append(in_tok)
        return "|".join(parts)

    def key(self) -> str:
        """A 12-hex-digit stable id of the full config (dedup key, artifact names)."""
        # Fields added after keys were first recorded are left out at their defaults, so a
        # config that does not use them keeps the key it always had.
        flat = {k: v for k, v in self.to_flat().items()
                if not (k.rsplit("/", 1)[-1] in _LATE_DEFAULTS
                        and _LATE_DEFAULTS[k.rsplit("/", 1)[-1]] == v)}
        blob = json.dumps(flat, sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def __str__(self) -> str:
        return self.canonical()


# Fields added after run names and keys were first recorded, with their defaults (see key()).
_LATE_DEFAULTS: dict[str, Any] = {
    "bn_act": True, "order": "post", "transition": "auto", "bottleneck": 0, "shortcut_bn": True,
    "final_bn_act": False,
}
