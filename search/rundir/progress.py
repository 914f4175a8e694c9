"""What a search prints: one live progress line on stderr, the Pareto table on stdout.

The progress line is redrawn in place (at most twice a second) when stderr is a terminal, and
printed as a plain line every ``interval_s`` seconds otherwise (logs, CI), so a long search
never floods a log file. The table and the ``--json`` summary go to stdout, so
``sparse-search run x.yaml --json | tail -1`` is always one JSON object.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from search.pickled import public
from search.schema import SCREENED_COLUMNS, TRAINED_COLUMNS

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from search.run.searcher import ProposerSearcher
    from search.rundir.results import Recorder

TTY_REDRAW_S = 0.5


@public("search.rundir")
class ProgressCallback(Callback):
    """The live line: trials done / running / failed, proposals rejected, front size."""

    def __init__(self, recorder: Recorder, searcher: ProposerSearcher, *, total: int,
                 interval_s: float = 30.0) -> None:
        self.recorder = recorder
        self.searcher = searcher
        self.total = total
        self.interval_s = interval_s
        self._last_draw = -math.inf
        self._drawn = False  # a TTY line is on screen (end it with a newline)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last_draw": -math.inf, "_drawn": False}

    def line(self, trials: Sequence[Trial]) -> str:
        c = self.recorder.counts()
        running = sum(1 for t in trials if t.status == "RUNNING")
        early = f" ({c['early_stopped']} stopped early)" if c["early_stopped"] else ""
        budget = getattr(self.searcher, "time_budget", None)
        clock = ""
        if budget is not None:
            clock = f" | {self.searcher.spent / 60:.0f}/{budget / 60:.0f} min"
            clock += " (no new trials: time budget)" if self.searcher.stopped_by else ""
        return (f"trials {c['finished']}/{self.total} done{early}, {running} running, "
                f"{c['failed']} failed, {self.searcher.rejected} rejected | "
                f"front {len(self.recorder.front)}{clock}")

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if now - self._last_draw < (TTY_REDRAW_S if tty else self.interval_s):
            return
        self._last_draw = now
        if tty:
            sys.stderr.write("\r\033[K" + self.line(trials))
            self._drawn = True
        else:
            sys.stderr.write(self.line(trials) + "\n")
        sys.stderr.flush()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """The final counts, always (a TTY line is finished with a newline)."""
        sys.stderr.write(("\r\033[K" if self._drawn else "") + self.line(trials) + "\n")
        sys.stderr.flush()
        self._drawn = False


def _fmt(v: Any, spec: str) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return format(v, spec)
    return "-"


# Columns the front table adds for the objectives it does not show by default: (header,
# the point's key, format). int8_accuracy shows the int8 val and test scores it stands for.
_OBJECTIVE_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "int8_accuracy": (("int8_val", "int8_val_accuracy", ".4f"),
                      ("int8_test", "int8_test_accuracy", ".4f")),
    "deploy_params": (("deploy", "deploy_params", ",d"),),
    "macs": (("macs", "macs", ",d"),),
    "flash_bytes": (("flash_B", "flash_bytes", ",d"),),
    "sram_bytes": (("sram_B", "sram_bytes", ",d"),),
    "latency_ms": (("lat_ms", "latency_ms", ".3f"),),
    "val_loss": (("val_loss", "val_loss", ".4f"),),
}


def front_table(front: Sequence[Mapping[str, Any]], objectives: Sequence[str] = ()) -> str:
    """The Pareto front, smallest model first: params, accuracies, a column for each of the
    search's ``objectives`` beyond those (int8 accuracy, flash and SRAM bytes, latency, ...),
    trial and architecture."""
    if not front:
        # (said of a search stopped by its budget and of one interrupted before any trial ended)
        return "Pareto front: empty (no trial finished)"
    rounds = any(p.get("prune_round") for p in front)
    shown = list(objectives)
    if "deploy_params" not in shown and any(
            p.get("deploy_params") not in (None, p.get("nonzero_params")) for p in front):
        shown.insert(0, "deploy_params")  # a frozen trunk ships more than trains: show both
    extra = [c for o in shown for c in _OBJECTIVE_COLUMNS.get(o, ())]
    # val_acc +- its standard error: front neighbours closer than about two of these are
    # ranked by the validation split's noise, not told apart.
    head = f"{'nonzero_params':>14}  {'val_acc':>7} {'+-se':>6}  {'test_acc':>8}"
    head += "".join(f"  {h:>9}" for h, _, _ in extra) + f"  {'trial':>5}"
    head += f"  {'round':>5}" if rounds else ""
    lines = [f"Pareto front ({len(front)}):", head + "  arch"]
    for p in front:
        trial = f"{p['trial_key']}{'*' if p.get('initial') else ''}"
        row = (f"{_fmt(p.get('nonzero_params'), ',d'):>14}  {_fmt(p.get('val_accuracy'), '.4f'):>7}"
               f" {_fmt(p.get('val_accuracy_se'), '.4f'):>6}"
               f"  {_fmt(p.get('test_accuracy'), '.4f'):>8}")
        row += "".join(f"  {_fmt(p.get(k), f):>9}" for _, k, f in extra)
        row += f"  {trial:>5}"
        row += f"  {p.get('prune_round', 0):>5}" if rounds else ""
        lines.append(row + f"  {p['arch']}")
    if any(p.get("initial") for p in front):
        lines.append("* a network of search.initial (not found by the sampler)")
    return "\n".join(lines)


_JSON_FIRST = ("nonzero_params", "macs", "val_accuracy", "val_accuracy_se", "test_accuracy")


def _json_number(v: Any) -> Any:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def summary(*, run_dir: str, recorder: Recorder, rejected: int, complete: bool,
            stopped_by: str | None = None, wall_s: float | None = None,
            duplicates: int = 0) -> dict[str, Any]:
    """The ``--json`` object: counts and the front (JSON has no NaN: missing values are null).

    ``stopped_by``: why a complete search ended (num_samples | time_budget); ``wall_s``: the
    search's wall seconds over resumes, from the command's start.
    """
    c = recorder.counts()
    return {
        "run_dir": run_dir,
        "complete": complete,
        "stopped_by": stopped_by,
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "trials": c["finished"],
        "terminated": c["terminated"],
        "early_stopped": c["early_stopped"],
        "failed": c["failed"],
        "rejected": rejected,
        "duplicates": duplicates,
        "front": [
            {"trial_id": p["trial_id"], "trial_key": p["trial_key"],
             "prune_round": p.get("prune_round", 0),
             "nonzero_params": _json_number(p.get("nonzero_params")),
             "macs": _json_number(p.get("macs")),
             "val_accuracy": _json_number(p.get("val_accuracy")),
             "val_accuracy_se": _json_number(p.get("val_accuracy_se")),
             "test_accuracy": _json_number(p.get("test_accuracy")),
             # every other figure of the vocabulary (int8 scores, flash, SRAM, latency)
             **{m: _json_number(p.get(m)) for m in (*SCREENED_COLUMNS, *TRAINED_COLUMNS)
                if m not in _JSON_FIRST},
             "arch": p["arch"], "model": p.get("model")}
            for p in recorder.front
        ],
    }
