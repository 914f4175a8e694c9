"""Finalization: retrain a search's front at full fidelity, over several seeds.

A search's trials are short (few epochs, early stopping); NAS practice retrains the front
before reporting it. ``sparse-search finalize RUN_DIR`` takes pareto.csv's members (at most
``search.finalize.top``: the most accurate by default, the smallest with ``pick: smallest``),
retrains each with its own recorded architecture (``trials/<key>/arch.yaml``) and recorded
recipe (the trial's flat ``train/`` config, from ``trials/<key>/result.json``: the record
results.csv is written from), ``seeds`` times (seed
recorded, +1, +2, ...) and with ``epochs`` per phase when given, on the search's own data
splits (the run's spec.yaml ``data`` section). A front point of an earlier pruning round is
retrained with ``prune_rounds`` cut to that round.

Each (member, seed) is one Ray task with the per-trial resources the search planned
(:func:`search.run.preflight.preflight`); its result is written at once to
``final/<member>-s<seed>/result.json`` (+ ``model.pt``): a rerun skips what is finished with
the same recipe, so an interrupted finalize is resumable. At the end ``final-pareto.csv`` holds
one row per member (mean and sample std over its seeds) with ``on_front`` marking the final
front; pareto.csv (the search's front) is left as it was.

``search.finalize.time_budget``: members in pick order, those estimated to end past it left out
(:mod:`search.finalize.budget`); progress lines meanwhile (:mod:`search.finalize.progress`).

MLflow (:mod:`search.finalize.record`), when the run was tracked: one run per (member, seed)
nested under the search's parent run, and ``final-pareto.csv`` as a parent artifact.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from search.errors import UserError
from search.finalize.front import (
    FINAL_PARETO,
    FINAL_PNG,
    FINISHED,
    Member,
    final_csv,
    final_front,
    final_png,
)
from search.rundir.layout import (
    ARCH_YAML,
    FINAL_DIR,
    MODEL_FILE,
    RESULT_JSON,
    RESULTS_FILE,
    SPEC_FILE,
    RunDir,
    write_atomic,
    write_json,
)
from search.rundir.owner import own_run
from search.rundir.storage import attach

__all__ = ["FINAL_DIR", "FinalizeOutcome", "Member", "finalize_run", "front_members", "open_run",
           "pick_order", "trial_recipe"]

FAILED = "FAILED"


class FinalizeInterrupted(Exception):
    """Ctrl-C / SIGTERM stopped a finalize: what finished is kept (exit 130, rerun it)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"interrupted: continue with `sparse-search finalize {run_dir}` "
                         "(finished retrainings are kept)")


# ---------------------------------------------------------------------- what is retrained
def open_run(run_dir: str | Path) -> RunDir:
    """A finished (or interrupted) search's run dir (a URI: downloaded into a fresh local copy,
    search.rundir.storage); a UserError names what is missing."""
    run = RunDir.fetch(run_dir, needed=(SPEC_FILE, RESULTS_FILE))
    if not run.path.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    for needed in (run.spec, run.results_csv):
        if not needed.is_file():
            raise UserError(f"{run_dir}: {needed.name} is missing: expected a folder made by "
                            "`sparse-search run` (runs/<name>-<date>-<time>)")
    return run


def _csv_value(v: str) -> Any:
    """A results.csv cell as the value it was (numbers, booleans, null, lists)."""
    if v == "":
        return None
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def recorded_config(run: RunDir, key: str) -> dict[str, Any]:
    """The trial's flat config (``arch/...``, ``train/...``): its result.json, else its
    results.csv row; a UserError lists the known trial keys."""
    path = run.trial(key) / RESULT_JSON
    if path.is_file():
        return dict(json.loads(path.read_text())["config"])
    with run.results_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["trial_key"] == key:
            return {k: _csv_value(v) for k, v in row.items() if k.startswith(("arch/", "train/"))}
    known = ", ".join(r["trial_key"] for r in rows) or "none"
    raise UserError(f"trial {key!r} is not in {run.results_csv} (trial keys: {known})")


