"""What a search found: one record per finished trial, candidate points, the Pareto front.

:class:`Recorder` is a Ray Tune callback running in the driver. It writes
``trials/<key>/result.json`` (plus arch.yaml, model.pt and layers.json for trials that
finished) the moment a trial ends, then rewrites results.csv, points.csv and pareto.csv from
all records. Nothing finished is ever lost to a killed driver, and a resumed search starts
from the records on disk (a trial recorded once is never recorded again).

On a cluster each record says where the trial ran (``node``: the node id the trainable
reported) and what its failed attempts were (``retries``, ``retry_error``: one entry per
attempt Ray retried under ``search.max_failures``, e.g. a node lost mid-trial).

Multi-fidelity honesty:
- a trial is TERMINATED only when its trainable sent its final report (the only report that
  carries ``test_accuracy``: Ray marks results of scheduler-stopped trials ``done`` too, so
  ``done`` cannot tell them apart); a trial the scheduler stopped is EARLY_STOPPED and never
  enters the front;
- each completed pruning round of a TERMINATED trial is a candidate point (its last report
  before the next round starts), so one lottery-ticket run can put several sizes on the front;
- a point over any budget (``Constraints.limits()``: params, MACs, flash, SRAM, latency; e.g. an
  early, denser round) is not eligible.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from search.pickled import public
from search.rundir.layout import (
    ARCH_YAML,
    LAYERS_JSON,
    MODEL_FILE,
    RESULT_JSON,
    RunDir,
    write_atomic,
    write_json,
)
from search.rundir.pareto import front_indices
from search.schema import INITIAL_KEY, METRICS, SCREENED_COLUMNS, TRAINED_COLUMNS, TRIAL_KEY
from search.spec.dims import finite

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from search.run.background import Background
    from search.spec import Objective

log = logging.getLogger("sparse_search.results")

TERMINATED, EARLY_STOPPED, ERROR = "TERMINATED", "EARLY_STOPPED", "ERROR"
# Report keys kept in records and points (the trainable reports more; Ray adds bookkeeping):
# every metric of the vocabulary (search/schema.py METRICS: accuracies and their SE, the
# int8 scores of the final report, the counted and measured budgets), and the trial's own
# bookkeeping: int8_error when the int8 step failed (the trial did not), node_id (where it ran),
# inherited_fraction (a lamarckian child's).
METRIC_KEYS = (*METRICS, "test_loss", "train_loss", "nonzero_macs", "epoch", "prune_round",
               "fidelity", "train_seconds", "node_id", "int8_error", "int8_calibration_images",
               "int8_seconds", "inherited_fraction")
# The tables' columns: the vocabulary's (trained, then counted) between each table's own.
# node: the Ray node id (hex) of the worker that ran the trial's last attempt (the trainable
# reports it as ``node_id``); retries: attempts that failed and were retried (Ray's
# ``max_failures``: a lost node, a killed worker); retry_error: ``node: error`` of each.
# parent: a lamarckian child's parent trial key; inherited_fraction: the share of the child's
# parameters that started from the parent's trained weights (trainables/trial.py).
RESULT_COLUMNS = ("trial_key", "trial_id", "status", "error", "arch", *SCREENED_COLUMNS,
                  *TRAINED_COLUMNS, "int8_error", "train_seconds", "int8_seconds", "epochs",
                  "prune_round", "fidelity", "initial", "parent", "inherited_fraction", "node",
                  "retries", "retry_error")
POINT_COLUMNS = ("trial_key", "trial_id", "prune_round", "epoch", *SCREENED_COLUMNS,
                 *TRAINED_COLUMNS, "eligible", "on_front", "model", "arch")
# pareto.csv: what a front member is judged by (its val_loss stays in results.csv).
PARETO_COLUMNS = ("trial_key", "trial_id", "prune_round", *SCREENED_COLUMNS,
                  *(c for c in TRAINED_COLUMNS if c != "val_loss"), "model", "arch", "initial")

def trial_key(trial: Trial) -> str:
    return str(trial.config.get(TRIAL_KEY, trial.trial_id))


def is_final(result: Mapping[str, Any]) -> bool:
    """The trainable's own last report (see the module docstring for why not ``done``)."""
    return "test_accuracy" in result


def _metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in METRIC_KEYS if k in result}


def _round_model(r: int) -> str:
    return f"model-round{r}.pt"


# ---------------------------------------------------------------------- the front
def eligible(point: Mapping[str, Any], *, objectives: Sequence[tuple[str, str]],
             budgets: Mapping[str, float]) -> bool:
    """With a finite value for every objective and within every budget (``budgets``: metric ->
    limit, ``Constraints.limits()``; a point without the budgeted metric is not within it)."""
    if not all(finite(point.get(m)) for m, _ in objectives):
        return False
    return all(finite(v := point.get(m)) and float(v) <= limit for m, limit in budgets.items())


