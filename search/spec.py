"""Search spec: one YAML file -> a validated, frozen :class:`SearchSpec`.

A spec says what to search (``space``, ``train``), on which data (``data``), for which goals
(``objectives``, ``constraints``) and how (``search``, ``resources``). Every section is
optional except ``data``; omitted values take the defaults shown here::

    name: cifar10-1m                  # default: the file name without .yaml
    data: {name: cifar10, path: data/cifar10.npz, val_fraction: 0.1}   # trainables.data.DataConfig
    objectives: {val_accuracy: max, nonzero_params: min}   # optional: macs: min (or val_loss: min)
    constraints: {max_params: 1000000, max_macs: null}      # hard budgets, screened before training
    search:
      sampler: tpe                    # tpe | nsga2 | random
      num_samples: 20                 # trials to train (over-budget proposals do not count)
      max_concurrent: 1               # trials training at once
      seed: 0
      max_failures: 0                 # retries of a crashed trial (Ray's FailureConfig)
      max_rejects: 1000               # over-budget proposals in a row before giving up
      early_stopping: null            # or {scheduler: moasha | asha, grace_epochs: 1, reduction_factor: 3}
      fill_budget: null               # or {fraction: 0.9} / {fraction: {float: [0.3, 1.0]}, bands: 4}
      time_budget: null               # or 45m, 2h, 3600: no trial starts that would end later
      initial: []                     # trained first: arch files, {arch: ..., train/lr: ...}, params
    resources: {cpu: 1, gpu: 0}       # per trial; fractions allowed (gpu: 0.25); or auto (planned
                                      # from the cluster: GPUs where present, else the CPUs)
    train:                            # trainables.train.TrainConfig fields, fixed or searched
      epochs: 10
      lr: {float: [0.001, 0.1], log: true}
      prune_rounds: {choice: [0, 1, 2]}
      prune_rate: {float: [0.2, 0.6]}  # sampled only when prune_rounds > 0
    space:                            # the network (see ArchSpace below for every key)
      block: {choice: [plain, residual, densenet, sparsenet]}
      num_stages: {int: [1, 3]}
      stages: {width: {int: [16, 128], log: true}, layers: {int: [1, 3]}}
      head: {choice: [[], [128], [512, 128]]}

**Searched values.** Wherever a value is expected, a one-key mapping searches it instead:
``{choice: [a, b, ...]}``, ``{int: [lo, hi], step: 1, log: false}`` (bounds inclusive) or
``{float: [lo, hi], log: false}``. Anything else is a fixed value. ``int`` is for integer
fields and ``float`` for real-valued ones; ``choice`` works everywhere.

**Per-stage values.** Each key under ``space.stages`` is one value for every stage (searched
independently per stage when it is a searched value) or a list with one value per stage, e.g.
``width: [16, {int: [16, 64]}, {int: [32, 128]}]``; the list must cover the most stages
``num_stages`` allows.

**Conditionals** follow from the network, so a trial only holds the values that matter:
stem and stages only without a backbone; ``stages.width`` for plain/residual stages and
``stages.growth`` + ``stages.compression`` for densenet/sparsenet ones (whose ``downsample``
choices drop ``stride``, they concatenate same-size maps); ``stages.padding`` only for plain
stages (the others keep ``same``); the head's ``head_sparse``, ``head_density`` (only when sparse),
``head_batch_norm``, ``head_dropout`` only with hidden head layers; ``train.prune_rate`` /
``prune_scope`` / ``rewind_epoch`` only when ``prune_rounds > 0``; ``train.nesterov`` only for
``optimizer: sgd``; ``train.crop_padding`` only when the augmentation crops. Input shape and
class count come from the data.

**Errors** are one :class:`SpecError` naming the file, the field path, the value and what is
allowed, e.g. ``spaces/x.yaml: space.stages.width.int[1]=-3 is invalid: expected an integer
>= 1``; unknown keys suggest the closest known one; YAML syntax errors give ``file:line:col``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from trainables.arch import (
    ACTIVATIONS,
    BACKBONES,
    BLOCK_TYPES,
    CONV_TYPES,
    POOLINGS,
    ArchConfig,
    ArchError,
    HeadLayer,
    StageConfig,
    StemConfig,
)
from trainables.data import DataConfig
from trainables.train import TrainConfig

FLAT_PREFIX = "spec"
SAMPLERS = ("tpe", "nsga2", "random")
SCHEDULERS = ("asha", "moasha")
# Metrics a trial reports that can be objectives, with the only sensible direction of each.
OBJECTIVE_MODES: dict[str, str] = {
    "val_accuracy": "max",
    "val_loss": "min",
    "nonzero_params": "min",
    "macs": "min",
}
TRAINED_METRICS = ("val_accuracy", "val_loss")
DEFAULT_OBJECTIVES = (("val_accuracy", "max"), ("nonzero_params", "min"))
AGGREGATING_BLOCKS = ("densenet", "sparsenet")
MAX_STAGES = 16
# Backbone stage tokens: portable across backbones ("stage3" is resnet18's layer3 and
# densenet121's denseblock3), so one searched choice serves both.
BACKBONE_TRAINABLE = ("none", "stage1", "stage2", "stage3", "stage4", "all")
_SECTIONS = ("name", "data", "objectives", "constraints", "search", "resources", "train", "space")


class SpecError(ValueError):
    """An invalid search spec; the message names the file, field path, value and what is allowed."""


# ---------------------------------------------------------------------- searched values
@dataclass(frozen=True)
class Choice:
    """``{choice: [...]}``: one of the listed values (lists are kept as tuples)."""

    values: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"choice": [_plain(v) for v in self.values]}


@dataclass(frozen=True)
class IntRange:
    """``{int: [lo, hi], step: s, log: bool}``: an integer in [lo, hi] (inclusive)."""

    lo: int
    hi: int
    step: int = 1
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"int": [self.lo, self.hi]}
        if self.step != 1:
            d["step"] = self.step
        if self.log:
            d["log"] = True
        return d


@dataclass(frozen=True)
class FloatRange:
    """``{float: [lo, hi], log: bool}``: a real number in [lo, hi]."""

    lo: float
    hi: float
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"float": [self.lo, self.hi]}
        if self.log:
            d["log"] = True
        return d


SEARCHED = (Choice, IntRange, FloatRange)


def is_searched(value: Any) -> bool:
    return isinstance(value, SEARCHED)


def possible_values(value: Any) -> tuple[Any, ...]:
    """The values a dimension can take when it is fixed or a choice (ranges: both bounds)."""
    if isinstance(value, Choice):
        return value.values
    if isinstance(value, (IntRange, FloatRange)):
        return (value.lo, value.hi)
    return (value,)


# ---------------------------------------------------------------------- spec sections
@dataclass(frozen=True)
class Objective:
    metric: str  # a metric every trial reports (see OBJECTIVE_MODES)
    mode: str  # max | min

    @property
    def direction(self) -> str:
        """Optuna's spelling."""
        return "maximize" if self.mode == "max" else "minimize"


