"""``search.initial``: the points a search trains first, as Optuna params.

:func:`initial_params` walks a point through the same suggest calls as a sampled trial (on a
:class:`FixedTrial` that answers with the point's values), so conditional parameters come
out right and every value is checked against its distribution; a whole network must come
back unchanged and within budget. :class:`search.space.searchspace.SearchSpace` calls it for each
point when it is built; :func:`search.space.searchspace.check_initial` runs it where a search
starts (``preflight``, ``dry_run``), before anything is created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from search.schema import METRICS, budget_fields
from search.space.screen import FILL_TOLERANCE, delivered_params
from search.space.suggest import FILL_FRACTION, encode, suggest
from search.spec.dims import Choice, FloatRange
from search.spec.model import InitialPoint, SpecError
from trainables.arch import BACKBONE_STAGES, ArchConfig
from trainables.train import TrainConfig

if TYPE_CHECKING:
    from search.space.searchspace import SearchSpace

__all__ = ["FixedTrial", "fill_fraction_for", "initial_params"]


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
    over = {k: v for k, v in space.violations(delivered_params(screen, train), acc.macs,
                                              flash=acc.flash_bytes, sram=acc.sram_bytes).items()
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
