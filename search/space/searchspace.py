"""A spec's space for one dataset shape: :class:`SearchSpace` turns one Optuna trial into a
:class:`Proposal` and screens it; :func:`check_initial` checks ``search.initial`` where a
search starts.

:meth:`SearchSpace.sample` suggests values in an order that expresses the conditionals (a
backbone skips stem and stages; densenet/sparsenet stages sample a growth rate and
compression, plain/residual ones a width; hidden head layers bring head sparsity, density, BN
and dropout; ``prune_rounds > 0`` brings ``prune_rate``), builds the ArchConfig and
TrainConfig and counts the network on the meta device (:mod:`search.space.screen`, cached here).

``search.initial`` (the points a search trains first) is read here too, into Optuna params
(:func:`initial_params`): each entry must come back unchanged and within budget, so the
space that samples is the one that checks. Ray pickles a SearchSpace inside the searcher,
as ``search.space.SearchSpace`` (:mod:`search.pickled`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import optuna

from search.pickled import public
from search.schema import METRICS, budget_fields
from search.space.screen import FILL_TOLERANCE, Screen, delivered_params, fill
from search.space.screen import screen as count
from search.space.suggest import (
    FILL_FRACTION,
    TRAIN_CONDITIONS,
    encode,
    suggest,
    train_defaults,
    train_needed,
    without,
)
from search.spec.dims import Choice, FloatRange, IntRange, possible_values, stage_value
from search.spec.model import AGGREGATING_BLOCKS, InitialPoint, SearchSpec, SpecError
from trainables.accounting import Accounting
from trainables.arch import (
    BACKBONE_STAGES,
    ArchConfig,
    BackboneConfig,
    HeadLayer,
    StageConfig,
    StemConfig,
)
from trainables.train import TrainConfig


def initial_params(space: SearchSpace, i: int, point: InitialPoint) -> dict[str, Any]:
    """The Optuna params that make ``space.sample`` propose ``point``.

    The point is walked through the same suggest calls as a sampled trial, so conditional
    parameters come out right and every value is checked against its distribution. An
    arch must come back unchanged: equal to the network the space builds from those
    values (fixed dims included), and left alone by the fill (its ``fill_fraction`` is
    chosen to put the target just above its own size).
    """
    where = f"{space.spec.source}: search.initial[{i}] ({point.label})"
    arch = point.arch
    if arch is not None:
        shape = (arch.in_channels, *arch.input_size)
        if shape != space.input_shape or arch.num_classes != space.num_classes:
            raise SpecError(
                f"{where}: the network takes {_shape(shape)} inputs in "
                f"{arch.num_classes} classes, the data has {_shape(space.input_shape)} "
                f"images in {space.num_classes}")
        clash = [k for k in point.params if not k.startswith("train/") and k != FILL_FRACTION]
        if clash:
            raise SpecError(f"{where}: {clash[0]} is given beside arch: give a whole "
                            "network or its parameters, not both")
    trial = FixedTrial(where, point.params, arch)
    arch_kw = space.suggest_arch(trial)
    train_kw = space.suggest_train(trial)
    fill = space.spec.search.fill_budget
    fraction = None
    if fill is not None:
        if arch is not None and FILL_FRACTION not in point.params:
            trial.fill = fill_fraction_for(space, arch, fill.fraction)
        fraction = suggest(trial, FILL_FRACTION, fill.fraction)
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
    screen = space.screen(built)
    acc = screen.accounting
    over = {k: v for k, v in space.violations(delivered_params(screen, train), acc).items()
            if v > 0}
    if over:
        units = {budget: METRICS[name].unit for budget, name in budget_fields().items()}
        raise SpecError(f"{where}: the network is over budget: " + "; ".join(
            f"{v:+,.0f} {units[k]} over constraints.{k}" for k, v in over.items())
            + " (pruning rounds, if the point sets train/prune_rounds, are counted)")
    if fraction is not None and FILL_FRACTION not in point.params:
        assert space.spec.constraints.max_params is not None
        filled = space.fill(built, train, fraction * space.spec.constraints.max_params)
        if filled != built:
            got = delivered_params(space.screen(filled), train)
            raise SpecError(
                f"{where}: search.fill_budget would scale it to {got:,} params "
                f"(fill_fraction {fraction:.3g} of max_params): its own size is outside "
                "the fill range; give fill_fraction to accept that")
    return trial.params

def fill_fraction_for(space: SearchSpace, arch: ArchConfig, dim: Any) -> float | None:
    """The fill fraction whose target sits just above ``arch``'s own (dense) size; None
    when the fraction is fixed (the check after the fill says whether it fits)."""
    assert space.spec.constraints.max_params is not None
    own = space.screen(arch).accounting.nonzero_params
    want = own / (space.spec.constraints.max_params * (1 + FILL_TOLERANCE) / 2)
    if isinstance(dim, FloatRange):
        return min(max(want, dim.lo), dim.hi)
    if isinstance(dim, Choice):
        above = [v for v in dim.values if v >= want]
        return min(above) if above else max(dim.values)
    return None


_UNSET = object()


class FixedTrial:
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
        enc = encode(tuple(v) if isinstance(v, list) else v)
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


__all__ = ["Proposal", "SearchSpace", "check_initial"]

# Budget screens kept per SearchSpace (an Optuna study re-proposes the same shapes often).
_CACHE_SIZE = 4096


@public("search.space")
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
    parent: int | None = None  # a lamarckian child's parent (its Optuna trial number)

    @property
    def deploy_params(self) -> int | None:
        """Every param the delivered model ships: its nonzeros + a frozen trunk's weights."""
        if self.screened_params is None or self.accounting is None:
            return None
        return self.screened_params + self.accounting.frozen_params


