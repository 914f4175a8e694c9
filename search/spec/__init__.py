"""Search spec: one YAML file -> a validated, frozen :class:`SearchSpec`.

A spec says what to search (``space``, ``train``), on which data (``data``), for which goals
(``objectives``, ``constraints``) and how (``search``, ``resources``). Every section is
optional except ``data``; omitted values take the defaults shown here::

    name: cifar10-1m                  # default: the file name without .yaml
    data: {name: cifar10, path: data/cifar10.npz, val_fraction: 0.1}   # trainables.data.DataConfig
    objectives: {val_accuracy: max, nonzero_params: min}   # optional: macs: min (or val_loss: min)
    constraints: {max_params: 1000000, max_macs: null}      # hard budgets, screened before training
    search:
      sampler: tpe                    # tpe | nsga2 | random | lamarckian (weight inheritance)
      num_samples: 20                 # trials to train (over-budget proposals do not count)
      max_concurrent: 1               # trials training at once
      seed: 0
      max_failures: 0                 # retries of a crashed trial (Ray's FailureConfig)
      max_rejects: 1000               # over-budget proposals in a row before giving up
      early_stopping: null            # or {scheduler: moasha | asha, grace_epochs: 1, reduction_factor: 3}
      fill_budget: null               # or {fraction: 0.9} / {fraction: {float: [0.3, 1.0]}, bands: 4}
      lamarckian: null                # or {warmup: 8, child_epochs: null, mutations: 2, explore: 0.25, inherit: true}
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

**Where it lives.** This module is the folder's public face (imported lazily): every name
below comes from :mod:`search.spec.dims` (searched values), :mod:`search.spec.model` (the section dataclasses and
:class:`SearchSpec`) and :mod:`search.spec.parse` (:func:`load_spec`, :func:`parse_spec`; the
``space`` section is :mod:`search.spec.arch`, the value reader :mod:`search.spec.reader`).
Reading a spec builds no network: initial points are checked against the space where a search
starts (:func:`search.space.check_initial`, from ``preflight`` and ``dry_run``). Ray pickles
these classes as ``search.spec.<name>`` (:mod:`search.pickled` pins them here).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

# name -> the module that defines it (imported on first use: reading a spec imports
# no torch until a network is built)
_PUBLIC = {
    "SEARCHED": "search.spec.dims",
    "Choice": "search.spec.dims",
    "FloatRange": "search.spec.dims",
    "IntRange": "search.spec.dims",
    "is_searched": "search.spec.dims",
    "possible_values": "search.spec.dims",
    "stage_value": "search.spec.dims",
    "AGGREGATING_BLOCKS": "search.spec.model",
    "BACKBONE_TRAINABLE": "search.spec.model",
    "DEFAULT_OBJECTIVES": "search.spec.model",
    "FLAT_PREFIX": "search.spec.model",
    "MAX_STAGES": "search.spec.model",
    "OBJECTIVE_MODES": "search.spec.model",
    "SAMPLERS": "search.spec.model",
    "SCHEDULERS": "search.spec.model",
    "TRAINED_METRICS": "search.spec.model",
    "ArchSpace": "search.spec.model",
    "Constraints": "search.spec.model",
    "EarlyStopping": "search.spec.model",
    "FillBudget": "search.spec.model",
    "Finalize": "search.spec.model",
    "Lamarckian": "search.spec.model",
    "InitialPoint": "search.spec.model",
    "Objective": "search.spec.model",
    "Resources": "search.spec.model",
    "SearchSettings": "search.spec.model",
    "SearchSpec": "search.spec.model",
    "SpecError": "search.spec.model",
    "StagesSpace": "search.spec.model",
    "StemSpace": "search.spec.model",
    "DURATION": "search.spec.parse",
    "INITIAL_ENTRY": "search.spec.parse",
    "load_spec": "search.spec.parse",
    "parse_duration": "search.spec.parse",
    "parse_spec": "search.spec.parse",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