@dataclass(frozen=True)
class Constraints:
    max_params: int | None = None  # nonzero trainable params of the delivered (pruned) model
    max_macs: int | None = None  # dense conv + linear multiply-accumulates per image


@dataclass(frozen=True)
class EarlyStopping:
    # moasha: search.moasha, ranks a rung by Pareto dominance over every objective;
    # asha: Ray's AsyncHyperBandScheduler, by the trained objective alone (it cuts small nets)
    scheduler: str = "moasha"
    grace_epochs: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung


@dataclass(frozen=True)
class FillBudget:
    """Scale every width of a sampled shape so its params land at ``fraction`` of max_params."""

    fraction: Any = 0.9  # fixed in (0, 1] or searched ({float: [lo, hi]} / {choice: [...]})
    # > 1: split a searched {float: [lo, hi]} fraction into this many equal bands (equal in
    # log space when log: true) and give each trial the band with the fewest trials so far,
    # so every size range of the front gets its share of trials whatever the sampler favours.
    bands: int = 1


@dataclass(frozen=True)
class InitialPoint:
    """One configuration the search trains before the sampler's own proposals
    (``search.initial``): a known network to start the front from, as Ray Tune's
    ``points_to_evaluate`` and Optuna's ``enqueue_trial`` do.

    ``arch`` is a whole network (an arch file, loaded when the spec is read, or inline);
    ``params`` are Optuna parameter names as ``dry-run`` and the Optuna journal show them
    (``train/lr``, ``fill_fraction``, ``stages/0/width``, ...). What neither fixes is sampled.
    """

    arch: ArchConfig | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""  # for messages: the arch file's path, or initial[i]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label}
        if self.arch is not None:
            d["arch"] = self.arch.to_dict()
        return {**d, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}}


@dataclass(frozen=True)
class SearchSettings:
    sampler: str = "tpe"  # tpe (multivariate, constant liar) | nsga2 | random
    num_samples: int = 20  # trials to train; over-budget proposals never count
    max_concurrent: int = 1  # trials in flight at once
    seed: int = 0  # seeds the sampler (and nothing else)
    max_failures: int = 0  # retries of a crashed trial (Ray's FailureConfig.max_failures)
    max_rejects: int = 1000  # infeasible proposals in a row before the search gives up
    early_stopping: EarlyStopping | None = None
    fill_budget: FillBudget | None = None
    # Wall seconds for the whole search, from the command's start (resumes add theirs): no trial
    # starts once it is spent, nor one the median finished trial says would not end in what
    # is left. None: no limit.
    time_budget: float | None = None
    # Trained first, in order, before the sampler proposes anything (counted in num_samples).
    initial: tuple[InitialPoint, ...] = ()