def trial_recipe(run: RunDir, key: str, *, epochs: int | None = None, seed: int | None = None,
                 prune_round: int | None = None,
                 overrides: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """(ArchConfig, TrainConfig) of a recorded trial: its arch.yaml and its ``train/`` config,
    with ``overrides`` (search.finalize.train), ``epochs``, ``seed`` and (an earlier front
    round) ``prune_rounds`` replaced."""
    from trainables.arch import ArchConfig
    from trainables.train import TrainConfig

    config = recorded_config(run, key)
    arch_file = run.trial(key) / ARCH_YAML
    arch = ArchConfig.load(arch_file) if arch_file.is_file() else ArchConfig.from_flat(config)
    cfg = TrainConfig.from_flat({k: v for k, v in config.items() if k.startswith("train/")})
    changes: dict[str, Any] = dict(overrides or {})
    if prune_round is not None and prune_round < cfg.prune_rounds:
        changes["prune_rounds"] = prune_round
    if epochs is not None:
        changes["epochs"] = epochs
        if cfg.prune_rounds and cfg.rewind_epoch > epochs:
            changes["rewind_epoch"] = epochs
    if seed is not None:
        changes["seed"] = seed
    return arch, cfg.replace(**changes) if changes else cfg


def _rank(pick: str, objective: tuple[str, str]) -> Callable[[Mapping[str, Any]], float]:
    """Sort key of a pareto.csv row, ascending = picked first: fewest params (``smallest``) or
    best in ``objective`` (its column, max | min)."""
    if pick != "best":
        return lambda r: float(r["nonzero_params"] or "inf")
    metric, mode = objective
    worst = "-inf" if mode == "max" else "inf"
    return lambda r: -float(r.get(metric) or worst) if mode == "max" else float(r.get(metric) or worst)


def pick_order(members: list[Member], pick: str,
               objective: tuple[str, str] = ("val_accuracy", "max")) -> list[Member]:
    """``members`` in the order ``pick`` prefers them (a time budget trains them in it)."""
    return sorted(members, key=lambda m: _rank(pick, objective)(m.search_point))


def front_members(run: RunDir, *, top: int | None, epochs: int | None, pick: str = "smallest",
                  objective: tuple[str, str] = ("val_accuracy", "max"),
                  overrides: Mapping[str, Any] | None = None,
                  under: Mapping[str, Sequence[float]] | None = None,
                  echo: Callable[[str], Any] = print) -> list[Member]:
    """pareto.csv's points in order of params (smallest first), at most ``top``: the smallest,
    or (``pick="best"``) the best in ``objective`` (its column, max | min); with ``under``
    ({metric: caps}) and no ``top``: for each cap the best in ``objective`` among the points at
    or under it (a cap no point is under is said through ``echo``)."""
    if not run.pareto_csv.is_file():
        raise UserError(f"{run.path}: {run.pareto_csv.name} is missing: no trial finished yet")
    with run.pareto_csv.open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=_rank("smallest", objective))
    if under and top is None:
        rows = _under_caps(rows, under, objective, echo)
    elif top is not None and pick == "best":
        best = {id(r) for r in sorted(rows, key=_rank(pick, objective))[:top]}
        rows = [r for r in rows if id(r) in best]
    members = []
    for row in rows[:top] if top is not None else rows:
        key, r = row["trial_key"], int(row.get("prune_round") or 0)
        arch, cfg = trial_recipe(run, key, epochs=epochs, prune_round=r, overrides=overrides)
        recorded_rounds = int(recorded_config(run, key).get("train/prune_rounds") or 0)
        label = key if r >= recorded_rounds else f"{key}r{r}"  # an earlier round: its own label
        members.append(Member(key, r, label, arch, cfg, search_point=row))
    return members