def candidate_points(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every point of every TERMINATED record, tagged with its trial (early-stopped and
    failed trials give none)."""
    out = []
    for rec in records:
        if rec["status"] != TERMINATED:
            continue
        for p in rec["points"]:
            out.append({**p, "trial_key": rec["trial_key"], "trial_id": rec["trial_id"],
                        "arch": rec["arch"], "initial": rec.get("initial")})
    return out


def pareto_front(points: Sequence[Mapping[str, Any]], *, objectives: Sequence[tuple[str, str]],
                 budgets: Mapping[str, float]) -> list[int]:
    """Indices into ``points`` of the non-dominated eligible ones, smallest model first."""
    ok = [i for i, p in enumerate(points)
          if eligible(p, objectives=objectives, budgets=budgets)]
    values = [[float(points[i][m]) for m, _ in objectives] for i in ok]
    front = [ok[j] for j in front_indices(values, [s for _, s in objectives])] if ok else []
    return sorted(front, key=lambda i: (points[i].get("nonzero_params", 0),
                                        -points[i].get("val_accuracy", 0.0)))


def _csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


# ---------------------------------------------------------------------- the callback
@public("search.rundir")
class Recorder(Callback):
    """Writes trials/<key>/ and the CSVs as trials finish (see the module docstring).

    Picklable (Ray pickles callbacks with the experiment): it holds paths and plain data only.
    Its per-trial state (the last report, the rounds completed so far) is saved with Ray's
    experiment checkpoint, so a resumed trial keeps the rounds it completed before the kill.
    """

    def __init__(self, run: RunDir, objectives: Sequence[Objective], *,
                 budgets: Mapping[str, float] | None = None,
                 background: Background | None = None) -> None:
        # All it reads of the spec: the objectives, and the budgets (metric -> limit,
        # Constraints.limits()) a point must stay within to be on the front: the screen judged
        # the delivered net before training; a lottery ticket's dense rounds can be over.
        self.run = run
        self.background = background  # layers.json off Tune's event loop when given
        self.objectives = [(o.metric, o.mode) for o in objectives]
        self.budgets = dict(budgets or {})
        self.records: dict[str, dict[str, Any]] = {}
        self._last: dict[str, dict[str, Any]] = {}  # trial key -> last report (METRIC_KEYS)
        self._points: dict[str, list[dict[str, Any]]] = {}  # trial key -> rounds completed
        self._failed: dict[str, list[dict[str, Any]]] = {}  # trial key -> failed attempts
        self.points: list[dict[str, Any]] = []
        self.front: list[dict[str, Any]] = []
        self.load()

    # ------------------------------------------------------------------ records on disk
    def load(self) -> None:
        """Read every trials/*/result.json (a resumed search) and recompute the front."""
        self.records = {}
        for path in sorted(self.run.trials.glob(f"*/{RESULT_JSON}")):
            try:
                rec = json.loads(path.read_text())
            except ValueError as e:
                log.warning("ignoring %s: not valid JSON (%s)", path, e)
                continue
            self.records[str(rec["trial_key"])] = rec
            out = path.parent
            if (rec["status"] == TERMINATED and (out / MODEL_FILE).is_file()
                    and not (out / LAYERS_JSON).is_file()):  # the driver died before writing it
                self._write_layers(out)
        self._recompute()

    def counts(self) -> dict[str, int]:
        statuses = [r["status"] for r in list(self.records.values())]
        return {"finished": len(statuses), "terminated": statuses.count(TERMINATED),
                "early_stopped": statuses.count(EARLY_STOPPED), "failed": statuses.count(ERROR)}

    def _recompute(self) -> None:
        self.points = candidate_points(self.records.values())
        on_front = pareto_front(self.points, objectives=self.objectives, budgets=self.budgets)
        front_set = set(on_front)
        for i, p in enumerate(self.points):
            p["eligible"] = eligible(p, objectives=self.objectives, budgets=self.budgets)
            p["on_front"] = i in front_set
        self.front = [self.points[i] for i in on_front]

    def write_tables(self) -> None:
        """results.csv, pareto.csv and (when some trial has several rounds) points.csv."""
        recs = sorted(self.records.values(), key=lambda r: int(r["trial_key"])
                      if str(r["trial_key"]).isdigit() else r["trial_key"])
        config_cols = sorted({k for r in recs for k in r["config"]} - set(RESULT_COLUMNS))
        rows = [{**r["config"], **r["metrics"], "trial_key": r["trial_key"],
                 "trial_id": r["trial_id"], "status": r["status"], "error": r["error"],
                 "arch": r["arch"], "epochs": r["metrics"].get("epoch"),
                 "initial": r.get("initial"), "parent": r.get("parent"),
                 "node": r.get("node") or r["metrics"].get("node_id"),
                 "retries": len(r.get("failed_attempts", ())),
                 "retry_error": " | ".join(f"{a.get('node') or '?'}: {a['error']}"
                                           for a in r.get("failed_attempts", ()))}
                for r in recs]
        write_atomic(self.run.results_csv, _csv(rows, [*RESULT_COLUMNS, *config_cols]))
        write_atomic(self.run.pareto_csv, _csv(self.front, PARETO_COLUMNS))
        if any(len(r["points"]) > 1 for r in recs):
            write_atomic(self.run.points_csv, _csv(self.points, POINT_COLUMNS))

    def df_rows(self) -> list[dict[str, Any]]:
        """One row per TERMINATED trial for the tracker: its front point if it has one, else its
        last point."""
        best: dict[str, dict[str, Any]] = {}
        for p in self.points:  # rounds in order: a later one replaces an earlier one of a kind
            cur = best.get(p["trial_key"])
            if cur is None or p["on_front"] or not cur["on_front"]:
                best[p["trial_key"]] = p
        return list(best.values())

    # ------------------------------------------------------------------ Ray Tune hooks
    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial,
                        result: dict, **info: Any) -> None:
        key = trial_key(trial)
        rep = _metrics(result)
        prev = self._last.get(key)
        if prev is not None:
            if rep.get("epoch", 0) <= prev.get("epoch", 0):
                # The trial went back (restarted from an older checkpoint): forget the rounds
                # it will redo.
                self._points[key] = [p for p in self._points.get(key, [])
                                     if p["prune_round"] < rep.get("prune_round", 0)]
            elif rep.get("prune_round", 0) > prev.get("prune_round", 0):
                self._points.setdefault(key, []).append(self._point(key, prev))
        self._last[key] = rep

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial,
                      checkpoint: Any, **info: Any) -> None:
        """Keep the weights of a pruning round that ends at full epochs (a front candidate)."""
        key = trial_key(trial)
        rep = self._last.get(key, {})
        epochs = trial.config.get("train/epochs")
        rounds = trial.config.get("train/prune_rounds", 0)
        r = rep.get("prune_round", 0)
        if not rounds or not epochs or r >= rounds or rep.get("epoch") != epochs * (r + 1):
            return
        try:
            with checkpoint.as_directory() as d:
                src = Path(d) / MODEL_FILE
                if src.is_file():
                    dest = self.run.trial(key) / _round_model(r)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)
        except OSError as e:
            log.warning("trial %s: could not keep the round-%d weights (%s)", key, r, e)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial,
                         **info: Any) -> None:
        """An attempt failed and Ray retries the trial (``max_failures``): keep why and where.

        Ray wrote the attempt's error file just before calling back."""
        key = trial_key(trial)
        node = self._last.get(key, {}).get("node_id")
        error = error_message(trial)
        log.warning("trial %s: attempt %d failed on node %s, retrying: %s", key,
                    len(self._failed.get(key, ())) + 1, (node or "?")[:8], error)
        self._failed.setdefault(key, []).append({"node": node, "error": error,
                                                 "at": time.time()})

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        key = trial_key(trial)
        last = self._last.pop(key, None) or _metrics(trial.last_result or {})
        points = self._points.pop(key, [])
        if key in self.records:
            return  # recorded before a resume: Ray re-ran it from a stale snapshot
        final = is_final(last)
        if final:
            points.append(self._point(key, last))
        self._save(trial, key, status=TERMINATED if final else EARLY_STOPPED, error=None,
                   metrics=last, points=points, final=final)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        key = trial_key(trial)
        last = self._last.pop(key, None) or _metrics(trial.last_result or {})
        self._points.pop(key, None)
        if key in self.records:
            return
        error = error_message(trial)
        log.warning("trial %s failed: %s", key, error)
        self._save(trial, key, status=ERROR, error=error, metrics=last, points=[], final=False)

    def get_state(self) -> dict[str, Any] | None:
        if not self._last and not self._points and not self._failed:
            return None
        return {"last": self._last, "points": self._points, "failed": self._failed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._last = dict(state.get("last", {}))
        self._points = {k: list(v) for k, v in state.get("points", {}).items()}
        self._failed = {k: list(v) for k, v in state.get("failed", {}).items()}

    # ------------------------------------------------------------------ writing
    def _point(self, key: str, rep: Mapping[str, Any]) -> dict[str, Any]:
        r = int(rep.get("prune_round", 0))
        model = None
        if is_final(rep):
            model = f"{self.run.trials.name}/{key}/{MODEL_FILE}"
        elif (self.run.trial(key) / _round_model(r)).is_file():
            model = f"{self.run.trials.name}/{key}/{_round_model(r)}"
        # Every metric of the vocabulary (int8 ones: the final point only; earlier rounds'
        # weights are not quantized, their reports lack them).
        return {"prune_round": r, "epoch": rep.get("epoch"), **{m: rep.get(m) for m in METRICS},
                "model": model}

    def _save(self, trial: Trial, key: str, *, status: str, error: str | None,
              metrics: dict[str, Any], points: list[dict[str, Any]], final: bool) -> None:
        from trainables.arch import ArchConfig
        from trainables.trial import PARENT_KEY

        config = {k: v for k, v in trial.config.items() if not k.startswith("meta/")}
        out = self.run.trial(key)
        out.mkdir(parents=True, exist_ok=True)
        try:
            arch = ArchConfig.from_flat(config)
            write_atomic(out / ARCH_YAML, arch.to_yaml())
            arch_name = arch.canonical()
        except ValueError as e:  # cannot happen for configs the Proposer made; never fatal
            arch, arch_name = None, f"<invalid arch: {e}>"
        if final and arch is not None:
            self._save_model(trial, out)
        record = {"trial_key": key, "trial_id": trial.trial_id, "status": status, "error": error,
                  "arch": arch_name, "finished_at": time.time(), "metrics": metrics,
                  "points": points, "config": config,
                  "initial": trial.config.get(INITIAL_KEY), "parent": trial.config.get(PARENT_KEY),
                  "node": metrics.get("node_id"),
                  "failed_attempts": self._failed.pop(key, [])}
        write_json(out / RESULT_JSON, record)
        self.records[key] = record
        self._recompute()
        self.write_tables()

    def _save_model(self, trial: Trial, out: Path) -> None:
        """model.pt (and the int8 step's ONNX files) from the final checkpoint, then layers.json
        counted from those weights."""
        from trainables.deploy.quantize import FP32_ONNX_FILE, INT8_ONNX_FILE

        checkpoint = trial.checkpoint
        if checkpoint is None:
            log.warning("trial %s finished without a checkpoint: no model.pt", trial_key(trial))
            return
        try:
            with checkpoint.as_directory() as d:
                shutil.copyfile(Path(d) / MODEL_FILE, out / MODEL_FILE)
                for name in (FP32_ONNX_FILE, INT8_ONNX_FILE):  # the int8 step's, when it ran
                    if (Path(d) / name).is_file():
                        shutil.copyfile(Path(d) / name, out / name)
        except OSError as e:
            log.warning("trial %s: could not save model.pt (%s)", trial_key(trial), e)
            return
        if self.background is not None:
            self.background.submit(self._write_layers, out)
        else:
            self._write_layers(out)

    @staticmethod
    def _write_layers(out: Path) -> None:
        """layers.json: the accounting of the trial's delivered weights."""
        from trainables.arch import ArchConfig

        write_json(out / LAYERS_JSON, layers_of(ArchConfig.load(out / ARCH_YAML), out / MODEL_FILE))


def layers_of(arch: Any, model_path: Path) -> dict[str, Any]:
    """The accounting of the delivered model (real weights: pruned zeros count as zero)."""
    import torch

    from trainables.accounting import count_built
    from trainables.models import build_model

    if arch.backbone is not None and arch.backbone.weights is not None:
        # The trained weights replace the pretrained ones: never read that file again.
        arch = arch.replace(backbone=arch.backbone.__class__(
            name=arch.backbone.name, trainable=arch.backbone.trainable, weights=None))
    model = build_model(arch)
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    return count_built(model, (arch.in_channels, *arch.input_size)).to_dict()


def error_message(trial: Trial) -> str:
    """``ExceptionType: message`` of a failed trial (the root cause, not Ray's wrapper).

    Read from the trial's local error files, which Ray writes before calling back (its
    ``get_error`` reads the storage copy, which may not be synced yet).
    """
    import cloudpickle

    from search.run.ray_compat import trial_error_file

    exc = None
    if (error_file := trial_error_file(trial)) is not None:
        try:
            exc = cloudpickle.loads(error_file.read_bytes())
        except Exception:  # an unpicklable cause: fall back to the text trace
            exc = None
    cause = getattr(exc, "cause", None) or exc
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".strip()
    text = ""
    if trial.error_file and Path(trial.error_file).is_file():
        text = Path(trial.error_file).read_text()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "the trial failed (Ray saved no error trace)"
