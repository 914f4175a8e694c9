"""SearchSpec -> a define-by-run Optuna space, the budget screen, and the Proposer.

:class:`SearchSpace` turns one Optuna trial into a :class:`Proposal`: it suggests values in an
order that expresses the conditionals (a backbone skips stem and stages; densenet/sparsenet
stages sample a growth rate and compression, plain/residual ones a width; hidden head layers
bring head sparsity, density, BN and dropout; ``prune_rounds > 0`` brings ``prune_rate``), builds
the ArchConfig and TrainConfig and counts the network on the meta device (the budget screen:
``trainables.accounting`` on one meta build, which also yields the prunable weights that the
pruning-rounds estimate needs).

:class:`Proposer` owns the Optuna study. :meth:`Proposer.ask` re-asks until a proposal is
feasible: each over-budget (or impossible) one is told to Optuna as a finished trial with
constraint values (``Trial.set_constraint``, > 0 = violated), which TPE (it ranks infeasible
trials last when it splits good from bad) and NSGA-II (constrained domination) learn from, so
the rejection rate falls as the search goes on. It never returns an infeasible proposal.

Optuna parameter names follow the spec's paths: ``block``, ``stem/width``, ``stages/0/width``,
``stages/0/growth``, ``head``, ``head_density``, ``train/lr``, ``fill_fraction``, ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from search import bands
from search.spec import (
    AGGREGATING_BLOCKS,
    Choice,
    FloatRange,
    InitialPoint,
    IntRange,
    SearchSpec,
    SpecError,
    possible_values,
    stage_value,
)
from trainables import pruning
from trainables.accounting import Accounting, count_built, meta_model
from trainables.arch import (
    BACKBONE_STAGES,
    ArchConfig,
    BackboneConfig,
    HeadLayer,
    StageConfig,
    StemConfig,
)
from trainables.layers import SparseLinear
from trainables.train import TrainConfig, resolve_augment

log = logging.getLogger("sparse_search.space")

# pruning.prune_step prunes the output layer at half the rate (Frankle & Carbin), its default.
OUTPUT_RATE_FACTOR = 0.5
# A train field -> (field it depends on, predicate on that field's value); sampled only if true.
_TRAIN_CONDITIONS: dict[str, tuple[str, Any]] = {
    "prune_rate": ("prune_rounds", lambda rounds: rounds > 0),
    "prune_scope": ("prune_rounds", lambda rounds: rounds > 0),
    "rewind_epoch": ("prune_rounds", lambda rounds: rounds > 0),
    "nesterov": ("optimizer", lambda opt: opt == "sgd"),
}
# Metric value told to Optuna for an infeasible trial when nothing better is known.
_WORST = {"max": 0.0, "min": math.inf}
# Budget screens kept per SearchSpace (an Optuna study re-proposes the same shapes often).
_CACHE_SIZE = 4096
# fill_budget: at most this many counts to land in [FILL_TOLERANCE * target, target].
_FILL_STEPS = 8
_FILL_TOLERANCE = 0.97


@dataclass(frozen=True)
class Proposal:
    """One sampled configuration and its budget screen."""

    arch: ArchConfig | None  # None when the sampled values make no valid network (see error)
    train: TrainConfig | None
    accounting: Accounting | None  # dense counts of ``arch`` (meta device)
    config: dict[str, Any]  # flat {"arch/...", "train/..."}: what Ray passes to the trainable
    screened_params: int | None  # nonzero params of the delivered model (after pruning rounds)
    feasible: bool
    violations: dict[str, float]  # constraint -> value - limit; <= 0 is feasible
    params: dict[str, Any] = field(default_factory=dict)  # what Optuna sampled
    error: str | None = None  # why the sampled values make no valid config
    initial: str | None = None  # the label of the search.initial entry it comes from


@dataclass(frozen=True)
class _Screen:
    accounting: Accounting
    body: tuple[int, ...]  # nonzero weights of each prunable layer but the output layer
    output: int  # nonzero weights of the output layer (0 when there is none)


class SearchSpace:
    """A spec's space for one dataset shape. Picklable (Ray pickles the searcher with it)."""

    def __init__(
        self, spec: SearchSpec, *, input_shape: Sequence[int], num_classes: int
    ) -> None:
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
            raise ValueError(f"{input_shape=} must be (channels, height, width), positive ints")
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"{num_classes=} must be an integer >= 2")
        backbones = [b for b in possible_values(spec.space.backbone) if b != "none"]
        if backbones and shape[0] != 3:
            raise SpecError(
                f"{spec.source}: space.backbone can be {backbones[0]!r}, which needs 3-channel "
                f"images, but the data ({spec.data.name}) has {shape[0]} channel(s): expected "
                "backbone: none"
            )
        self.spec = spec
        self.input_shape = (shape[0], shape[1], shape[2])  # (C, H, W)
        self.num_classes = num_classes
        self._cache: dict[ArchConfig, _Screen] = {}
        # search.initial as Optuna params, for Study.enqueue_trial (checked here: a point
        # outside the space fails before anything trains).
        self.initial: tuple[dict[str, Any], ...] = tuple(
            self._initial_params(i, p) for i, p in enumerate(spec.search.initial))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}  # screens are cheap to redo, big to ship

    # ------------------------------------------------------------------ sampling
    def sample(self, trial: optuna.Trial) -> Proposal:
        """Suggest one configuration on ``trial`` and screen it (never trains anything)."""
        arch_kw = self._suggest_arch(trial)
        train_kw = self._suggest_train(trial)
        fill = self.spec.search.fill_budget
        fraction = _suggest(trial, FILL_FRACTION, fill.fraction) if fill is not None else None
        try:
            train = TrainConfig(**train_kw)
            arch = ArchConfig(**arch_kw)
            if fraction is not None:
                arch = self._fill(arch, train, fraction * self.spec.constraints.max_params)
            screen = self._screen(arch)
        except ValueError as e:  # ArchError, TrainConfigError: values that make no network
            return Proposal(None, None, None, {}, None, False, {"valid": 1.0},
                            dict(trial.params), str(e))
        screened = _delivered_params(screen, train)
        violations = self._violations(screened, screen.accounting.macs)
        return Proposal(
            arch=arch,
            train=train,
            accounting=screen.accounting,
            config={**arch.to_flat(), **train.to_flat()},
            screened_params=screened,
            feasible=all(v <= 0 for v in violations.values()),
            violations=violations,
            params=dict(trial.params),
        )

    def constraint_values(self, proposal: Proposal) -> dict[str, float]:
        """Optuna constraint values: violations relative to each limit (<= 0 feasible), so
        a params excess and a MACs excess weigh alike; an impossible config counts 1.0."""
        limits = {"max_params": self.spec.constraints.max_params,
                  "max_macs": self.spec.constraints.max_macs}
        out = {k: v / limits[k] for k, v in proposal.violations.items() if k in limits}
        out["valid"] = proposal.violations.get("valid", 0.0)
        return out

    def _violations(self, params: int, macs: int) -> dict[str, float]:
        c = self.spec.constraints
        out: dict[str, float] = {}
        if c.max_params is not None:
            out["max_params"] = float(params - c.max_params)
        if c.max_macs is not None:
            out["max_macs"] = float(macs - c.max_macs)
        return out

    def _suggest_arch(self, trial: optuna.Trial) -> dict[str, Any]:
        s = self.spec.space
        c, h, w = self.input_shape
        kw: dict[str, Any] = {"in_channels": c, "input_size": (h, w),
                              "num_classes": self.num_classes}
        backbone = _suggest(trial, "backbone", s.backbone)
        if backbone != "none":
            token = _suggest(trial, "backbone_trainable", s.backbone_trainable)
            stages = BACKBONE_STAGES[backbone]
            trainable = token if token in ("none", "all") else stages[int(token[-1])]
            kw.update(stem=None, stages=(), backbone=BackboneConfig(
                name=backbone, trainable=trainable, weights=s.backbone_weights))
        else:
            conv = _suggest(trial, "conv", s.conv)
            block = _suggest(trial, "block", s.block)
            kw["stem"] = None if s.stem is None else StemConfig(**{
                f.name: _suggest(trial, f"stem/{f.name}", getattr(s.stem, f.name))
                for f in fields(s.stem)
            })
            n = _suggest(trial, "num_stages", s.num_stages)
            kw["stages"] = tuple(self._suggest_stage(trial, i, block, conv) for i in range(n))
            kw["batch_norm"] = _suggest(trial, "batch_norm", s.batch_norm)
        if kw.get("stages"):
            kw["final_bn_act"] = _suggest(trial, "final_bn_act", s.final_bn_act)
        for name in ("activation", "dropout", "pooling"):
            kw[name] = _suggest(trial, name, getattr(s, name))
        widths = _suggest(trial, "head", s.head)
        if widths:
            sparse = _suggest(trial, "head_sparse", s.head_sparse)
            density = _suggest(trial, "head_density", s.head_density) if sparse else 1.0
            kw["head"] = tuple(HeadLayer(width=wd, density=density) for wd in widths)
            kw["head_batch_norm"] = _suggest(trial, "head_batch_norm", s.head_batch_norm)
            kw["head_dropout"] = _suggest(trial, "head_dropout", s.head_dropout)
            if sparse:
                kw["mask_seed"] = _suggest(trial, "mask_seed", s.mask_seed)
        return kw

    def _suggest_stage(self, trial: optuna.Trial, i: int, block: str, conv: str) -> StageConfig:
        st = self.spec.space.stages
        p = f"stages/{i}/"
        dense = block in AGGREGATING_BLOCKS
        kw: dict[str, Any] = {"block": block, "conv": conv}
        if dense:
            kw["width"] = _suggest(trial, p + "growth", stage_value(st.growth, i))
            kw["compression"] = _suggest(trial, p + "compression", stage_value(st.compression, i))
            # Aggregating stages concatenate same-size maps: stride is not an option, and a
            # different choice set needs its own parameter name in Optuna.
            down = _without(stage_value(st.downsample, i), "stride")
            kw["downsample"] = _suggest(trial, p + "downsample_dense", down)
        else:
            kw["width"] = _suggest(trial, p + "width", stage_value(st.width, i))
            kw["downsample"] = _suggest(trial, p + "downsample", stage_value(st.downsample, i))
        for name in ("layers", "kernel", "bias"):
            kw[name] = _suggest(trial, p + name, stage_value(getattr(st, name), i))
        if dense:  # the published forms (defaults: today's)
            for name in ("order", "transition", "bottleneck"):
                kw[name] = _suggest(trial, p + name, stage_value(getattr(st, name), i))
            if kw["transition"] == "never":
                kw["compression"] = 1.0  # compression is the transition's
        elif block == "residual":
            kw["shortcut_bn"] = _suggest(trial, p + "shortcut_bn", stage_value(st.shortcut_bn, i))
        if block == "plain":
            kw["padding"] = _suggest(trial, p + "padding", stage_value(st.padding, i))
        else:
            kw["padding"] = "same"  # skips and concatenations need HxW kept
        return StageConfig(**kw)

    def _suggest_train(self, trial: optuna.Trial) -> dict[str, Any]:
        dims = self.spec.train
        kw: dict[str, Any] = {}
        parents = {parent for parent, _ in _TRAIN_CONDITIONS.values()} | {"augment"}
        order = [f.name for f in fields(TrainConfig)]
        for name in sorted(dims, key=lambda n: (n not in parents, order.index(n))):
            dim = dims[name]
            if not _train_needed(name, {**_train_defaults(), **kw}, self.spec.data.name):
                if not isinstance(dim, (Choice, IntRange, FloatRange)):
                    kw[name] = dim  # fixed values pass through (they cost nothing)
                continue
            kw[name] = _suggest(trial, f"train/{name}", dim)
        return kw

    # ------------------------------------------------------------------ initial points
    def _initial_params(self, i: int, point: InitialPoint) -> dict[str, Any]:
        """The Optuna params that make :meth:`sample` propose ``point``.

        The point is walked through the same suggest calls as a sampled trial, so conditional
        parameters come out right and every value is checked against its distribution. An
        arch must come back unchanged: equal to the network the space builds from those
        values (fixed dims included), and left alone by the fill (its ``fill_fraction`` is
        chosen to put the target just above its own size).
        """
        where = f"{self.spec.source}: search.initial[{i}] ({point.label})"
        arch = point.arch
        if arch is not None:
            shape = (arch.in_channels, *arch.input_size)
            if shape != self.input_shape or arch.num_classes != self.num_classes:
                raise SpecError(
                    f"{where}: the network takes {_shape(shape)} inputs in "
                    f"{arch.num_classes} classes, the data has {_shape(self.input_shape)} "
                    f"images in {self.num_classes}")
            clash = [k for k in point.params if not k.startswith("train/") and k != FILL_FRACTION]
            if clash:
                raise SpecError(f"{where}: {clash[0]} is given beside arch: give a whole "
                                "network or its parameters, not both")
        trial = _FixedTrial(where, point.params, arch)
        arch_kw = self._suggest_arch(trial)
        train_kw = self._suggest_train(trial)
        fill = self.spec.search.fill_budget
        fraction = None
        if fill is not None:
            if arch is not None and FILL_FRACTION not in point.params:
                trial.fill = self._fill_fraction_for(arch, fill.fraction)
            fraction = _suggest(trial, FILL_FRACTION, fill.fraction)
        unused = [k for k in point.params if k not in trial.asked]
        if unused:
            raise SpecError(
                f"{where}: {unused[0]} is not a parameter of this point (its parameters: "
                f"{', '.join(trial.asked)}); a conditional one needs the values it depends on")
        if arch is None:
            return trial.params  # unset values are sampled: the network is built at ask time
        try:
            built = ArchConfig(**arch_kw)
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
        theirs, mine = arch.to_flat(), built.to_flat()
        diff = [k for k in {**theirs, **mine} if theirs.get(k, _UNSET) != mine.get(k, _UNSET)]
        if diff:
            raise SpecError(f"{where}: the network is outside the space: " + "; ".join(
                f"{k} is {theirs.get(k)!r}, the space gives {mine.get(k)!r}" for k in diff[:3]))
        train = TrainConfig(**train_kw)
        screen = self._screen(built)
        over = {k: v for k, v in self._violations(_delivered_params(screen, train),
                                                  screen.accounting.macs).items() if v > 0}
        if over:
            limits = {"max_params": "params", "max_macs": "MACs"}
            raise SpecError(f"{where}: the network is over budget: " + "; ".join(
                f"{v:+,.0f} {limits[k]} over constraints.{k}" for k, v in over.items())
                + " (pruning rounds, if the point sets train/prune_rounds, are counted)")
        if fraction is not None and FILL_FRACTION not in point.params:
            assert self.spec.constraints.max_params is not None
            filled = self._fill(built, train, fraction * self.spec.constraints.max_params)
            if filled != built:
                got = _delivered_params(self._screen(filled), train)
                raise SpecError(
                    f"{where}: search.fill_budget would scale it to {got:,} params "
                    f"(fill_fraction {fraction:.3g} of max_params): its own size is outside "
                    "the fill range; give fill_fraction to accept that")
        return trial.params

    def _fill_fraction_for(self, arch: ArchConfig, dim: Any) -> float | None:
        """The fill fraction whose target sits just above ``arch``'s own (dense) size; None
        when the fraction is fixed (the check after the fill says whether it fits)."""
        assert self.spec.constraints.max_params is not None
        own = self._screen(arch).accounting.nonzero_params
        want = own / (self.spec.constraints.max_params * (1 + _FILL_TOLERANCE) / 2)
        if isinstance(dim, FloatRange):
            return min(max(want, dim.lo), dim.hi)
        if isinstance(dim, Choice):
            above = [v for v in dim.values if v >= want]
            return min(above) if above else max(dim.values)
        return None

    # ------------------------------------------------------------------ screening
    def _screen(self, arch: ArchConfig) -> _Screen:
        """Counts of ``arch`` built once on the meta device (milliseconds, no weights)."""
        hit = self._cache.get(arch)
        if hit is not None:
            return hit
        model = meta_model(arch)
        acc = count_built(model, (arch.in_channels, *arch.input_size))
        out = pruning.output_layer(model)
        prunable = pruning.prunable(model)
        screen = _Screen(
            accounting=acc,
            body=tuple(_nonzero_weights(m) for m, _ in prunable if m is not out),
            output=sum(_nonzero_weights(m) for m, _ in prunable if m is out),
        )
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[arch] = screen
        return screen

    def _fill(self, arch: ArchConfig, train: TrainConfig, target: float) -> ArchConfig:
        """Scale every width by one factor so the delivered params land just under ``target``.

        Params grow about quadratically in a width factor s (conv weights are in x out), so
        the first guesses are s * sqrt(aim / params); once counts bracket the target, s is
        interpolated between them on log-log axes. Returns the largest scaled arch under
        ``target`` (the smallest one counted when none is).
        """
        aim = target * (1 + _FILL_TOLERANCE) / 2  # the middle of the accepted window
        under: tuple[float, int, ArchConfig] | None = None  # largest s counted under target
        over: tuple[float, int, ArchConfig] | None = None  # smallest s counted over it
        counted: set[ArchConfig] = set()
        s = 1.0
        for _ in range(4 * _FILL_STEPS):
            if len(counted) >= _FILL_STEPS:
                break
            scaled = _scale_widths(arch, s)
            if scaled in counted:  # rounding to integer widths hid the step
                if under is None:
                    s *= 0.9  # still over the target: take a bigger step down
                    continue
                if over is None or over[0] / under[0] < 1.01:
                    break
                mid = math.sqrt(under[0] * over[0])  # bisect the bracket instead
                if _scale_widths(arch, mid) in counted:
                    break  # no integer widths between the two
                s = mid
                continue
            counted.add(scaled)
            p = _delivered_params(self._screen(scaled), train)
            if p <= target:
                if under is None or s > under[0]:
                    under = (s, p, scaled)
                if p >= _FILL_TOLERANCE * target:
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