def _under_caps(rows: list[dict[str, str]], under: Mapping[str, Sequence[float]],
                objective: tuple[str, str], echo: Callable[[str], Any]) -> list[dict[str, str]]:
    """``rows`` (smallest first) cut to the best in ``objective`` under each cap of ``under``."""
    picked: set[int] = set()
    for metric, caps in under.items():
        for cap in caps:
            fits = [r for r in rows if r.get(metric) not in (None, "") and float(r[metric]) <= cap]
            if not fits:
                echo(f"no front member has {metric} <= {cap:,.0f}: nothing to retrain for it")
                continue
            best = min(fits, key=_rank("best", objective))
            echo(f"{metric} <= {cap:,.0f}: trial {best['trial_key']} ({metric} "
                 f"{float(best[metric]):,.0f}, {objective[0]} {best.get(objective[0])})")
            picked.add(id(best))
    return [r for r in rows if id(r) in picked]


# ---------------------------------------------------------------------- one retraining
def retrain(arch_yaml: str, cfg_flat: Mapping[str, Any], splits: Any, use_gpu: bool,
            progress: Any = None, job_id: str = "", int8: bool = False) -> dict:
    """Train one (member, seed) (a Ray task body; plain data in and out): the final report,
    per-epoch reports, the delivered weights (``torch.save`` bytes) and the node it ran on.
    ``progress``: a Ray queue its epochs are reported to (search.finalize.progress). ``int8``
    (a deployment search's, ``SearchSpec.int8_eval``): the retrained weights also quantized as
    a trial's are, their int8 metrics in the report and their ONNX files in ``files``."""
    import torch

    from search.finalize.progress import report_epochs
    from trainables.arch import ArchConfig
    from trainables.train import TrainConfig, fold_pruning
    from trainables.trial import train_arch

    arch = ArchConfig.from_yaml(arch_yaml)
    cfg = TrainConfig.from_flat(cfg_flat)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    weights: dict[str, Any] = {}
    report = report_epochs(progress, job_id, cfg.total_epochs) if progress is not None else None

    def on_epoch(metrics: dict[str, Any], state: Any) -> None:
        if report is not None:
            report(metrics)
        if "test_accuracy" in metrics:  # the last report: keep the delivered weights
            weights["model"] = fold_pruning(state()["model"])

    if report is not None:
        report({"epoch": 0})  # started: the driver's line tells it from one Ray still queues
    result = train_arch(arch, splits, cfg, device=device, on_epoch=on_epoch)
    metrics, files = dict(result.metrics), {}
    if int8 and "model" in weights:
        metrics_int8, files = _int8(arch, weights["model"], splits, metrics["val_accuracy"],
                                    threads=cfg.threads or 1)
        metrics.update(metrics_int8)
    buf = io.BytesIO()
    torch.save(weights.get("model", {}), buf)
    node = None
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # (the node is a label, never worth a failure)
        node = None
    return {"metrics": _plain(metrics), "history": [_plain(m) for m in result.history],
            "model": buf.getvalue(), "files": files, "node": node}


def _int8(arch: Any, state: Mapping[str, Any], splits: Any, val_accuracy: float, *,
          threads: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The search trial's int8 step on the retrained weights (``trial_int8``: the same 256
    calibration images, so ``sparse-search export ... --format onnx-int8`` of this member
    rebuilds the same file): its int8 metrics, and the fp32 and int8 ONNX files' bytes."""
    import tempfile

    from trainables.deploy.quantize import FP32_ONNX_FILE, INT8_ONNX_FILE, trial_int8
    from trainables.models import build_model

    model = build_model(arch)
    model.load_state_dict(state)  # folded (plain weights, zeros baked in): as it ships
    with tempfile.TemporaryDirectory(prefix="sparse-search-final-int8-") as d:
        metrics = trial_int8(model.eval(), splits, d, val_accuracy=val_accuracy, threads=threads)
        files = {name: (Path(d) / name).read_bytes() for name in (FP32_ONNX_FILE, INT8_ONNX_FILE)
                 if (Path(d) / name).is_file()}
    return metrics, files


