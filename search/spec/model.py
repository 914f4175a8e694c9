"""The spec's sections as frozen dataclasses, and how a :class:`SearchSpec` writes itself.

Owns :class:`SpecError`, the vocabulary of a spec (samplers, schedulers, objective modes,
aggregating blocks, backbone stage tokens), every section dataclass (:class:`Objective`,
:class:`Constraints`, :class:`SearchSettings`, :class:`ArchSpace`, ...) and
:meth:`SearchSpec.to_dict` / ``to_yaml`` / ``to_flat``. Reading YAML into these is
:mod:`search.spec.parse`; the manual of the format is :mod:`search.spec`, which re-exports
every name here (Ray pickles a ``SearchSpec`` into a run directory: old pickles name
``search.spec.<class>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import yaml

from search.errors import UserError
from search.pickled import public
from search.schema import (
    DEFAULT_OBJECTIVES,
    DEPLOY_METRICS,
    OBJECTIVE_MODES,
    TRAINED_METRICS,
    budget_fields,
)
from search.spec.dims import plain
from trainables.arch import ArchConfig
from trainables.data import DataConfig

__all__ = [
    "AGGREGATING_BLOCKS",
    "BACKBONE_TRAINABLE",
    "DEFAULT_OBJECTIVES",
    "FLAT_PREFIX",
    "MAX_STAGES",
    "OBJECTIVE_MODES",
    "SAMPLERS",
    "SCHEDULERS",
    "SECTIONS",
    "TRAINED_METRICS",
    "ArchSpace",
    "Constraints",
    "EarlyStopping",
    "FillBudget",
    "Finalize",
    "InitialPoint",
    "Lamarckian",
    "Objective",
    "Resources",
    "SearchSettings",
    "SearchSpec",
    "SpecError",
    "StagesSpace",
    "StemSpace",
]

FLAT_PREFIX = "spec"
SAMPLERS = ("tpe", "nsga2", "random", "lamarckian")
SCHEDULERS = ("asha", "moasha")
FINALIZE_PICKS = ("best", "smallest")
# OBJECTIVE_MODES, TRAINED_METRICS, DEFAULT_OBJECTIVES: the shared vocabulary (search/schema.py).
AGGREGATING_BLOCKS = ("densenet", "sparsenet")
MAX_STAGES = 16
# Backbone stage tokens: portable across backbones ("stage3" is resnet18's layer3 and
# densenet121's denseblock3), so one searched choice serves both.
BACKBONE_TRAINABLE = ("none", "stage1", "stage2", "stage3", "stage4", "all")
SECTIONS = ("name", "data", "objectives", "constraints", "search", "resources", "train", "space")


class SpecError(UserError):
    """An invalid search spec; the message names the file, field path, value and what is allowed."""



@public("search.spec")
@dataclass(frozen=True)
class Objective:
    metric: str  # a metric every trial reports (see OBJECTIVE_MODES)
    mode: str  # max | min

    @property
    def direction(self) -> str:
        """Optuna's spelling."""
        return "maximize" if self.mode == "max" else "minimize"


@public("search.spec")
@dataclass(frozen=True)
class Constraints:
    max_params: int | None = None  # nonzero trainable params of the delivered (pruned) model
    # Every param the shipped model carries: max_params's count + a frozen trunk's weights
    max_deploy_params: int | None = None
    max_macs: int | None = None  # dense conv + linear multiply-accumulates per image
    # int8 deployment budgets, screened before training on the unpruned net (no credit for
    # pruning rounds yet: conservative): stored weights + scales + int32 biases, BatchNorm
    # folded, sparse layers as bitmask where smaller (bytes); peak activations at batch 1,
    # layer by layer, skip/concat inputs held until their last use (bytes, int8)
    max_flash_bytes: int | None = None
    max_sram_bytes: int | None = None
    # Milliseconds per image at batch 1: the untrained net exported to ONNX and timed with ONNX
    # Runtime (1 thread) on the CPU of the machine that screens (the driver), before training
    max_latency_ms: float | None = None

    def limits(self) -> dict[str, float]:
        """{metric: the budget set on it} (``nonzero_params: 50000``, ...; search/schema.py
        says which field bounds which metric): what a front member must stay within."""
        return {metric: limit for field_, metric in budget_fields().items()
                if (limit := getattr(self, field_)) is not None}