@public("search.space")
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
        self._cache: dict[ArchConfig, Screen] = {}
        # search.initial as Optuna params, for Study.enqueue_trial (checked here: a point
        # outside the space fails before anything trains).
        self.initial: tuple[dict[str, Any], ...] = tuple(
            initial_params(self, i, p) for i, p in enumerate(spec.search.initial))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}  # screens are cheap to redo, big to ship

    # ------------------------------------------------------------------ sampling
    def sample(self, trial: optuna.Trial) -> Proposal:
        """Suggest one configuration on ``trial`` and screen it (never trains anything)."""
        arch_kw = self.suggest_arch(trial)
        train_kw = self.suggest_train(trial)
        fill = self.spec.search.fill_budget
        fraction = suggest(trial, FILL_FRACTION, fill.fraction) if fill is not None else None
        try:
            train = TrainConfig(**train_kw)
            arch = ArchConfig(**arch_kw)
            if fraction is not None:
                arch = self.fill(arch, train, fraction * self.spec.constraints.max_params)
            screen = self.screen(arch)
        except ValueError as e:  # ArchError, TrainConfigError: values that make no network
            return Proposal(None, None, None, {}, None, False, {"valid": 1.0},
                            dict(trial.params), str(e))
        screened = delivered_params(screen, train)
        violations = self.violations(screened, screen.accounting)
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
        c = self.spec.constraints
        limits = {field: getattr(c, field) for field in budget_fields()}
        out = {k: v / limits[k] for k, v in proposal.violations.items() if k in limits}
        out["valid"] = proposal.violations.get("valid", 0.0)
        return out

    def violations(self, params: int, acc: Accounting) -> dict[str, float]:
        """Excess over each budget that is set (<= 0: within it), in the budget's units.
        ``params``: the delivered model's nonzero params (after its pruning rounds); the rest
        is ``acc``'s count of the unpruned net."""
        c = self.spec.constraints
        values = {"max_params": params, "max_deploy_params": params + acc.frozen_params,
                  "max_macs": acc.macs, "max_flash_bytes": acc.flash_bytes,
                  "max_sram_bytes": acc.sram_bytes}
        return {field: float(values[field] - limit) for field in budget_fields()
                if (limit := getattr(c, field)) is not None and values.get(field) is not None}

    def suggest_arch(self, trial: optuna.Trial) -> dict[str, Any]:
        s = self.spec.space
        c, h, w = self.input_shape
        kw: dict[str, Any] = {"in_channels": c, "input_size": (h, w),
                              "num_classes": self.num_classes}
        backbone = suggest(trial, "backbone", s.backbone)
        if backbone != "none":
            token = suggest(trial, "backbone_trainable", s.backbone_trainable)
            stages = BACKBONE_STAGES[backbone]
            trainable = token if token in ("none", "all") else stages[int(token[-1])]
            kw.update(stem=None, stages=(), backbone=BackboneConfig(
                name=backbone, trainable=trainable, weights=s.backbone_weights))
        else:
            conv = suggest(trial, "conv", s.conv)
            block = suggest(trial, "block", s.block)
            kw["stem"] = None if s.stem is None else StemConfig(**{
                f.name: suggest(trial, f"stem/{f.name}", getattr(s.stem, f.name))
                for f in fields(s.stem)
            })
            n = suggest(trial, "num_stages", s.num_stages)
            kw["stages"] = tuple(self._suggest_stage(trial, i, block, conv) for i in range(n))
            kw["batch_norm"] = suggest(trial, "batch_norm", s.batch_norm)
        if kw.get("stages"):
            kw["final_bn_act"] = suggest(trial, "final_bn_act", s.final_bn_act)
        for name in ("activation", "dropout", "pooling"):
            kw[name] = suggest(trial, name, getattr(s, name))
        widths = suggest(trial, "head", s.head)
        if widths:
            sparse = suggest(trial, "head_sparse", s.head_sparse)
            density = suggest(trial, "head_density", s.head_density) if sparse else 1.0
            kw["head"] = tuple(HeadLayer(width=wd, density=density) for wd in widths)
            kw["head_batch_norm"] = suggest(trial, "head_batch_norm", s.head_batch_norm)
            kw["head_dropout"] = suggest(trial, "head_dropout", s.head_dropout)
            if sparse:
                kw["mask_seed"] = suggest(trial, "mask_seed", s.mask_seed)
        return kw

    def _suggest_stage(self, trial: optuna.Trial, i: int, block: str, conv: str) -> StageConfig:
        st = self.spec.space.stages
        p = f"stages/{i}/"
        dense = block in AGGREGATING_BLOCKS
        kw: dict[str, Any] = {"block": block, "conv": conv}
        if dense:
            kw["width"] = suggest(trial, p + "growth", stage_value(st.growth, i))
            kw["compression"] = suggest(trial, p + "compression", stage_value(st.compression, i))
            # Aggregating stages concatenate same-size maps: stride is not an option, and a
            # different choice set needs its own parameter name in Optuna.
            down = without(stage_value(st.downsample, i), "stride")
            kw["downsample"] = suggest(trial, p + "downsample_dense", down)
        else:
            kw["width"] = suggest(trial, p + "width", stage_value(st.width, i))
            kw["downsample"] = suggest(trial, p + "downsample", stage_value(st.downsample, i))
        for name in ("layers", "kernel", "bias"):
            kw[name] = suggest(trial, p + name, stage_value(getattr(st, name), i))
        if dense:  # the published forms (defaults: today's)
            for name in ("order", "transition", "bottleneck"):
                kw[name] = suggest(trial, p + name, stage_value(getattr(st, name), i))
            if kw["transition"] == "never":
                kw["compression"] = 1.0  # compression is the transition's
        elif block == "residual":
            kw["shortcut_bn"] = suggest(trial, p + "shortcut_bn", stage_value(st.shortcut_bn, i))
        if block == "plain":
            kw["padding"] = suggest(trial, p + "padding", stage_value(st.padding, i))
        else:
            kw["padding"] = "same"  # skips and concatenations need HxW kept
        return StageConfig(**kw)

    def suggest_train(self, trial: optuna.Trial) -> dict[str, Any]:
        dims = self.spec.train
        kw: dict[str, Any] = {}
        parents = {parent for parent, _ in TRAIN_CONDITIONS.values()} | {"augment"}
        order = [f.name for f in fields(TrainConfig)]
        for name in sorted(dims, key=lambda n: (n not in parents, order.index(n))):
            dim = dims[name]
            if not train_needed(name, {**train_defaults(), **kw}, self.spec.data.name):
                if not isinstance(dim, (Choice, IntRange, FloatRange)):
                    kw[name] = dim  # fixed values pass through (they cost nothing)
                continue
            kw[name] = suggest(trial, f"train/{name}", dim)
        kw.setdefault("int8_eval", self.spec.int8_eval())  # left out: on for deployment searches
        return kw


    # ------------------------------------------------------------------ screening
    def screen(self, arch: ArchConfig) -> Screen:
        """Counts of ``arch`` built once on the meta device (milliseconds, no weights)."""
        hit = self._cache.get(arch)
        if hit is not None:
            return hit
        screen = count(arch)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[arch] = screen
        return screen

    def fill(self, arch: ArchConfig, train: TrainConfig, target: float) -> ArchConfig:
        """``arch`` with every width scaled so its delivered params land just under
        ``target`` (:func:`search.space.screen.fill`, on this space's cached screens)."""
        return fill(arch, train, target, self.screen)


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
