"""YAML -> :class:`SearchSpec`: :func:`load_spec` (a file) and :func:`parse_spec` (parsed
data, with the command-line overrides), and the parsers of every top-level section but
``space`` (:mod:`search.spec.arch`). The format itself is described in :mod:`search.spec`,
which re-exports these names.

Parsing checks each value and the rules between fields; it builds no network. Initial points
are checked against the space where a search starts (:func:`search.space.check_initial`,
called by ``preflight`` and ``dry_run``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from search.schema import SCREENED_METRICS
from search.spec.arch import read_arch_space
from search.spec.dims import FloatRange, is_int, is_number, plain
from search.spec.model import (
    DEFAULT_OBJECTIVES,
    FINALIZE_PICKS,
    OBJECTIVE_MODES,
    SAMPLERS,
    SCHEDULERS,
    SECTIONS,
    TRAINED_METRICS,
    Constraints,
    EarlyStopping,
    FillBudget,
    Finalize,
    InitialPoint,
    Lamarckian,
    Objective,
    Resources,
    SearchSettings,
    SearchSpec,
    SpecError,
)
from search.spec.reader import (
    Reader,
    annotation_kind,
    bool_check,
    expected_of,
    freeze,
    int_check,
    number_check,
    one_of,
    read_dim,
)
from trainables.arch import ArchConfig, ArchError
from trainables.data import DataConfig
from trainables.train import TrainConfig

__all__ = ["DURATION", "INITIAL_ENTRY", "load_spec", "parse_duration", "parse_spec",
           "time_budget_option"]

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
    r = Reader(source)
    d = r.mapping(data, "", SECTIONS)
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
        ok = is_int(v) and (v >= 0 if where == "search.seed" else v > 0)
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
    data = _data(r, d["data"])
    objectives = _objectives(r, d.get("objectives"))
    resources = _resources(r, d.get("resources", {}))
    train = _train(r, d.get("train", {}))
    int8_eval = train.get("int8_eval", True)  # left out: SearchSpec.int8_eval() decides
    if int8_eval is not True and any(o.metric == "int8_accuracy" for o in objectives):
        r.invalid("train.int8_eval", plain(int8_eval), "true (or left out) with objectives."
                  "int8_accuracy: that objective is measured by the int8 step")
    return SearchSpec(
        name=name,
        data=data,
        objectives=objectives,
        constraints=constraints,
        search=settings,
        resources=resources,
        train=train,
        space=read_arch_space(r, d.get("space", {})),
        source=source,
    )


def _constraints(r: Reader, d: Any) -> Constraints:
    return r.dataclass(Constraints, d, "constraints", {
        "max_params": int_check(1, nullable=True),
        "max_deploy_params": int_check(1, nullable=True),
        "max_macs": int_check(1, nullable=True),
        "max_flash_bytes": int_check(1, nullable=True),
        "max_sram_bytes": int_check(1, nullable=True),
        "max_latency_ms": lambda v: None if v is None or (is_number(v) and v > 0)
        else "a number of milliseconds > 0 or null",
    })


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(v: Any) -> float | None:
    """Seconds from a number of seconds or a string like ``90s``, ``45m``, ``1.5h`` or
    ``2h30m`` (parts in h, m, s order); None for anything else (the caller names the field)."""
    if is_number(v):
        return float(v) if v > 0 else None
    if not isinstance(v, str):
        return None
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([smh]?)\s*", v)
    if m:
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        m = re.fullmatch(rf"\s*(?:{_NUMBER}h)?\s*(?:{_NUMBER}m)?\s*(?:{_NUMBER}s)?\s*", v)
        if m is None or not any(m.groups()):
            return None
        seconds = sum(float(g) * k for g, k in zip(m.groups(), (3600, 60, 1), strict=True) if g)
    return seconds if seconds > 0 else None


DURATION = "a positive duration: seconds, or a string like 90s, 45m, 1.5h, 2h30m"


def time_budget_option(v: str | float | None) -> float | None:
    """``--time-budget`` of ``finalize`` and ``resume`` in seconds (None when not given); a
    UserError naming the flag when it is not a duration."""
    if v is None:
        return None
    seconds = parse_duration(v)
    if seconds is None:
        from search.errors import UserError

        raise UserError(f"--time-budget {v!r} is invalid: expected {DURATION}")
    return seconds


def _duration_or_null(v: Any) -> str | None:
    return None if v is None or parse_duration(v) is not None else DURATION


def _search_settings(r: Reader, d: Any) -> SearchSettings:
    kw = r.mapping(d, "search", [f.name for f in fields(SearchSettings)])
    early, fill = kw.pop("early_stopping", None), kw.pop("fill_budget", None)
    lamarck = kw.pop("lamarckian", None)
    final = kw.pop("finalize", None)
    initial = _initial(r, kw.pop("initial", None))
    settings = r.dataclass(SearchSettings, kw, "search", {
        "sampler": one_of(SAMPLERS),
        "num_samples": int_check(1),
        "max_concurrent": int_check(1),
        "seed": int_check(0),
        "max_failures": int_check(0),
        "max_rejects": int_check(1),
        "time_budget": _duration_or_null,
    })
    if settings.time_budget is not None:
        settings = dataclasses.replace(settings, time_budget=parse_duration(settings.time_budget))
    if early is not None:
        early = r.dataclass(EarlyStopping, early, "search.early_stopping", {
            "scheduler": one_of(SCHEDULERS),
            "grace_epochs": int_check(1),
            "reduction_factor": lambda v: None if is_number(v) and v > 1 else "a number > 1",
        })
    if fill is not None:
        fd = r.mapping(fill, "search.fill_budget", ["fraction", "bands"])
        if "fraction" in fd:
            frac = read_dim(r, fd["fraction"], "search.fill_budget.fraction", "float",
                            lambda v: None if is_number(v) and 0 < v <= 1 else "a number in (0, 1]")
            fd["fraction"] = frac
        if "bands" in fd:
            allowed = int_check(1)(fd["bands"])
            if allowed is not None:
                r.invalid("search.fill_budget.bands", fd["bands"], allowed)
        fill = FillBudget(**fd)
        if fill.bands > 1 and not isinstance(fill.fraction, FloatRange):
            r.fail("search.fill_budget.bands", f"={fill.bands} needs a searched fraction to split "
                   f"({{float: [lo, hi]}}), but fraction is {plain(fill.fraction)!r}: drop bands "
                   "or search the fraction")
    if lamarck is not None:
        if settings.sampler != "lamarckian":
            r.fail("search.lamarckian", f"is set but search.sampler is {settings.sampler!r}: "
                   "set sampler: lamarckian or drop it")
        lamarck = r.dataclass(Lamarckian, lamarck, "search.lamarckian", {
            "warmup": int_check(1),
            "child_epochs": int_check(1, nullable=True),
            "mutations": int_check(1),
            "explore": lambda v: None if is_number(v) and 0 <= v <= 1 else "a number in [0, 1]",
            "inherit": lambda v: None if isinstance(v, bool) else "true or false",
        })
    elif settings.sampler == "lamarckian":
        lamarck = Lamarckian()
    if final is not None:
        final_train = final_under = None
        if isinstance(final, Mapping) and "train" in final:
            final = dict(final)
            final_train = _finalize_train(r, final.pop("train"))
        if isinstance(final, Mapping) and "under" in final:
            final = dict(final)
            final_under = _finalize_under(r, final.pop("under"))
        final = r.dataclass(Finalize, final, "search.finalize", {
            "top": int_check(1, nullable=True),
            "pick": one_of(FINALIZE_PICKS),
            "seeds": int_check(1),
            "epochs": int_check(1, nullable=True),
            "time_budget": _duration_or_null,
        })
        if final.time_budget is not None:
            final = dataclasses.replace(final, time_budget=parse_duration(final.time_budget))
        if final_train:
            final = dataclasses.replace(final, train=final_train)
        if final_under:
            for name, clash in (("top", final.top is not None), ("pick", final.pick != "best")):
                if clash:
                    r.fail(f"search.finalize.{name}", f"={plain(getattr(final, name))!r} cannot "
                           "go with search.finalize.under (it picks the best member under each "
                           "cap): drop one of them")
            final = dataclasses.replace(final, under=final_under)
    return dataclasses.replace(settings, early_stopping=early, fill_budget=fill, initial=initial,
                               finalize=final, lamarckian=lamarck)


INITIAL_ENTRY = ("an architecture file, or a mapping of arch (a file or an inline network), "
                 "label and Optuna parameter names (train/lr, fill_fraction, stages/0/width, ...)")


def _initial(r: Reader, v: Any) -> tuple[InitialPoint, ...]:
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
        params = {str(k): freeze(x) for k, x in entry.items() if k not in ("arch", "label")}
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


def _arch_file(r: Reader, path: str, name: str) -> ArchConfig:
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


def _resources(r: Reader, d: Any) -> Resources:
    if d == "auto":  # a whole GPU and up to 4 CPUs per trial where GPUs exist
        return Resources(cpu=4.0, gpu=1.0, auto=True)
    if isinstance(d, str):
        r.invalid("resources", d, "auto, or a mapping of cpu, gpu, custom, auto")
    res = r.dataclass(Resources, d, "resources", {
        "cpu": number_check(0, lo_open=True),
        "gpu": number_check(0, lo_open=False),
        "custom": _custom_check,
        "auto": bool_check,
    })
    custom = {str(k): float(v) for k, v in (res.custom or {}).items()}
    return Resources(cpu=float(res.cpu), gpu=float(res.gpu), custom=custom, auto=res.auto)


def _custom_check(v: Any) -> str | None:
    ok = isinstance(v, Mapping) and all(
        isinstance(k, str) and k and k not in ("CPU", "GPU", "cpu", "gpu") and is_number(x)
        and x > 0 for k, x in v.items())
    return None if ok else "a mapping of Ray custom resource name -> amount > 0 (not CPU/GPU)"


def _objectives(r: Reader, d: Any) -> tuple[Objective, ...]:
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


def _data(r: Reader, d: Any) -> DataConfig:
    kw = r.mapping(d, "data", [f.name for f in fields(DataConfig)])
    try:
        return DataConfig(**kw)
    except ValueError as e:
        # DataConfig's messages already read "data.<field>=<value> is invalid: expected ...".
        raise SpecError(f"{r.source}: {e}") from None


def _finalize_under(r: Reader, d: Any) -> dict[str, tuple[float, ...]]:
    """``search.finalize.under``: {counted metric: a cap or a list of caps, each > 0}; {}: none
    (top and pick decide)."""
    path = "search.finalize.under"
    kw = r.mapping(d, path, SCREENED_METRICS)
    out = {}
    for k, v in kw.items():
        caps = list(v) if isinstance(v, (list, tuple)) else [v]
        if not caps or not all(is_number(c) and c > 0 for c in caps):
            r.invalid(f"{path}.{k}", plain(v), "a number > 0 or a list of them")
        out[k] = tuple(caps)
    return out


def _finalize_train(r: Reader, d: Any) -> dict[str, Any]:
    """``search.finalize.train``: fixed TrainConfig values, each checked by TrainConfig's rules."""
    names = [f.name for f in fields(TrainConfig) if f.name not in ("epochs", "seed")]
    for k, why in (("epochs", "search.finalize.epochs sets them"),
                   ("seed", "each repeat's seed is the trial's +0, +1, ...")):
        if isinstance(d, Mapping) and k in d:
            r.fail(f"search.finalize.train.{k}", f"is not allowed here: {why}")
    kw = r.mapping(d, "search.finalize.train", names)
    for k, v in kw.items():
        path = f"search.finalize.train.{k}"
        if isinstance(v, (Mapping, list)):
            r.invalid(path, v, "a fixed value (the retraining searches nothing)")
        try:
            TrainConfig(**{k: v})
        except ValueError as e:
            r.invalid(path, v, expected_of(e) if str(e).startswith(f"train.{k}=") else str(e))
    return dict(kw)


# ---------------------------------------------------------------------- train section
def _train(r: Reader, d: Any) -> dict[str, Any]:
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
                    return expected_of(e)
                return f"a value that fits the other train values ({e})"
            return None

        return check

    for k, v in kw.items():
        if not isinstance(v, Mapping):
            read_dim(r, v, f"train.{k}", "cat", check_for(k))
            fixed[k] = freeze(v)
    return {k: read_dim(r, v, f"train.{k}", annotation_kind(TrainConfig, k), check_for(k))
            for k, v in kw.items()}