_UNSET = object()


class _FixedTrial:
    """Stands in for an ``optuna.Trial`` while an initial point is turned into Optuna params:
    each suggest returns the point's value (checked against the distribution) and records it;
    a value the point leaves open returns the lowest choice and is left to the sampler."""

    def __init__(self, where: str, params: Mapping[str, Any], arch: ArchConfig | None) -> None:
        self.where = where
        self.given = dict(params)
        self.arch = arch
        self.fill: float | None = None  # fill_fraction chosen for an arch
        self.params: dict[str, Any] = {}  # what Optuna will be given (categoricals encoded)
        self.asked: list[str] = []

    def _value(self, name: str) -> Any:
        self.asked.append(name)
        if name in self.given:
            return self.given[name]
        if name == FILL_FRACTION and self.fill is not None:
            return self.fill
        if self.arch is not None and not name.startswith("train/") and name != FILL_FRACTION:
            return _arch_value(self.arch, name)
        return _UNSET

    def _bad(self, name: str, value: Any, allowed: str) -> SpecError:
        return SpecError(f"{self.where}: {name}={value!r} is outside the space: expected {allowed}")

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        v = self._value(name)
        if v is _UNSET:
            return choices[0]
        enc = _encode(tuple(v) if isinstance(v, list) else v)
        for c in choices:  # by type too: YAML's 1 is not true, nor "1" 1
            if c == enc and (type(c) is type(enc) or {type(c), type(enc)} == {int, float}):
                self.params[name] = c
                return c
        raise self._bad(name, v, "one of " + ", ".join(map(repr, choices)))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int:
        v = self._value(name)
        if v is _UNSET:
            return low
        if not (isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
                and (v - low) % step == 0):
            raise self._bad(name, v, f"an integer in [{low}, {high}]"
                            + (f" in steps of {step}" if step != 1 else ""))
        self.params[name] = v
        return v

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        v = self._value(name)
        if v is _UNSET:
            return low
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high):
            raise self._bad(name, v, f"a number in [{low:g}, {high:g}]")
        self.params[name] = float(v)
        return float(v)