@dataclass(frozen=True)
class Resources:
    """Per-trial resources. ``auto``: planned at start from what the cluster has (see
    :mod:`search.resources`): GPU trials at ``gpu`` per trial (and up to ``cpu`` CPUs) where a
    node has GPUs, CPU-only trials sharing the CPUs otherwise. YAML: ``resources: auto`` or
    ``{auto: true, cpu: 4, gpu: 0.25}``."""

    cpu: float = 1.0  # CPU cores per trial (fractions allowed); with auto: the most per GPU trial
    gpu: float = 0.0  # GPUs per trial (0.25 packs four trials on one GPU); with auto: the share
    # of one trial where GPUs exist (> 0)
    custom: dict[str, float] = field(default_factory=dict)  # Ray custom resources per trial
    auto: bool = False  # plan cpu/gpu from the cluster at start (the shipped headline spaces)


@dataclass(frozen=True)
class StemSpace:
    """``space.stem``: the first conv (``null`` for none). Fields as in ArchConfig's StemConfig."""

    width: Any = 32
    kernel: Any = 3
    stride: Any = 1
    conv: Any = "standard"
    bias: Any = True
    bn_act: Any = True  # false: a bare conv (pre-activation stages start with BN -> act)


@dataclass(frozen=True)
class StagesSpace:
    """``space.stages``: per-stage values (one for all stages, or a list with one per stage)."""

    width: Any = 32  # output channels of a plain/residual stage
    growth: Any = 12  # growth rate k of a densenet/sparsenet stage (channels per layer)
    layers: Any = 1
    kernel: Any = 3
    downsample: Any = "none"  # none | stride | maxpool | avgpool (dense stages: not stride)
    compression: Any = 1.0  # densenet/sparsenet only: 1x1 transition to this share of channels
    bias: Any = True
    padding: Any = "same"  # same | valid (plain stages only; the others keep same)
    # The published forms; defaults = the forms every front so far was measured with.
    order: Any = "post"  # densenet/sparsenet: post (conv -> BN -> act) | pre (BN -> act -> conv)
    transition: Any = "auto"  # densenet/sparsenet: auto (when compression < 1) | always | never
    bottleneck: Any = 0  # densenet/sparsenet: 0 | b (1x1 conv to b * growth first; BC: 4)
    shortcut_bn: Any = True  # residual: BN on the 1x1 projection shortcut (false: Keras ResNet v1)


@dataclass(frozen=True)
class ArchSpace:
    """``space``: every ArchConfig dimension, fixed or searched."""

    backbone: Any = "none"  # none | resnet18 | densenet121; a backbone replaces stem + stages
    backbone_trainable: Any = "none"  # none | stage1..stage4 | all (which trunk part trains)
    backbone_weights: str | None = None  # a local state_dict file; null: torchvision's cache
    stem: StemSpace | None = field(default_factory=StemSpace)
    num_stages: Any = 1
    block: Any = "plain"  # plain | residual | densenet | sparsenet (all stages alike)
    conv: Any = "standard"  # standard | separable (all stages alike; the stem has its own)
    stages: StagesSpace = field(default_factory=StagesSpace)
    batch_norm: Any = True
    activation: Any = "relu"
    dropout: Any = 0.0
    pooling: Any = "gap"
    head: Any = ()  # hidden head widths, e.g. [512, 128]; searched: {choice: [[], [128], ...]}
    head_sparse: Any = False  # hidden head layers randomly sparse (fixed seeded masks)
    head_density: Any = 0.5  # share of weights kept in a sparse head layer
    head_batch_norm: Any = False
    head_dropout: Any = 0.0
    mask_seed: Any = 0
    final_bn_act: Any = False  # BN -> act before pooling (pre-activation nets end so)