@public("search.spec")
@dataclass(frozen=True)
class EarlyStopping:
    # moasha: search.run.moasha, ranks a rung by Pareto dominance over every objective;
    # asha: Ray's AsyncHyperBandScheduler, by the trained objective alone (it cuts small nets)
    scheduler: str = "moasha"
    grace_epochs: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung


@public("search.spec")
@dataclass(frozen=True)
class FillBudget:
    """Scale every width of a sampled shape so its params land at ``fraction`` of max_params."""

    fraction: Any = 0.9  # fixed in (0, 1] or searched ({float: [lo, hi]} / {choice: [...]})
    # > 1: split a searched {float: [lo, hi]} fraction into this many equal bands (equal in
    # log space when log: true) and give each trial the band with the fewest trials so far,
    # so every size range of the front gets its share of trials whatever the sampler favours.
    bands: int = 1


@public("search.spec")
@dataclass(frozen=True)
class Lamarckian:
    """``search.lamarckian`` (with ``sampler: lamarckian``, search/space/lamarckian.py): after
    ``warmup`` trials trained from scratch, most proposals are children of a front member,
    a few of its values changed, trained from its weights for ``child_epochs``."""

    warmup: int = 8  # trials trained from scratch (TPE's proposals) before the first child
    child_epochs: int | None = None  # epochs a child trains; null: half its train.epochs (>= 1)
    mutations: int = 2  # at most this many values change from parent to child (at least 1)
    explore: float = 0.25  # share of proposals after the warm-up that TPE makes from scratch
    # false: children train from scratch for train.epochs (the evolution without the weights:
    # what bench/search_quality.py compares inheritance against)
    inherit: bool = True

    def epochs_for(self, epochs: int) -> int:
        """A child's epochs when a trial from scratch trains ``epochs``."""
        if not self.inherit:
            return epochs
        return self.child_epochs if self.child_epochs is not None else max(1, epochs // 2)


@public("search.spec")
@dataclass(frozen=True)
class Finalize:
    """``search.finalize``: retrain the front at full fidelity (``sparse-search finalize``),
    each member with its own recorded architecture and recipe, on the search's data splits."""

    top: int | None = None  # members retrained: at most top of pareto.csv's (see pick); null: all
    # Which ``top`` members: "best" (highest in the spec's first maximised objective, e.g.
    # val_accuracy: the headline figures) or "smallest" (fewest nonzero params). Either way
    # they are retrained and listed smallest first.
    pick: str = "best"
    seeds: int = 2  # repeats per member (seeds recorded, +1, +2, ...): a spread needs two
    epochs: int | None = None  # epochs per phase of the retraining; null: the trial's train.epochs
    # TrainConfig values that replace the trial's own for the retraining (a longer budget may
    # want e.g. more augmentation: {crop_padding: 4}); fixed values only, never epochs or seed.
    train: Mapping[str, Any] = field(default_factory=dict)
    # Wall seconds of one finalize call (written 75m, 2h, ...): no retraining starts whose
    # estimated end (its search trial's measured s/epoch x its epochs) is later; null: no limit.
    time_budget: float | None = None
    # Budget points instead of top: {metric: [cap, ...]} over the counted metrics (nonzero_params,
    # flash_bytes, ...): for each cap, the front member best in the headline objective among
    # those at or under it, e.g. {flash_bytes: [24000, 64000]}: one front, two deployment
    # targets, each retrained (best first, as pick: best); one member under two caps, once.
    under: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


@public("search.spec")
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
    WRITES_ITSELF: ClassVar[bool] = True  # dims.plain writes it with to_dict (not field by field)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label}
        if self.arch is not None:
            d["arch"] = self.arch.to_dict()
        return {**d, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}}


