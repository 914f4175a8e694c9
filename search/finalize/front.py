"""The final front: what ``sparse-search finalize`` writes and reads back.

:func:`final_front` averages each retrained member's seeds (mean and sample std of val and
test accuracy; counts as their mean) and marks the non-dominated rows by the search's
objectives on the means; ``final-pareto.csv`` (:data:`FINAL_COLUMNS`), ``final-pareto.png``
(:func:`final_png`), the ``pareto --final`` table (:func:`front_text`) and the reader
(:func:`read_final_csv`). :mod:`search.finalize` trains the members.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.errors import UserError
from search.rundir.storage import is_uri, read_file

__all__ = ["FINAL_COLUMNS", "FINAL_PARETO", "FINAL_PNG", "final_csv", "final_front", "final_png", "front_text",
           "read_final_csv"]

FINISHED = "FINISHED"  # a retraining's record status (search.finalize writes it)
FINAL_PARETO = "final-pareto.csv"
# Metrics averaged over seeds (mean and std columns) where the retraining reports them (the
# int8 ones in a deployment search: the quantized model's, as it ships).
AVERAGED = ("val_accuracy", "test_accuracy", "int8_val_accuracy", "int8_test_accuracy")
# Counts of the delivered model (the same for every seed, up to pruning ties): their mean.
COUNTS = ("nonzero_params", "deploy_params", "macs", "nonzero_macs", "flash_bytes",
          "sram_bytes")
# val_accuracy / test_accuracy repeat the means under pareto.csv's names, so a tool that reads
# a front reads this one too.
FINAL_COLUMNS = ("trial_key", "prune_round", "nonzero_params", "deploy_params", "macs",
                 "val_accuracy_mean", "val_accuracy_std", "test_accuracy_mean",
                 "test_accuracy_std", "seeds", "epochs", "search_val_accuracy", "on_front",
                 "arch", "val_accuracy", "test_accuracy")
# Test accuracy (mean over seeds) vs nonzero params; a deployment search's: int8 test accuracy
# vs flash bytes, what the device runs and holds.
FINAL_PNG = "final-pareto.png"



def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None



@dataclass(frozen=True)
class Member:
    """One front point to retrain: its trial, its pruning round and its recorded recipe."""

    trial_key: str
    prune_round: int
    label: str  # the trial key, or <key>r<round> for an earlier round of a pruning trial
    arch: Any  # trainables.arch.ArchConfig
    train: Any  # trainables.train.TrainConfig: the recorded recipe, retraining epochs applied
    search_point: Mapping[str, Any] = field(default_factory=dict)  # its pareto.csv row

    def job_id(self, seed: int) -> str:
        return f"{self.label}-s{seed}"


def final_front(members: Sequence[Member], records: Mapping[str, Mapping[str, Any]],
                seeds: Sequence[int], *, objectives: Sequence[tuple[str, str]]) -> list[dict]:
    """One row per member with a finished seed (FINAL_COLUMNS; metrics averaged over seeds),
    ``on_front`` marking the non-dominated rows by the search's objectives on the means."""
    from search.rundir.pareto import front_indices

    rows = []
    for m in members:
        recs = [records[m.job_id(s)] for s in seeds
                if records.get(m.job_id(s), {}).get("status") == FINISHED]
        if not recs:
            continue
        row: dict[str, Any] = {"trial_key": m.trial_key, "prune_round": m.prune_round,
                               "seeds": len(recs), "epochs": m.train.epochs,
                               "search_val_accuracy": m.search_point.get("val_accuracy"),
                               "arch": m.arch.canonical()}
        wanted = {*AVERAGED, *COUNTS, *(m for m, _ in objectives)}
        for k in sorted(wanted & {k for r in recs for k in r["metrics"]}):
            vals = [r["metrics"].get(k) for r in recs]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                continue
            mean, std = _mean_std(vals)
            if k in AVERAGED:
                row[f"{k}_mean"], row[f"{k}_std"], row[k] = mean, std, mean
            else:
                row[k] = mean if mean is None or not float(mean).is_integer() else int(mean)
        rows.append(row)

    def value(row: Mapping[str, Any], metric: str) -> float:
        v = row.get(f"{metric}_mean", row.get(metric))
        return float(v) if v is not None else math.nan

    ok = [i for i, r in enumerate(rows) if all(math.isfinite(value(r, m)) for m, _ in objectives)]
    front = {ok[j] for j in front_indices([[value(rows[i], m) for m, _ in objectives] for i in ok],
                                          [s for _, s in objectives])} if ok else set()
    for i, r in enumerate(rows):
        r["on_front"] = i in front
    return sorted(rows, key=lambda r: (r.get("nonzero_params") or 0, -(r.get("val_accuracy_mean") or 0)))