def _arch_value(arch: ArchConfig, name: str) -> Any:
    """The value ``arch`` holds for the Optuna parameter ``name`` (``_UNSET`` when it has no
    such part: the comparison after the walk names the difference)."""
    head = arch.head
    top = {
        "backbone": arch.backbone.name if arch.backbone else "none",
        "conv": arch.stages[0].conv if arch.stages else _UNSET,
        "block": arch.stages[0].block if arch.stages else _UNSET,
        "num_stages": len(arch.stages),
        "head": tuple(h.width for h in head),
        "head_sparse": any(h.sparse for h in head),
        "head_density": head[0].density if head else _UNSET,
    }
    if name in top:
        return top[name]
    if name == "backbone_trainable":
        b = arch.backbone
        if b is None:
            return _UNSET
        if b.trainable in ("none", "all"):
            return b.trainable
        return f"stage{BACKBONE_STAGES[b.name].index(b.trainable)}"
    parts = name.split("/")
    if parts[0] == "stem":
        return _UNSET if arch.stem is None else getattr(arch.stem, parts[1])
    if parts[0] == "stages":
        i, field_name = int(parts[1]), parts[2]
        if i >= len(arch.stages):
            return _UNSET
        field_name = {"growth": "width", "downsample_dense": "downsample"}.get(field_name, field_name)
        return getattr(arch.stages[i], field_name)
    return getattr(arch, name, _UNSET)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def check_initial(spec: SearchSpec) -> None:
    """Check ``spec.search.initial`` against the space when the spec is read (SpecError).

    A network brings its own input shape and class count; a point of params alone is checked
    for names and ranges on a nominal 3x32x32, 10-class shape (its network is built, and the
    shapes checked, at ask time, when the sampler has filled in what it leaves open).
    """
    for point in spec.search.initial:
        one = dataclasses.replace(spec, search=dataclasses.replace(spec.search, initial=(point,)))
        arch = point.arch
        if arch is not None:
            SearchSpace(one, input_shape=(arch.in_channels, *arch.input_size),
                        num_classes=arch.num_classes)
        else:
            SearchSpace(one, input_shape=(3, 32, 32), num_classes=10)