def _plain(m: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in m.items():
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
    return out


# ---------------------------------------------------------------------- the command
@dataclass(frozen=True)
class FinalizeOutcome:
    run_dir: Path
    rows: list[dict[str, Any]]  # final-pareto.csv's rows
    trained: int  # (member, seed) retrained by this call
    skipped: int  # finished by an earlier call with the same recipe
    failed: int
    tracking_error: str | None = None
    left_out: tuple[str, ...] = ()  # job ids the time budget did not start (rerun to train them)

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "trained": self.trained, "skipped": self.skipped,
                "failed": self.failed, "left_out": list(self.left_out),
                "final_pareto": str(self.run_dir / FINAL_PARETO),
                "front": [r for r in self.rows if r.get("on_front")]}


def _positive(name: str, v: int | None) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise UserError(f"--{name} {v!r} is invalid: expected an integer >= 1")


def _load_records(run: RunDir) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((run.path / FINAL_DIR).glob(f"*/{RESULT_JSON}")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except ValueError:
            continue  # never half-written (atomic), but a hand-edited file is not fatal
    return out


def finalize_run(run_dir: str | Path, *, top: int | None = None, seeds: int | None = None,
                 epochs: int | None = None, time_budget: str | float | None = None,
                 mlflow: bool = True, tracking_uri: str | None = None, address: str | None = None,
                 echo: Callable[[str], Any] = lambda s: print(s, file=sys.stderr, flush=True),
                 progress_s: float = 30.0) -> FinalizeOutcome:
    """Retrain the run's front (see the module docstring); ``top`` / ``seeds`` / ``epochs`` /
    ``time_budget`` (seconds, or 75m, 2h) override ``search.finalize``. Raises UserError (bad
    input, before anything is trained) or FinalizeInterrupted (Ctrl-C: rerun to continue).
    ``progress_s``: seconds between progress lines while training."""
    from search.spec.parse import time_budget_option

    for name, v in (("top", top), ("seeds", seeds), ("epochs", epochs)):
        _positive(name, v)
    budget_s = time_budget_option(time_budget)
    run = open_run(run_dir)
    with own_run(run):  # one owner per run dir (search.rundir.owner)
        mirror = attach(run)  # a run dir on a URI: final/ and final-pareto.csv copied there
        try:
            outcome = _finalize(run, top=top, seeds=seeds, epochs=epochs, budget_s=budget_s,
                                mlflow=mlflow, tracking_uri=tracking_uri, address=address,
                                echo=echo, progress_s=progress_s)
        finally:
            storage_error = mirror.close() if mirror is not None else None
    if storage_error:
        outcome = dataclasses.replace(outcome, tracking_error="; ".join(
            e for e in (outcome.tracking_error, storage_error) if e))
    return outcome


def _finalize(run: RunDir, *, top: int | None, seeds: int | None, epochs: int | None,
              budget_s: float | None, mlflow: bool, tracking_uri: str | None, address: str | None,
              echo: Callable[[str], Any], progress_s: float) -> FinalizeOutcome:
    from search.schema import headline_objective
    from search.spec import load_spec
    from search.spec.model import Finalize

    spec = load_spec(run.spec)
    settings = spec.search.finalize or Finalize()
    top = top if top is not None else settings.top
    seeds = seeds if seeds is not None else settings.seeds
    epochs = epochs if epochs is not None else settings.epochs
    budget_s = budget_s if budget_s is not None else settings.time_budget
    objective = headline_objective(spec)
    members = front_members(run, top=top, epochs=epochs, pick=settings.pick,
                            objective=objective, overrides=settings.train,
                            under=settings.under, echo=echo)
    if not members:
        raise UserError(f"{run.pareto_csv} holds no front member: nothing to finalize")
    offsets = range(seeds)
    ranked = pick_order(members, settings.pick, objective)
    # In pick order: with a time budget the first ones are trained first (and the last left out).
    jobs = {m.job_id(m.train.seed + i): (m, m.train.seed + i) for m in ranked for i in offsets}
    records = _load_records(run)
    recipe = {jid: m.train.replace(seed=s).to_flat() for jid, (m, s) in jobs.items()}
    todo = [jid for jid in jobs if not (records.get(jid, {}).get("status") == FINISHED
                                        and records[jid].get("train") == recipe[jid])]
    skipped = len(jobs) - len(todo)
    echo(f"finalize {run.path.name}: {len(members)} members x {seeds} seeds, "
         f"{len(todo)} to train, {skipped} already done")

    tracker = None
    if mlflow:
        from search.finalize.record import FinalTracker

        tracker = FinalTracker.for_run(run.path, tracking_uri)
    trained = failed = 0

    def record(jid: str, rec: dict[str, Any]) -> None:
        nonlocal trained, failed
        records[jid] = rec
        trained += rec["status"] == FINISHED
        failed += rec["status"] == FAILED
        m = rec["metrics"]
        echo(f"final {jid}: {rec['status']}" + (
            f"  val_acc {m.get('val_accuracy', math.nan):.4f}  test_acc "
            f"{m.get('test_accuracy', math.nan):.4f}  params {m.get('nonzero_params')}"
            if rec["status"] == FINISHED else f"  {rec.get('error')}"))
        if tracker is not None and rec["status"] == FINISHED:
            tracker.log(jid, rec, jobs[jid][0])

    if tracker is not None:  # finished before (another call, or MLflow was down): catch up
        for jid in jobs:
            if jid not in todo:
                tracker.log(jid, records[jid], jobs[jid][0])
    budget = None
    if budget_s is not None and todo:
        from search.finalize.budget import plan_for

        by_member: dict[str, list[str]] = {}
        for jid in todo:
            by_member.setdefault(jobs[jid][0].label, []).append(jid)
        budget = functools.partial(plan_for, run.results_csv, ranked, by_member, budget_s, echo)
    left_out: list[str] = []
    if todo:
        left_out = _train_on_ray(run, spec, {jid: jobs[jid] for jid in todo}, recipe, address,
                                 record, budget=budget, echo=echo, progress_s=progress_s)
    seed_lists = {m.label: [m.train.seed + i for i in offsets] for m in members}
    rows = final_front(members, records, sorted({s for v in seed_lists.values() for s in v}),
                       objectives=[(o.metric, o.mode) for o in spec.objectives])
    write_atomic(run.path / FINAL_PARETO, final_csv(rows))
    final_png(rows, run.path / FINAL_PNG, title=f"{spec.name}: final front")
    error = None
    if tracker is not None:
        tracker.log_front(run.path / FINAL_PARETO)
        tracker.log_front(run.path / FINAL_PNG)
        error = tracker.failure
    return FinalizeOutcome(run.path, rows, trained, skipped, failed, tracking_error=error,
                           left_out=tuple(left_out))


def _train_on_ray(run: RunDir, spec: Any, jobs: Mapping[str, tuple[Member, int]],
                  recipe: Mapping[str, dict[str, Any]], address: str | None,
                  record: Callable[[str, dict[str, Any]], None], *,
                  budget: Callable[[int], Any] | None = None,
                  echo: Callable[[str], Any] = print, progress_s: float = 30.0) -> list[str]:
    """One Ray task per (member, seed), with the search's per-trial resources; with ``budget``
    (slots -> BudgetPlan) only the planned ones, a slot's worth in flight, each started only
    while its estimate fits. Returns the job ids not started."""
    from concurrent.futures import ThreadPoolExecutor

    from search.finalize.progress import Board
    from search.run.interrupt import sigterm_as_sigint
    from search.run.preflight import preflight
    from search.run.ray_runtime import cluster_address, init_ray
    from trainables.data import load_dataset

    checked = preflight(spec, address=address, tracking_uri=None, mlflow=False)
    plan = checked.plan
    print(plan.line, file=sys.stderr, flush=True)
    started = checked.attached
    slots = max(1, plan.concurrent)
    chosen = budget(slots) if budget is not None else None
    order = list(chosen.admitted if chosen is not None else jobs)
    left_out = [jid for jid in jobs if jid not in order]
    import ray
    from ray.util.queue import Queue

    if not order:  # the budget admits nothing: no data, no Ray
        if started:
            ray.shutdown()
        return left_out
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparse-search-data") as pool:
            splits = pool.submit(load_dataset, spec.data)
            started = init_ray(address) or started
            sigterm_as_sigint()  # ray.init replaced it: SIGTERM stops a finalize like Ctrl-C
            splits_ref = ray.put(splits.result())
        task = ray.remote(retrain).options(
            num_cpus=plan.cpu, num_gpus=plan.gpu, resources=dict(plan.custom) or None,
            max_retries=spec.search.max_failures)
        threads = max(1, int(plan.cpu))
        in_flight = slots if chosen is not None else len(order)  # no budget: Ray queues them all
        began = time.monotonic()
        pending: dict[Any, tuple[str, Member, int, float]] = {}
        reports = Queue(actor_options={"num_cpus": 0})  # the tasks' epochs, for the board
        board = Board(reports, total=len(order), echo=echo, interval_s=progress_s,
                      budget_s=chosen.budget_s if chosen is not None else None)

        def submit() -> None:
            while order and len(pending) < in_flight:
                jid = order.pop(0)
                if chosen is not None and not chosen.fits_now(jid, time.monotonic() - began):
                    echo(f"left out {jid}: ~{chosen.estimates[jid] / 60:.0f} min no longer fits "
                         f"in the {chosen.budget_s / 60:.0f}-min budget")
                    left_out.append(jid)
                    board.total -= 1
                    continue
                m, seed = jobs[jid]
                cfg = m.train.replace(seed=seed)
                cfg = cfg if cfg.threads is not None else cfg.replace(threads=threads)
                pending[task.remote(m.arch.to_yaml(), cfg.to_flat(), splits_ref, plan.gpu > 0,
                                    reports, jid, spec.int8_eval())] = (jid, m, seed, time.time())

        try:
            submit()
            while pending:
                # (a timeout, so the board prints while nothing finishes: retrainings are long)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(5.0, progress_s))
                board.tick([v[0] for v in pending.values()])
                if not ready:
                    continue
                jid, m, seed, t0 = pending.pop(ready[0])
                rec = _save(run, jid, m, seed, recipe[jid], ready[0], t0, record)
                board.finished(jid, rec["status"] == FINISHED)
                submit()
        except KeyboardInterrupt:
            # A Ray this process started goes down with its workers in the `finally` below:
            # no cancel, since a task that ends while it is being cancelled aborts the driver
            # in Ray 2.60's task manager ("Tried to complete task that was not pending", exit
            # 1 instead of 130; seen with and without force). A Ray we only attached to (a
            # cluster, a notebook's) needs them cancelled to be free; not forced: rarer so.
            if not (started and cluster_address(address) is None):
                for ref in pending:
                    ray.cancel(ref)
            raise FinalizeInterrupted(run.path) from None
        finally:
            reports.shutdown(force=True)
    finally:
        if started:
            ray.shutdown()
    return left_out


def _save(run: RunDir, jid: str, m: Member, seed: int, train_flat: dict[str, Any], ref: Any,
          t0: float, record: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
    """result.json (and model.pt) of one finished (member, seed), written at once; its record."""
    import ray

    out = run.path / FINAL_DIR / jid
    base = {"job_id": jid, "trial_key": m.trial_key, "prune_round": m.prune_round, "seed": seed,
            "epochs": m.train.epochs, "arch": m.arch.canonical(), "train": train_flat,
            "started_at": t0, "finished_at": time.time()}
    try:
        res = ray.get(ref)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None) or e
        rec = {**base, "status": FAILED, "error": f"{type(cause).__name__}: {cause}".strip()[:2000],
               "metrics": {}, "history": []}
    else:
        write_atomic(out / MODEL_FILE, res["model"])
        write_atomic(out / ARCH_YAML, m.arch.to_yaml())
        for name, data in res.get("files", {}).items():  # an int8 search's ONNX files
            write_atomic(out / name, data)
        rec = {**base, "status": FINISHED, "error": None, "metrics": res["metrics"],
               "history": res["history"], "node": res["node"]}
    write_json(out / RESULT_JSON, rec)
    record(jid, rec)
    return rec