def final_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    extra = sorted({k for r in rows for k in r} - set(FINAL_COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*FINAL_COLUMNS, *extra], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def final_png(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """The retrained members' test accuracy (mean over seeds) against nonzero params, the final
    front in red: what the search's front became at full fidelity. Where the members were
    quantized (a deployment search): int8 test accuracy against flash bytes."""
    import pandas as pd

    from search.tracking.plots import render_png

    int8 = any(r.get("int8_test_accuracy_mean") not in (None, "") for r in rows)
    acc, size = ("int8_test_accuracy", "flash_bytes") if int8 else ("test_accuracy", "nonzero_params")
    table = pd.DataFrame([{acc: r.get(f"{acc}_mean"), size: r.get(size),
                           "on_front": str(r.get("on_front")).lower() == "true"} for r in rows])
    table = table.dropna() if len(table) else table
    tmp = path.with_name(path.name + ".tmp.png")
    render_png(table, tmp, objectives={acc: "max", size: "min"}, title=title, axes=(acc, size))
    tmp.replace(path)


def front_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The final front as a table (every member; ``*`` marks the front)."""
    def f(v: Any, spec: str) -> str:
        return "-" if v is None or v == "" else format(float(v), spec)

    def mean_std(r: Mapping[str, Any], metric: str) -> str:
        """``mean+-std``, or the mean alone when there is no spread (one seed)."""
        std = r.get(f"{metric}_std")
        spread = "" if std is None or std == "" else f"+-{f(std, '.4f')}"
        return f"{f(r.get(f'{metric}_mean'), '.4f'):>7}{spread:<8}"

    # A frozen trunk ships more than trains: its deploy_params column, only where they differ.
    deploy = any(r.get("deploy_params") not in (None, "", r.get("nonzero_params")) for r in rows)
    # A deployment search's quantized members: their int8 test accuracy, flash and SRAM bytes.
    int8 = any(r.get("int8_test_accuracy_mean") not in (None, "") for r in rows)
    lines = [f"{'':1} {'trial':>6} {'params':>10} " + (f"{'deploy':>11} " if deploy else "")
             + f"{'macs':>12} {'val_acc':>15} {'test_acc':>15} "
             + (f"{'int8_test':>15} {'flash_B':>9} {'sram_B':>9} " if int8 else "")
             + f"{'seeds':>5} {'epochs':>6}  arch"]
    for r in rows:
        lines.append(
            f"{'*' if str(r.get('on_front')).lower() == 'true' else ' '} {r['trial_key']:>6} "
            f"{f(r.get('nonzero_params'), ',.0f'):>10} "
            + (f"{f(r.get('deploy_params'), ',.0f'):>11} " if deploy else "")
            + f"{f(r.get('macs'), ',.0f'):>12} "
            f"{mean_std(r, 'val_accuracy')} {mean_std(r, 'test_accuracy')} "
            + (f"{mean_std(r, 'int8_test_accuracy')} {f(r.get('flash_bytes'), ',.0f'):>9} "
               f"{f(r.get('sram_bytes'), ',.0f'):>9} " if int8 else "")
            + f"{r.get('seeds', ''):>5} {r.get('epochs', ''):>6}  {r.get('arch', '')}")
    return "\n".join(lines)


def typed_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A final-pareto.csv row with its values typed (for JSON): integers, floats, booleans,
    and None for an empty cell; text stays text (``trial_key`` and ``arch`` included)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if not isinstance(v, str) or k in ("trial_key", "arch"):
            out[k] = v
        elif v == "":
            out[k] = None
        elif v.lower() in ("true", "false"):
            out[k] = v.lower() == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def read_final_csv(run_dir: str | Path) -> list[dict[str, str]]:
    if is_uri(run_dir):  # read in place (search.rundir.storage): nothing else copied
        return list(csv.DictReader(io.StringIO(read_file(run_dir, FINAL_PARETO).decode())))
    path = Path(run_dir) / FINAL_PARETO
    if not path.is_file():
        raise UserError(f"{path} is missing: run `sparse-search finalize {run_dir}` first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