def _suggest(trial: optuna.Trial, name: str, dim: Any) -> Any:
    """One value for ``dim``: searched dims are suggested on ``trial``, fixed ones returned."""
    if isinstance(dim, Choice):
        # Optuna's choices must be None/bool/int/float/str: lists (head widths) are encoded.
        encoded = [_encode(v) for v in dim.values]
        return dim.values[encoded.index(trial.suggest_categorical(name, encoded))]
    if isinstance(dim, IntRange):
        return trial.suggest_int(name, dim.lo, dim.hi, step=dim.step, log=dim.log)
    if isinstance(dim, FloatRange):
        return trial.suggest_float(name, dim.lo, dim.hi, log=dim.log)
    return dim


def _encode(v: Any) -> Any:
    if isinstance(v, tuple):
        return "-".join(map(str, v)) if v else "none"
    return v


def _without(dim: Any, value: Any) -> Any:
    """A choice without ``value`` (a fixed value when one remains)."""
    if not isinstance(dim, Choice):
        return dim
    rest = tuple(v for v in dim.values if v != value)
    return rest[0] if len(rest) == 1 else Choice(rest)


def _train_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(TrainConfig)}


def _train_needed(name: str, values: Mapping[str, Any], data_name: str) -> bool:
    if name == "crop_padding":
        return resolve_augment(values["augment"], data_name)[0]
    if name in _TRAIN_CONDITIONS:
        parent, needed = _TRAIN_CONDITIONS[name]
        return bool(needed(values[parent]))
    return True