@public("search.spec")
@dataclass(frozen=True)
class SearchSettings:
    # tpe (multivariate, constant liar) | nsga2 | random | lamarckian (weight inheritance)
    sampler: str = "tpe"
    num_samples: int = 20  # trials to train; over-budget proposals never count
    max_concurrent: int = 1  # trials in flight at once
    seed: int = 0  # seeds the sampler (and nothing else)
    max_failures: int = 0  # retries of a crashed trial (Ray's FailureConfig.max_failures)
    max_rejects: int = 1000  # infeasible proposals in a row before the search gives up
    early_stopping: EarlyStopping | None = None
    fill_budget: FillBudget | None = None
    lamarckian: Lamarckian | None = None  # with sampler: lamarckian; null: its defaults
    # Wall seconds for the whole search, from the command's start (resumes add theirs): no trial
    # starts once it is spent, nor one the median finished trial says would not end in what
    # is left. None: no limit.
    time_budget: float | None = None
    # Trained first, in order, before the sampler proposes anything (counted in num_samples).
    initial: tuple[InitialPoint, ...] = ()
    # The full-fidelity retraining of the front (`sparse-search finalize`); null: its defaults.
    finalize: Finalize | None = None


@public("search.spec")
@dataclass(frozen=True)
class Resources:
    """Per-trial resources. ``auto``: planned at start from what the cluster has (see
    :mod:`search.run.resources`): GPU trials at ``gpu`` per trial (and up to ``cpu`` CPUs) where a
    node has GPUs, CPU-only trials sharing the CPUs otherwise. YAML: ``resources: auto`` or
    ``{auto: true, cpu: 4, gpu: 0.25}``."""

    cpu: float = 1.0  # CPU cores per trial (fractions allowed); with auto: the most per GPU trial
    gpu: float = 0.0  # GPUs per trial (0.25 packs four trials on one GPU); with auto: the share
    # of one trial where GPUs exist (> 0)
    custom: dict[str, float] = field(default_factory=dict)  # Ray custom resources per trial
    auto: bool = False  # plan cpu/gpu from the cluster at start (the shipped headline spaces)


@public("search.spec")
@dataclass(frozen=True)
class StemSpace:
    """``space.stem``: the first conv (``null`` for none). Fields as in ArchConfig's StemConfig."""

    width: Any = 32
    kernel: Any = 3
    stride: Any = 1
    conv: Any = "standard"
    bias: Any = True
    bn_act: Any = True  # false: a bare conv (pre-activation stages start with BN -> act)


@public("search.spec")
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


@public("search.spec")
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


@public("search.spec")
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

    def int8_eval(self) -> bool:
        """Whether a trial gets the post-training int8 step: ``train.int8_eval`` when given,
        else on for a deployment search (one that budgets or optimises flash, SRAM, latency or
        int8 accuracy: schema.DEPLOY_METRICS) and off otherwise: the step costs seconds a trial
        (mostly the ONNX export), which a 30-s quickstart or a params-only search should not pay."""
        if "int8_eval" in self.train:
            return bool(self.train["int8_eval"])
        deploy = set(DEPLOY_METRICS)
        return bool(deploy & {o.metric for o in self.objectives}
                    or deploy & set(self.constraints.limits()))

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain YAML-able data; ``parse_spec(to_dict())`` gives it back."""
        return {
            "name": self.name,
            "data": {f.name: getattr(self.data, f.name) for f in fields(self.data)},
            "objectives": {o.metric: o.mode for o in self.objectives},
            "constraints": plain(self.constraints),
            "search": plain(self.search),
            "resources": plain(self.resources),
            "train": {k: plain(v) for k, v in self.train.items()},
            "space": plain(self.space),
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
            elif isinstance(v, (Mapping, list, tuple)):  # (tuple: finalize.under's caps)
                v = list(v) if isinstance(v, tuple) else v
                out[key] = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
            else:
                out[key] = v

        for k, v in self.to_dict().items():
            walk(f"{prefix}/{k}", v)
        return out


def _searched_dict(d: Mapping[str, Any]) -> bool:
    return any(k in d for k in ("choice", "int", "float"))