@dataclass(frozen=True)
class SearchSpec:
    """A whole, validated search. ``train`` maps TrainConfig field -> fixed or searched value."""

    name: str
    data: DataConfig
    objectives: tuple[Objective, ...] = tuple(Objective(m, s) for m, s in DEFAULT_OBJECTIVES)
    constraints: Constraints = field(default_factory=Constraints)
    search: SearchSettings = field(default_factory=SearchSettings)
    resources: Resources = field(default_factory=Resources)
    train: dict[str, Any] = field(default_factory=dict)
    space: ArchSpace = field(default_factory=ArchSpace)
    source: str = field(default="<spec>", compare=False)  # the file it came from (for errors)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML-able data; ``parse_spec(to_dict())`` gives it back."""
        return {
            "name": self.name,
            "data": {f.name: getattr(self.data, f.name) for f in fields(self.data)},
            "objectives": {o.metric: o.mode for o in self.objectives},
            "constraints": _section_dict(self.constraints),
            "search": _section_dict(self.search),
            "resources": _section_dict(self.resources),
            "train": {k: _plain(v) for k, v in self.train.items()},
            "space": _section_dict(self.space),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_flat(self, prefix: str = FLAT_PREFIX) -> dict[str, Any]:
        """Scalars keyed like ``spec/search/num_samples`` (MLflow params); searched values and
        lists become compact strings (``{int: [16, 128], log: true}``)."""
        out: dict[str, Any] = {}

        def walk(key: str, v: Any) -> None:
            if isinstance(v, Mapping) and not _searched_dict(v):
                if not v:
                    out[key] = "{}"
                for k, sub in v.items():
                    walk(f"{key}/{k}", sub)
            elif isinstance(v, (Mapping, list)):
                out[key] = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
            else:
                out[key] = v

        for k, v in self.to_dict().items():
            walk(f"{prefix}/{k}", v)
        return out


def _searched_dict(d: Mapping[str, Any]) -> bool:
    return any(k in d for k in ("choice", "int", "float"))


def _plain(v: Any) -> Any:
    """Searched values, dataclasses and tuples as plain YAML data (a class with its own
    ``to_dict``, a searched value or an initial point, says how it is written)."""
    if is_searched(v) or isinstance(v, InitialPoint):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _section_dict(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def _section_dict(section: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(section, f.name)) for f in fields(section)}


# ---------------------------------------------------------------------- loading
def load_spec(path: str | Path, **overrides: Any) -> SearchSpec:
    """Read and validate a spec file; ``overrides`` (CLI flags: the keyword arguments of
    :func:`parse_spec`) replace the file's values."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{p}: cannot read the search spec ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}): expected a YAML search spec") from None
    if "\x00" in text:
        raise SpecError(f"{p}: holds NUL bytes (a binary file?): expected a YAML search spec")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{where}: invalid YAML: {problem}") from None
    return parse_spec({} if data is None else data, source=str(p), **overrides)


def parse_spec(
    data: Any,
    *,
    source: str = "<spec>",
    num_samples: int | None = None,
    max_params: int | None = None,
    seed: int | None = None,
    data_path: str | None = None,
    time_budget: str | float | None = None,
) -> SearchSpec:
    """Validate already-parsed YAML data (a mapping) into a :class:`SearchSpec`."""
    r = _Reader(source)
    d = r.mapping(data, "", _SECTIONS)
    if d.get("data") is None:
        r.fail("data", "is missing: expected a mapping of DataConfig fields, e.g. {name: digits}")
    if data_path is not None:  # --data-path: the same space on data kept elsewhere
        d["data"] = {**r.mapping(d["data"], "data", [f.name for f in dataclasses.fields(DataConfig)]),
                     "path": str(data_path)}
    name = d.get("name", Path(source).stem if source != "<spec>" else "search")
    if not (isinstance(name, str) and name.strip()):
        r.invalid("name", name, "a non-empty string")
    constraints = _constraints(r, d.get("constraints", {}))
    settings = _search_settings(r, d.get("search", {}))
    overrides = {"search.num_samples": num_samples, "constraints.max_params": max_params,
                 "search.seed": seed}
    for where, v in overrides.items():
        if v is None:
            continue
        ok = _is_int(v) and (v >= 0 if where == "search.seed" else v > 0)
        if not ok:
            bound = ">= 0" if where == "search.seed" else "> 0"
            r.fail(where, f"={v!r} (command-line override) is invalid: expected an integer {bound}")
    if num_samples is not None:
        settings = dataclasses.replace(settings, num_samples=num_samples)
    if seed is not None:
        settings = dataclasses.replace(settings, seed=seed)
    if max_params is not None:
        constraints = dataclasses.replace(constraints, max_params=max_params)
    if time_budget is not None:
        seconds = parse_duration(time_budget)
        if seconds is None:
            r.fail("search.time_budget", f"={time_budget!r} (command-line override) is invalid: "
                   f"expected {DURATION}")
        settings = dataclasses.replace(settings, time_budget=seconds)
    if settings.fill_budget is not None and constraints.max_params is None:
        r.fail("search.fill_budget", "needs a budget: set constraints.max_params (or --max-params)")
    if len(settings.initial) > settings.num_samples:
        r.fail("search.initial", f"holds {len(settings.initial)} points, more than "
               f"search.num_samples={settings.num_samples} trials: drop some or raise num_samples")
    spec = SearchSpec(
        name=name,
        data=_data(r, d["data"]),
        objectives=_objectives(r, d.get("objectives")),
        constraints=constraints,
        search=settings,
        resources=_resources(r, d.get("resources", {})),
        train=_train(r, d.get("train", {})),
        space=_arch_space(r, d.get("space", {})),
        source=source,
    )
    if spec.search.initial:
        from search.space import check_initial  # search.space builds on this module

        check_initial(spec)  # against the space now, not after Ray has started
    return spec


class _Reader:
    """Validation helpers that raise one SpecError prefixed with the file name."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        sep = "" if message.startswith("=") else " "
        raise SpecError(f"{self.source}: {path or '<top level>'}{sep}{message}")

    def invalid(self, path: str, value: Any, allowed: str) -> NoReturn:
        hint = ""
        if isinstance(value, str) and _parses_as_float(value):
            # YAML 1.1 (PyYAML) reads 1e-5 and 1e6 as strings: only 1.0e-5 is a float.
            hint = " (YAML reads it as text: write 0.00001 / 1000000, or 1.0e-5)"
        self.fail(path, f"={value!r} is invalid: expected {allowed}{hint}")

    def mapping(self, d: Any, path: str, known: Sequence[str]) -> dict[str, Any]:
        """``d`` as a dict whose keys are all in ``known`` (else the closest key is suggested)."""
        if d is None:
            return {}
        if not isinstance(d, Mapping):
            self.invalid(path, d, "a mapping of " + ", ".join(known))
        for k in d:
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                hint = f": did you mean {close[0]!r}?" if close else ""
                self.fail(f"{path}.{k}" if path else str(k),
                          f"is not a known key{hint} (expected one of {', '.join(known)})")
        return dict(d)

    def dataclass(self, cls: type, d: Any, path: str, checks: Mapping[str, Callable[[Any], str | None]]) -> Any:
        """An instance of the flat section dataclass ``cls``; ``checks`` return what is allowed."""
        names = [f.name for f in fields(cls)]
        kw = self.mapping(d, path, names)
        for k, v in kw.items():
            allowed = checks[k](v)
            if allowed is not None:
                self.invalid(f"{path}.{k}", v, allowed)
        return cls(**kw)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_check(lo: int, *, nullable: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if (v is None and nullable) or (_is_int(v) and v >= lo):
            return None
        return f"an integer >= {lo}" + (" or null" if nullable else "")

    return check


def _number_check(lo: float, *, lo_open: bool) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if _is_number(v) and (v > lo if lo_open else v >= lo):
            return None
        return f"a number {'>' if lo_open else '>='} {lo}"

    return check


def _one_of(choices: Sequence[Any]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = any(v == c and type(v) is type(c) for c in choices)
        return None if ok else "one of " + ", ".join(map(str, choices))

    return check


def _constraints(r: _Reader, d: Any) -> Constraints:
    return r.dataclass(Constraints, d, "constraints", {
        "max_params": _int_check(1, nullable=True),
        "max_macs": _int_check(1, nullable=True),
    })


def parse_duration(v: Any) -> float | None:
    """Seconds from a number of seconds or a string like ``90s``, ``45m``, ``1.5h``; None for
    anything else (the caller names the field)."""
    if _is_number(v):
        return float(v) if v > 0 else None
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", v)
        if m:
            seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
            return seconds if seconds > 0 else None
    return None


DURATION = "a positive duration: seconds, or a string like 90s, 45m, 1.5h"


def _search_settings(r: _Reader, d: Any) -> SearchSettings:
    kw = r.mapping(d, "search", [f.name for f in fields(SearchSettings)])
    early, fill = kw.pop("early_stopping", None), kw.pop("fill_budget", None)
    initial = _initial(r, kw.pop("initial", None))
    plain = r.dataclass(SearchSettings, kw, "search", {
        "sampler": _one_of(SAMPLERS),
        "num_samples": _int_check(1),
        "max_concurrent": _int_check(1),
        "seed": _int_check(0),
        "max_failures": _int_check(0),
        "max_rejects": _int_check(1),
        "time_budget": lambda v: None if v is None or parse_duration(v) is not None else DURATION,
    })
    if plain.time_budget is not None:
        plain = dataclasses.replace(plain, time_budget=parse_duration(plain.time_budget))
    if early is not None:
        early = r.dataclass(EarlyStopping, early, "search.early_stopping", {
            "scheduler": _one_of(SCHEDULERS),
            "grace_epochs": _int_check(1),
            "reduction_factor": lambda v: None if _is_number(v) and v > 1 else "a number > 1",
        })
    if fill is not None:
        fd = r.mapping(fill, "search.fill_budget", ["fraction", "bands"])
        if "fraction" in fd:
            frac = _dim(r, fd["fraction"], "search.fill_budget.fraction", "float",
                        lambda v: None if _is_number(v) and 0 < v <= 1 else "a number in (0, 1]")
            fd["fraction"] = frac
        if "bands" in fd:
            allowed = _int_check(1)(fd["bands"])
            if allowed is not None:
                r.invalid("search.fill_budget.bands", fd["bands"], allowed)
        fill = FillBudget(**fd)
        if fill.bands > 1 and not isinstance(fill.fraction, FloatRange):
            r.fail("search.fill_budget.bands", f"={fill.bands} needs a searched fraction to split "
                   f"({{float: [lo, hi]}}), but fraction is {_plain(fill.fraction)!r}: drop bands "
                   "or search the fraction")
    return dataclasses.replace(plain, early_stopping=early, fill_budget=fill, initial=initial)


INITIAL_ENTRY = ("an architecture file, or a mapping of arch (a file or an inline network), "
                 "label and Optuna parameter names (train/lr, fill_fraction, stages/0/width, ...)")


def _initial(r: _Reader, v: Any) -> tuple[InitialPoint, ...]:
    """search.initial: arch files are read now (a resumed or submitted search gets the spec
    back from ``to_yaml``, which holds the networks inline, not the paths)."""
    if v is None:
        return ()
    if not isinstance(v, list):
        r.invalid("search.initial", v, f"a list; each entry {INITIAL_ENTRY}")
    out = []
    for i, entry in enumerate(v):
        path = f"search.initial[{i}]"
        arch_path = path if isinstance(entry, str) else f"{path}.arch"
        if isinstance(entry, str):
            entry = {"arch": entry}
        if not isinstance(entry, Mapping) or not entry:
            r.invalid(path, entry, INITIAL_ENTRY)
        params = {str(k): _freeze(x) for k, x in entry.items() if k not in ("arch", "label")}
        for k, x in params.items():
            flat = x if isinstance(x, tuple) else (x,)
            if not all(isinstance(e, (bool, int, float, str)) for e in flat):
                r.invalid(f"{path}.{k}", x, "a number, true/false, a string or a list of ints")
        arch, label = entry.get("arch"), entry.get("label")
        if label is not None and not (isinstance(label, str) and label.strip()):
            r.invalid(f"{path}.label", label, "a non-empty string")
        if isinstance(arch, str):
            label = label or arch
            arch = _arch_file(r, arch_path, arch)
        elif isinstance(arch, Mapping):
            try:
                arch = ArchConfig.from_dict(arch)
            except (ArchError, TypeError) as e:
                r.fail(f"{path}.arch", f"is not a valid network: {e}")
        elif arch is not None:
            r.invalid(f"{path}.arch", arch, "an architecture file path or an inline network")
        out.append(InitialPoint(arch=arch, params=params, label=label or f"initial[{i}]"))
    return tuple(out)


def _arch_file(r: _Reader, path: str, name: str) -> ArchConfig:
    """An arch file, relative to where the search starts (as data.path), else to the spec."""
    given = Path(name).expanduser()
    tried = [given.resolve()]
    if not given.is_absolute() and r.source != "<spec>":
        tried.append((Path(r.source).parent / given).resolve())
    for p in tried:
        if p.is_file():
            try:
                return ArchConfig.load(p)
            except ArchError as e:
                r.fail(path, f"is not a valid network: {e}")
    r.invalid(path, name, "an existing architecture file (tried " + ", ".join(map(str, tried)) + ")")


def _resources(r: _Reader, d: Any) -> Resources:
    if d == "auto":  # a whole GPU and up to 4 CPUs per trial where GPUs exist
        return Resources(cpu=4.0, gpu=1.0, auto=True)
    if isinstance(d, str):
        r.invalid("resources", d, "auto, or a mapping of cpu, gpu, custom, auto")
    res = r.dataclass(Resources, d, "resources", {
        "cpu": _number_check(0, lo_open=True),
        "gpu": _number_check(0, lo_open=False),
        "custom": _custom_check,
        "auto": _bool_check,
    })
    custom = {str(k): float(v) for k, v in (res.custom or {}).items()}
    return Resources(cpu=float(res.cpu), gpu=float(res.gpu), custom=custom, auto=res.auto)


def _custom_check(v: Any) -> str | None:
    ok = isinstance(v, Mapping) and all(
        isinstance(k, str) and k and k not in ("CPU", "GPU", "cpu", "gpu") and _is_number(x)
        and x > 0 for k, x in v.items())
    return None if ok else "a mapping of Ray custom resource name -> amount > 0 (not CPU/GPU)"


def _objectives(r: _Reader, d: Any) -> tuple[Objective, ...]:
    if d is None:
        return tuple(Objective(m, s) for m, s in DEFAULT_OBJECTIVES)
    d = r.mapping(d, "objectives", list(OBJECTIVE_MODES))
    if not any(m in d for m in TRAINED_METRICS):
        r.invalid("objectives", d, "at least one of " + ", ".join(TRAINED_METRICS)
                  + " (otherwise nothing needs training)")
    for metric, mode in d.items():
        if mode != OBJECTIVE_MODES[metric]:
            r.invalid(f"objectives.{metric}", mode, f"{OBJECTIVE_MODES[metric]} (the only "
                      f"sensible direction for {metric})")
    return tuple(Objective(m, s) for m, s in d.items())


def _data(r: _Reader, d: Any) -> DataConfig:
    kw = r.mapping(d, "data", [f.name for f in fields(DataConfig)])
    try:
        return DataConfig(**kw)
    except ValueError as e:
        # DataConfig's messages already read "data.<field>=<value> is invalid: expected ...".
        raise SpecError(f"{r.source}: {e}") from None


# ---------------------------------------------------------------------- searched values
def _dim(
    r: _Reader,
    v: Any,
    path: str,
    kind: str,
    check: Callable[[Any], str | None],
) -> Any:
    """A fixed value or a searched one, each possible value validated by ``check``.

    ``kind`` is the field's type: "int" and "float" allow the matching range, "cat" only
    fixed values and choices. ``check`` returns None when a value is fine, else what is allowed.
    """
    if not isinstance(v, Mapping):
        allowed = check(v)
        if allowed is not None:
            r.invalid(path, v, allowed)
        return _freeze(v)
    keys = ("choice", "int", "float", "step", "log")
    d = r.mapping(v, path, keys)
    kinds = [k for k in ("choice", "int", "float") if k in d]
    if len(kinds) != 1:
        r.invalid(path, v, "a fixed value or exactly one of {choice: [...]}, {int: [lo, hi]}, "
                  "{float: [lo, hi]}")
    k = kinds[0]
    extra = sorted(set(d) - {k, *(("step", "log") if k == "int" else ("log",) if k == "float" else ())})
    if extra:
        r.fail(f"{path}.{extra[0]}", f"is not allowed with {k} (only with "
               f"{'int' if extra[0] == 'step' else 'int or float'})")
    if k == "choice":
        values = d["choice"]
        if not isinstance(values, list) or not values:
            r.invalid(f"{path}.choice", values, "a non-empty list of values")
        frozen = [_freeze(x) for x in values]
        for i, x in enumerate(values):
            if frozen.index(frozen[i]) != i:
                r.invalid(f"{path}.choice[{i}]", x, "each value once (it is listed twice)")
            allowed = check(x)
            if allowed is not None:
                r.invalid(f"{path}.choice[{i}]", x, allowed)
        return Choice(tuple(frozen))
    if kind != k:
        want = {"int": "{int: [lo, hi]} or {choice: [...]}",
                "float": "{float: [lo, hi]} or {choice: [...]}",
                "cat": "a fixed value or {choice: [...]}"}[kind]
        r.invalid(path, v, f"{want} for this field")
    bounds = d[k]
    if not (isinstance(bounds, list) and len(bounds) == 2):
        r.invalid(f"{path}.{k}", bounds, "[lo, hi]")
    num_ok = _is_int if k == "int" else _is_number
    for i, b in enumerate(bounds):
        if not num_ok(b):
            r.invalid(f"{path}.{k}[{i}]", b, "an integer" if k == "int" else "a finite number")
        allowed = check(b)
        if allowed is not None:
            r.invalid(f"{path}.{k}[{i}]", b, allowed)
    lo, hi = bounds
    if lo > hi:
        r.invalid(f"{path}.{k}", bounds, f"[lo, hi] with lo <= hi ({lo} > {hi})")
    log = d.get("log", False)
    if not isinstance(log, bool):
        r.invalid(f"{path}.log", log, "true or false")
    if log and lo <= 0:
        r.invalid(f"{path}.{k}[0]", lo, "a number > 0 with log: true")
    if k == "float":
        return FloatRange(float(lo), float(hi), log)
    step = d.get("step", 1)
    if not (_is_int(step) and step >= 1):
        r.invalid(f"{path}.step", step, "an integer >= 1")
    if log and step != 1:
        r.invalid(f"{path}.step", step, "1 with log: true (Optuna cannot combine them)")
    return IntRange(lo, hi, step, log)


def _freeze(v: Any) -> Any:
    """Lists as tuples, so specs compare and hash by value."""
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _allowed(e: Exception) -> str:
    """What a config error says is allowed ("... is invalid: expected X" -> "X")."""
    msg = str(e)
    return msg.split(" is invalid: expected ", 1)[1] if " is invalid: expected " in msg else msg


def _arch_check(build: Callable[[Any], Any]) -> Callable[[Any], str | None]:
    """Validate a value by building the ArchConfig part that holds it (one set of rules)."""

    def check(v: Any) -> str | None:
        try:
            build(v)
        except ArchError as e:
            return _allowed(e)
        except (TypeError, ValueError) as e:
            return str(e)
        return None

    return check


def _stem_check(name: str) -> Callable[[Any], str | None]:
    return _arch_check(lambda v: StemConfig(**{name: v}).validate())


def _stage_check(name: str) -> Callable[[Any], str | None]:
    # Fields that apply to one kind of block are checked on a stage of that kind.
    base = ({"block": "densenet"} if name in ("compression", "order", "transition", "bottleneck")
            else {"block": "residual"} if name == "shortcut_bn" else {})
    return _arch_check(lambda v: StageConfig(**{**base, name: v}).validate())


def _net_check(name: str) -> Callable[[Any], str | None]:
    return _arch_check(lambda v: ArchConfig(**{name: v}))


def _head_check(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and all(_is_int(w) and w >= 1 for w in v)
    if not ok:
        return "a list of hidden layer widths (integers >= 1), e.g. [512, 128] or []"
    if len(v) > ArchConfig.MAX_HEAD_LAYERS:
        return f"at most {ArchConfig.MAX_HEAD_LAYERS} hidden layers"
    return None


def _bool_check(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _annotation_kind(cls: type, name: str) -> str:
    """"int", "float" or "cat" from a dataclass field's annotation (which range it allows)."""
    words = set(re.findall(r"\w+", str(next(f.type for f in fields(cls) if f.name == name))))
    return "float" if "float" in words else "int" if "int" in words else "cat"


_STEM_FIELDS = {f.name: _stem_check(f.name) for f in fields(StemSpace)}
_STAGE_FIELDS = {f.name: _stage_check("width" if f.name == "growth" else f.name)
                 for f in fields(StagesSpace)}
_NET_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "backbone": _one_of(("none", *BACKBONES)),
    "backbone_trainable": _one_of(BACKBONE_TRAINABLE),
    "num_stages": lambda v: None if _is_int(v) and 0 <= v <= MAX_STAGES else (
        f"an integer in [0, {MAX_STAGES}]"),
    "block": _one_of(BLOCK_TYPES),
    "conv": _one_of(CONV_TYPES),
    "batch_norm": _net_check("batch_norm"),
    "activation": _one_of(ACTIVATIONS),
    "dropout": _net_check("dropout"),
    "pooling": _one_of(POOLINGS),
    "head": _head_check,
    "head_sparse": _bool_check,
    "head_density": _arch_check(lambda v: HeadLayer(density=v).validate()),
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
    return _annotation_kind(*_NET_KIND_SOURCE[name]) if name in _NET_KIND_SOURCE else "cat"


def _arch_space(r: _Reader, d: Any) -> ArchSpace:
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
            out[k] = _dim(r, v, path, _net_kind(k), _NET_FIELDS[k])
    space = ArchSpace(**out)
    _check_space(r, space)
    return space


def _stem_space(r: _Reader, d: Any) -> StemSpace:
    kw = r.mapping(d, "space.stem", list(_STEM_FIELDS))
    return StemSpace(**{k: _dim(r, v, f"space.stem.{k}", _annotation_kind(StemConfig, k),
                                _STEM_FIELDS[k]) for k, v in kw.items()})


def _stages_space(r: _Reader, d: Any) -> StagesSpace:
    kw = r.mapping(d, "space.stages", list(_STAGE_FIELDS))
    out = {}
    for k, v in kw.items():
        path = f"space.stages.{k}"
        kind = _annotation_kind(StageConfig, "width" if k == "growth" else k)
        if isinstance(v, list):  # one value per stage
            if not v:
                r.invalid(path, v, "a value or a non-empty list with one value per stage")
            out[k] = tuple(_dim(r, x, f"{path}[{i}]", kind, _STAGE_FIELDS[k])
                           for i, x in enumerate(v))
        else:
            out[k] = _dim(r, v, path, kind, _STAGE_FIELDS[k])
    return StagesSpace(**out)


def stage_value(dim: Any, i: int) -> Any:
    """The value (fixed or searched) of a ``space.stages`` dimension for stage ``i``."""
    return dim[i] if isinstance(dim, tuple) else dim


def _check_space(r: _Reader, s: ArchSpace) -> None:
    """Rules that tie several space fields together."""
    backbones = possible_values(s.backbone)
    if "none" not in backbones:
        return  # stem and stages are never used
    blocks = set(possible_values(s.block))
    stage_counts = possible_values(s.num_stages)
    max_stages, min_stages = max(stage_counts), min(stage_counts)
    if s.stem is None and min_stages < 1:
        r.invalid("space.num_stages", _plain(s.num_stages),
                  "at least 1 stage when space.stem is null")
    for f in fields(StagesSpace):
        dim = getattr(s.stages, f.name)
        if isinstance(dim, tuple) and len(dim) < max_stages:
            r.invalid(f"space.stages.{f.name}", _plain(dim),
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
                r.invalid(f"space.stages.{name}{sfx}", _plain(stage_value(dim, i)),
                          f"{default!r}: {name} applies only to {'/'.join(kinds)} stages, and "
                          f"space.block allows {', '.join(sorted(blocks))}")
        trans = set(possible_values(stage_value(s.stages.transition, i)))
        comps = possible_values(stage_value(s.stages.compression, i))
        if blocks & set(AGGREGATING_BLOCKS) and trans == {"never"} and 1.0 not in comps:
            sfx = f"[{i}]" if isinstance(s.stages.compression, tuple) else ""
            r.invalid(f"space.stages.compression{sfx}", _plain(stage_value(s.stages.compression, i)),
                      "1.0 as a possible value: space.stages.transition is never, and compression "
                      "is the transition's")


# ---------------------------------------------------------------------- train section
def _train(r: _Reader, d: Any) -> dict[str, Any]:
    kw = r.mapping(d, "train", [f.name for f in fields(TrainConfig)])
    fixed: dict[str, Any] = {}

    def check_for(name: str) -> Callable[[Any], str | None]:
        # TrainConfig's own rules, with the fixed values seen so far (some rules tie fields).
        def check(v: Any) -> str | None:
            try:
                TrainConfig(**{**fixed, name: v})
            except ValueError as e:
                # A rule on another field (nesterov needs momentum) is quoted whole.
                if str(e).startswith(f"train.{name}="):
                    return _allowed(e)
                return f"a value that fits the other train values ({e})"
            return None

        return check

    for k, v in kw.items():
        if not isinstance(v, Mapping):
            _dim(r, v, f"train.{k}", "cat", check_for(k))
            fixed[k] = _freeze(v)
    return {k: _dim(r, v, f"train.{k}", _annotation_kind(TrainConfig, k), check_for(k))
            for k, v in kw.items()}