def _nonzero_weights(m: torch.nn.Module) -> int:
    if isinstance(m, SparseLinear):
        return m.nonzero_weights
    return m.weight.numel()


def _delivered_params(screen: _Screen, train: TrainConfig) -> int:
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


def _scale_widths(arch: ArchConfig, s: float) -> ArchConfig:
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


# ---------------------------------------------------------------------- the proposer
def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """tpe: multivariate + group (conditional spaces) + constant liar (parallel asks)."""
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                multivariate=True, group=True, constant_liar=True, seed=seed
            )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"{name=} must be one of tpe, nsga2, random")


class Proposer:
    """The Optuna side of the search: asks feasible proposals, tells results.

    ``storage`` is a JournalStorage file (a resumed search keeps what the sampler learned) or
    None (in memory). Picklable: Ray pickles the searcher that holds it.
    """

    def __init__(
        self,
        space: SearchSpace,
        *,
        sampler: str = "tpe",
        seed: int = 0,
        storage: str | Path | None = None,
        study_name: str = "sparse-search",
        directions: Sequence[str] | None = None,
        max_rejects: int = 1000,
    ) -> None:
        if not (isinstance(max_rejects, int) and max_rejects >= 1):
            raise ValueError(f"{max_rejects=} must be an integer >= 1")
        self.space = space
        self.objectives = space.spec.objectives
        self.max_rejects = max_rejects
        self.seed = seed
        self.rejected = 0  # infeasible proposals told to Optuna by this proposer
        self.duplicates = 0  # proposals equal to an earlier trial's config, never trained twice
        # Optuna logs every study and trial at INFO; a search tells hundreds of rejected ones.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            storage=None if storage is None else JournalStorage(JournalFileBackend(str(storage))),
            study_name=study_name,
            directions=list(directions) if directions is not None else space.spec.directions,
            load_if_exists=True,
        )
        # Re-seed past the trials already stored, so a resumed study does not replay the
        # random start-up proposals it made before.
        stored = len(self.study.trials)
        self.study.sampler = make_sampler(sampler, seed + stored)
        if not stored:  # a new study: search.initial first (a resumed one has them stored)
            for point, params in zip(space.spec.search.initial, space.initial, strict=True):
                self.study.enqueue_trial(params, user_attrs={INITIAL: point.label})

    def ask(self) -> tuple[int, Proposal]:
        """The next feasible proposal and its Optuna trial number."""
        streak: list[Proposal] = []
        while True:
            self._queue_band()
            trial = self.study.ask()
            proposal = self.space.sample(trial)
            for key, value in self.space.constraint_values(proposal).items():
                trial.set_constraint(key, value)
            if proposal.feasible:
                key = config_key(proposal.config)
                earlier = self._earlier(key, trial.number)
                if earlier is None:
                    trial.set_user_attr(CONFIG_KEY, key)
                    label = trial.user_attrs.get(INITIAL)
                    if label is not None:
                        proposal = dataclasses.replace(proposal, initial=label)
                    return trial.number, proposal
                # Same config, same seeds: training it again would repeat the earlier result.
                self._tell_like(trial, earlier)
                self.duplicates += 1
            else:
                self.study.tell(trial, self._infeasible_values(proposal))
                self.rejected += 1
                self._retry_initial(trial)
            streak.append(proposal)
            if len(streak) >= self.max_rejects:
                message = self._too_many_rejects(streak)
                if all(p.feasible for p in streak):  # only repeats: every config was handed out
                    raise SpaceExhausted(message)
                raise SpecError(message)

    def _queue_band(self) -> None:
        """With ``fill_budget.bands`` > 1 and nothing queued (initial points go first): queue
        a fill fraction inside the band with the fewest trials handed out so far."""
        fill = self.space.spec.search.fill_budget
        if fill is None or fill.bands <= 1:
            return
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        cuts = bands.edges(fill.fraction, fill.bands)
        handed = [t.params[FILL_FRACTION] for t in trials
                  if CONFIG_KEY in t.user_attrs and FILL_FRACTION in t.params]
        # The band depends on the trials handed out only (a rejected proposal's retry stays
        # in its band); the value inside it on every trial asked (a retry draws a new one).
        band = bands.pick(bands.counts(handed, cuts), random.Random(f"{self.seed}/{len(handed)}"))
        value = bands.draw(fill.fraction, cuts, band, random.Random(f"{self.seed}/{len(trials)}"))
        self.study.enqueue_trial({FILL_FRACTION: value}, user_attrs={BAND: band})

    def _retry_initial(self, trial: optuna.Trial) -> None:
        """An initial point whose open values came out over budget is asked again (with fresh
        open values), up to ``INITIAL_TRIES`` times: the user asked for it to be trained."""
        label = trial.user_attrs.get(INITIAL)
        if label is None:
            return
        tries = trial.user_attrs.get(INITIAL_TRY, 1)
        if tries >= INITIAL_TRIES:
            log.warning("search.initial point %s: %d proposals with its values were over "
                        "budget; the search goes on without it", label, tries)
            return
        fixed = self.study.get_trials(deepcopy=False)[trial.number].system_attrs["fixed_params"]
        self.study.enqueue_trial(fixed, user_attrs={INITIAL: label, INITIAL_TRY: tries + 1})

    def _earlier(self, key: str, number: int) -> optuna.trial.FrozenTrial | None:
        """The earliest other trial handed out with this config key that did not fail (a failed
        one, or one a killed driver lost, may be tried again)."""
        for t in self.study.get_trials(deepcopy=False):
            if (t.number != number and t.state != TrialState.FAIL
                    and t.user_attrs.get(CONFIG_KEY) == key):
                return t
        return None

    def _tell_like(self, trial: optuna.Trial, earlier: optuna.trial.FrozenTrial) -> None:
        """A duplicate ends as its original did: its values when known, PRUNED, or FAIL for
        one still running (TPE's constant liar already imputes that one)."""
        trial.set_user_attr("duplicate_of", earlier.number)
        if earlier.state == TrialState.COMPLETE and earlier.values is not None:
            self.study.tell(trial, list(earlier.values))
        elif earlier.state == TrialState.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def tell(self, number: int, values: Mapping[str, float] | Sequence[float]) -> None:
        """A finished trial's objective values: a result dict (keyed by metric) or a sequence
        in objective order. Telling a trial twice is a no-op."""
        if isinstance(values, Mapping):
            values = [float(values[o.metric]) for o in self.objectives]
        self.study.tell(number, list(values), skip_if_finished=True)

    def tell_pruned(self, number: int) -> None:
        self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)

    def tell_failed(self, number: int) -> None:
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def _infeasible_values(self, proposal: Proposal) -> list[float]:
        # Infeasible trials are ranked by their violations, never by these values; they only
        # make the trial COMPLETE (NSGA-II's population holds complete trials only).
        known: dict[str, float] = {}
        if proposal.accounting is not None and proposal.screened_params is not None:
            known = {"nonzero_params": float(proposal.screened_params),
                     "macs": float(proposal.accounting.macs)}
        return [known.get(o.metric, _WORST[o.mode]) for o in self.objectives]

    def _too_many_rejects(self, streak: list[Proposal]) -> str:
        spec = self.space.spec
        counted = [p for p in streak if p.screened_params is not None and not p.feasible]
        invalid = [p for p in streak if p.error is not None]
        repeats = sum(p.feasible for p in streak)
        parts = [f"{spec.source}: {len(streak)} proposals in a row were infeasible or already "
                 f"tried (search.max_rejects={self.max_rejects})"]
        if repeats:
            parts.append(f"{repeats} repeated a config trained before: the space may hold fewer "
                         "distinct configs than search.num_samples (widen it or lower num_samples)")
        if counted:
            small = min(counted, key=lambda p: p.screened_params or 0)
            acc = small.accounting
            assert acc is not None
            parts.append(
                f"the smallest had {small.screened_params:,} params and {acc.macs:,} MACs "
                f"(constraints.max_params={spec.constraints.max_params}, "
                f"constraints.max_macs={spec.constraints.max_macs}): raise the budget or "
                "shrink the space (narrower stages, fewer layers, a smaller head)"
            )
        if invalid:
            parts.append(f"{len(invalid)} made no valid network, e.g. {invalid[-1].error}")
        return "; ".join(parts)


class SpaceExhausted(SpecError):
    """Every proposal of a long streak repeated a config already handed out: the space holds
    no more distinct configs (a dry run lists what it found; a search stops asking)."""


CONFIG_KEY = "config_key"  # Optuna user attr: the proposal's config_key, set when handed out
INITIAL = "initial"  # Optuna user attr of an enqueued search.initial point: its label
INITIAL_TRY = "initial_try"  # ... and which attempt at it (its open values were over budget)
INITIAL_TRIES = 20
BAND = "band"  # Optuna user attr: the fill_budget band a trial's fill fraction was drawn in
FILL_FRACTION = "fill_fraction"  # the Optuna param that fill_budget searches


def config_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a flat config (what the trainable receives, seeds included)."""
    text = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- dry run
@dataclass(frozen=True)
class DryRun:
    """What a search would propose, screened but never trained."""

    proposals: tuple[Proposal, ...]  # the feasible ones, in order
    rejected: int  # infeasible proposals skipped on the way
    ms_per_screen: float  # wall time per proposal (suggest + build + count), milliseconds
    asked: int = 0  # how many feasible configs were asked for
    exhausted: bool = False  # the space holds fewer distinct configs than asked: all are listed

    @property
    def feasible_fraction(self) -> float:
        total = len(self.proposals) + self.rejected
        return len(self.proposals) / total if total else 0.0

    def text(self) -> str:
        params = [p.screened_params or 0 for p in self.proposals]
        macs = [p.accounting.macs if p.accounting else 0 for p in self.proposals]
        lines = [
            f"{len(self.proposals)} feasible proposals, {self.rejected} rejected "
            f"(feasible fraction {self.feasible_fraction:.0%}), {self.ms_per_screen:.1f} ms "
            "per screen",
            "",
            "nonzero params (delivered):",
            text_histogram(params),
            "",
            "MACs:",
            text_histogram(macs),
            "",
            "first proposals:",
        ]
        if self.exhausted:
            lines[-1] = (f"the space holds only {len(self.proposals)} distinct configs (asked for "
                         f"{self.asked}); all of them:")
            lines += [f"  {p.screened_params:>10,}  {p.arch}" for p in self.proposals]
        else:
            lines += [f"  {p.screened_params:>10,}  {p.arch}" for p in self.proposals[:10]]
        return "\n".join(lines)


def dry_run(
    spec: SearchSpec, n: int, *, input_shape: Sequence[int], num_classes: int
) -> DryRun:
    """Sample ``n`` feasible configs with the spec's sampler (nothing is trained)."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"{n=} must be an integer >= 1")
    space = SearchSpace(spec, input_shape=input_shape, num_classes=num_classes)
    proposer = Proposer(space, sampler=spec.search.sampler, seed=spec.search.seed,
                        max_rejects=spec.search.max_rejects)
    start = time.perf_counter()
    found: list[Proposal] = []
    exhausted = False
    try:
        while len(found) < n:
            found.append(proposer.ask()[1])
    except SpaceExhausted:
        exhausted = True
    elapsed = time.perf_counter() - start
    asked = len(found) + proposer.rejected + proposer.duplicates
    return DryRun(tuple(found), proposer.rejected, 1000 * elapsed / max(1, asked), asked=n,
                  exhausted=exhausted)


def text_histogram(values: Sequence[float], *, bins: int = 8, width: int = 40) -> str:
    """Log-spaced bins of positive values as ``lo - hi | ##### count`` lines."""
    vals = [v for v in values if v > 0]
    if not vals:
        return "  (none)"
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    if hi == lo:
        return f"  {min(vals):>12,.0f} | {'#' * width} {len(vals)}"
    step = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(int((math.log10(v) - lo) / step), bins - 1)] += 1
    top = max(counts)
    return "\n".join(
        f"  {10 ** (lo + i * step):>12,.0f} - {10 ** (lo + (i + 1) * step):>12,.0f} | "
        f"{'#' * round(width * c / top)} {c}"
        for i, c in enumerate(counts)
    )
