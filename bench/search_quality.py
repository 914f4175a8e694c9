"""Search quality at equal wall time: sparse-search's default against fair peers.

Every method searches the same space (default spaces/studies/tiny-mnist.yaml: tiny CNNs under
a 3,500-param budget, on real MNIST) for the same wall time (``--wall`` seconds, counted from
the call that starts it), with the same trainable, data, epochs, trials at once and the same
budget screen before training, through the same driver (``search.run.driver.run_search``, Ray
Tune underneath). Only the search strategy differs:

- ``sparse-search``: the space's own ``search`` settings as shipped (sampler, size bands,
  early stopping; tiny-mnist's: ``lamarckian``, children of the front trained from their
  parents' weights), changed only by ``--ours KEY=YAML`` for experiments;
- ``random``: Optuna's ``RandomSampler``; a screened-out proposal costs no training;
- ``optuna-tpe``: Optuna 5's ``TPESampler`` with its defaults (seed only), given the budget
  as its documentation teaches: the proposal's params excess set with ``trial.set_constraint``
  and the trial pruned before training (TPE ranks a pruned trial with a positive constraint
  as infeasible);
- ``optuna-nsga2``: ``NSGAIISampler(population_size=10)`` (the default 50 would be random
  sampling for the whole of a search this short), constraint set, pruned before training;
- ``syne-tune-morea``: Syne Tune's ``MultiObjectiveRegularizedEvolution`` (MOREA;
  ``population_size=10``, ``sample_size=5``: its defaults 100 / 10 would be random sampling
  for most of the search) over the same parameters as a Syne Tune config space; each config
  it suggests is screened (a screened-out one is never trained and never reaches its
  population, as a failed evaluation would not), each trained one is told its objectives.
  Needs the bench extra (``pip install -e '.[bench]'``, never a dependency of the product).
  Syne Tune's MOASHA is not a peer here: at 1 epoch per trial it has no rung to stop at and
  is random sampling.

Peers are plain samplers over the same space: a searched fill fraction (``fill_budget``: every
width scaled so the params land at that fraction of the budget) is a dimension their sampler
draws too; giving each size band its share of trials (``fill_budget.bands``), weight
inheritance (``sampler: lamarckian``) and early stopping are sparse-search's, off for them.

Quality is the hypervolume of the (test error, log10 nonzero params) front of the trials
finished by the wall time (``search.rundir.pareto.hypervolume_2d``; reference point fixed in
advance: error 1 and the params budget). Each method runs ``--seeds`` times (sampler seeds
``--first-seed``.., default 0..: tune a change on seeds the reported figures do not use); the
data split is the same for all. Prints a per-run table and the mean (sd) of each
method; writes every finished trial as CSV, a plot, and ``--json-out``
(docs/results/search_quality-<space>.json) with ``hv_ratio_vs_best_peer`` (ours over the
best peer's mean hypervolume at the wall time), ``time_to_best_peer_hv_ratio`` (the time our
mean curve takes to reach the best peer's mean final hypervolume over the time the peer's own
takes; < 1 is faster; null if never), ``hv_ratio_ci95`` (that ratio's 95% bootstrap interval
over the seeds: how far the seeds' spread leaves it open), ``peers``, ``seeds`` and the
per-method figures, among them ``hv_pooled`` (the hypervolume of all its searches' trials
together: the front N times the compute finds, a yardstick for how much one search could
still gain at this fidelity) and ``hv_pooled_all`` (every method's trials together). The
LAST line printed is the same JSON.

    .venv/bin/python bench/search_quality.py --quick          # ~3-minute smoke check
    .venv/bin/python bench/search_quality.py                  # 5 methods x 5 seeds x 45 s: ~19 min
    .venv/bin/python bench/search_quality.py --methods sparse-search \\
        --ours 'search.early_stopping={scheduler: moasha}'   # try a change against the peers
    .venv/bin/python bench/search_quality.py --first-seed 5 --methods sparse-search,optuna-tpe \\
        --json-out /tmp/s5-9.json                              # five more seeds of ours and TPE
    .venv/bin/python bench/search_quality.py --combine \\
        docs/results/search_quality-tiny-mnist.json /tmp/s5-9.json   # the ten seeds together
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/search_quality.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_SPACE = REPO_ROOT / "spaces" / "studies" / "tiny-mnist.yaml"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "mnist.npz"
RESULTS = REPO_ROOT / "docs" / "results"
OURS = "sparse-search"
MOREA = "syne-tune-morea"
PEERS = ("random", "optuna-tpe", "optuna-nsga2", MOREA)
METHODS = (OURS, *PEERS)
# The default run and --quick. A small batch, so that tiny nets learn in the few optimizer
# steps a CPU budget allows (3,000 images x 1 epoch at 128 leave a 2k-param net near chance).
# 45 s of 1-epoch trials on 2,700 images: ~100-150 trained trials per search, enough that
# five seeds resolve a 1.2x difference (the per-seed sd was ~0.02-0.04 on a mean of ~0.27).
DEFAULT_SIZE = {"wall": 45, "subset": 3000, "test_subset": 2000, "epochs": 1,
                "batch_size": 32, "seeds": 5}
QUICK_SIZE = {"wall": 20, "subset": 1500, "test_subset": 1000, "epochs": 1,
              "batch_size": 32, "seeds": 1}
MAX_TRIALS = 10_000  # num_samples: the wall time ends every search first


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial of one search."""

    seconds: float  # since that search started (wall time)
    test_error: float  # 1 - test accuracy; NaN for a failed trial
    nonzero_params: float  # of the trained model; NaN for a failed trial


@dataclass(frozen=True)
class RunResult:
    """One search: a method at one seed."""

    method: str
    seed: int
    wall_seconds: float  # until its last trial ended (the trials in flight at --wall finish)
    points: tuple[TrialPoint, ...]  # in completion order
    rejected: int  # proposals screened out without training

    def trained(self) -> int:
        return sum(1 for p in self.points if not math.isnan(p.test_error))

    def failed(self) -> int:
        return len(self.points) - self.trained()


# ---------------------------------------------------------------------- curves (pure)
def hv_curve(points: Sequence[TrialPoint], *, max_params: int) -> list[tuple[float, float]]:
    """(seconds, hypervolume of every point finished by then), one step per finished trial."""
    from search.rundir.pareto import hypervolume_2d

    done = sorted(points, key=lambda p: p.seconds)
    return [(p.seconds, hypervolume_2d([q.test_error for q in done[:i + 1]],
                                       [q.nonzero_params for q in done[:i + 1]],
                                       max_params_ref=max_params))
            for i, p in enumerate(done)]


def hv_at(curve: Sequence[tuple[float, float]], t: float) -> float:
    """The step curve's value at time ``t`` (0 before the first finished trial)."""
    value = 0.0
    for s, hv in curve:
        if s > t:
            break
        value = hv
    return value


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The mean over seeds as a step curve, with a step wherever any seed's curve steps."""
    times = sorted({s for c in curves for s, _ in c})
    return [(t, sum(hv_at(c, t) for c in curves) / len(curves)) for t in times]


def time_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """First time the curve is >= ``target`` (within float noise); None if it never is."""
    for s, hv in curve:
        if hv >= target - 1e-12:
            return s
    return None


# ---------------------------------------------------------------------- the spec
def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data['a']['b'] = value`` for ``a.b`` (the raw YAML mapping, before validation)."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"{dotted}: {key} is not a mapping in the space")
    node[leaf] = value


def bench_spec(space: Path, *, data: Path, wall: int, subset: int, test_subset: int,
               epochs: int, batch_size: int, seed: int, concurrent: int, cpus: float,
               method: str, ours: Sequence[tuple[str, Any]] = (),
               every: Sequence[tuple[str, Any]] = ()) -> Any:
    """The space at the benchmark's size for one method (``every``: changes to the space for
    all methods, ``ours``: for sparse-search's only); the spec's validation applies."""
    import yaml

    from search.spec import parse_spec

    raw = yaml.safe_load(space.read_text())
    for dotted, value in every:
        set_dotted(raw, dotted, value)
    search = raw.setdefault("search", {})
    search["max_concurrent"] = concurrent
    search.pop("initial", None)  # no seed networks: the strategies start from nothing
    if method == OURS:
        for dotted, value in ours:
            set_dotted(raw, dotted, value)
    else:
        search.pop("early_stopping", None)
        # Their own sampler replaces ours (peer_proposals); no children of ours either.
        search["sampler"] = "tpe"
        search.pop("lamarckian", None)
        if isinstance(search.get("fill_budget"), dict):
            # The fill fraction is a dimension of the space: the peers' samplers draw it
            # too; giving each size band its share of trials is sparse-search's.
            search["fill_budget"] = {**search["fill_budget"], "bands": 1}
    raw["name"] = f"search-quality-{method}-s{seed}"
    raw["data"] = {**raw["data"], "path": str(data.resolve()), "subset": subset,
                   "test_subset": test_subset, "seed": 0}
    raw["train"] = {**raw.get("train", {}), "epochs": epochs, "batch_size": batch_size}
    raw["resources"] = {"cpu": cpus / concurrent, "gpu": 0}
    spec = parse_spec(raw, source=str(space), num_samples=MAX_TRIALS, seed=seed,
                      time_budget=float(wall))
    if spec.constraints.max_params is None:
        raise ValueError(f"{space}: constraints.max_params is null: the benchmark needs a budget")
    return spec


# ---------------------------------------------------------------------- the peers
def peer_sampler(method: str, seed: int) -> Any:
    import optuna

    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if method == "optuna-tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if method == "optuna-nsga2":
        return optuna.samplers.NSGAIISampler(population_size=10, seed=seed)
    if method == MOREA:  # draws only what MOREA's config leaves open (nothing, in practice)
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"{method=} must be one of {PEERS}")


def syne_tune_space(space: Any, n: int = 400, seed: int = 0) -> dict[str, Any]:
    """The space as a Syne Tune config space: every Optuna parameter ``n`` random proposals
    touch (the conditional ones too: a config names them all, a trial uses what applies),
    with its range and scale."""
    import optuna
    from syne_tune import config_space as cs

    from search.space.suggest import FILL_FRACTION, suggest

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    found: dict[str, Any] = {}
    fill = space.spec.search.fill_budget
    for _ in range(n):  # the parameters only, not screened: ~1 ms each, inside the wall time
        trial = study.ask()
        space.suggest_arch(trial)
        space.suggest_train(trial)
        if fill is not None:
            suggest(trial, FILL_FRACTION, fill.fraction)
        found.update(trial.distributions)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    out: dict[str, Any] = {}
    for name, d in sorted(found.items()):
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = cs.choice(list(d.choices))
        elif isinstance(d, optuna.distributions.IntDistribution):
            out[name] = (cs.lograndint(d.low, d.high) if d.log else
                         cs.randint(d.low, d.high) if d.step == 1 else
                         cs.choice(list(range(d.low, d.high + 1, d.step))))
        else:
            out[name] = cs.loguniform(d.low, d.high) if d.log else cs.uniform(d.low, d.high)
    return out


@contextlib.contextmanager
def peer_proposals(method: str) -> Iterator[None]:
    """Inside: the driver's searcher asks its proposals as an Optuna user would for ``method``:
    its stock sampler, and a screened-out proposal told PRUNED (its constraint set), never
    trained. The screen, the duplicate check and everything else are the driver's own."""
    from optuna.trial import TrialState

    import search.run.searcher as searcher
    from search.space.proposer import Proposer

    class PeerProposer(Proposer):
        def __init__(self, space: Any, **kw: Any) -> None:
            super().__init__(space, **kw)
            self.study.sampler = peer_sampler(method, kw["seed"] + len(self.study.trials))

        def _reject(self, trial: Any, proposal: Any, streak: list) -> None:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.rejected += 1
            streak.append(proposal)

    class MoreaProposer(PeerProposer):
        """Syne Tune's multi-objective regularized evolution proposes every config (enqueued
        into the Optuna study, so the driver's screen and duplicate check are the same), and
        hears every trained trial's objectives, each to be minimised."""

        def __init__(self, space: Any, **kw: Any) -> None:
            super().__init__(space, **kw)
            import numpy as np
            from syne_tune.optimizer.schedulers.multiobjective import (
                MultiObjectiveRegularizedEvolution,
            )

            np.random.seed(kw["seed"])  # its random start-up draws from numpy's global state
            self.morea = MultiObjectiveRegularizedEvolution(
                syne_tune_space(space, seed=kw["seed"]), population_size=10, sample_size=5,
                random_seed=kw["seed"])

        def _queue_next(self) -> None:
            if not any(t.state == TrialState.WAITING
                       for t in self.study.get_trials(deepcopy=False)):
                self.study.enqueue_trial(self.morea.suggest())

        def tell(self, number: int, values: Any) -> None:
            super().tell(number, values)
            trial = self.study.get_trials(deepcopy=False)[number]
            config = trial.system_attrs.get("fixed_params")
            if config is not None and trial.values is not None:
                signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in self.study.directions]
                self.morea.on_trial_complete(number, dict(config),
                                             [s * v for s, v in zip(signs, trial.values, strict=True)])

    saved = searcher.Proposer
    searcher.Proposer = MoreaProposer if method == MOREA else PeerProposer
    try:
        yield
    finally:
        searcher.Proposer = saved


def run_one(spec: Any, storage: Path, method: str) -> RunResult:
    """One search in-process; trial end times are its result.json write times."""
    from search.run.driver import run_search

    start = time.time()
    with peer_proposals(method) if method != OURS else contextlib.nullcontext():
        outcome = run_search(spec, storage_dir=storage, mlflow=False, progress=False)
    wall = time.time() - start
    points = []
    for path in sorted((outcome.run_dir / "trials").glob("*/result.json")):
        rec = json.loads(path.read_text())
        m = rec["metrics"]
        ok = rec["status"] == "TERMINATED" and "test_accuracy" in m
        points.append(TrialPoint(
            seconds=path.stat().st_mtime - start,
            test_error=1.0 - m["test_accuracy"] if ok else math.nan,
            nonzero_params=float(m["nonzero_params"]) if ok else math.nan))
    return RunResult(method, spec.search.seed, wall,
                     tuple(sorted(points, key=lambda p: p.seconds)),
                     rejected=int(outcome.summary["rejected"]))


# ---------------------------------------------------------------------- report
def pooled_hv(runs: Sequence[RunResult], *, max_params: int, wall: float) -> float:
    """The hypervolume of every trial the ``runs`` finished by ``wall``, pooled."""
    from search.rundir.pareto import hypervolume_2d

    done = [p for r in runs for p in r.points if p.seconds <= wall]
    return hypervolume_2d([p.test_error for p in done], [p.nonzero_params for p in done],
                          max_params_ref=max_params)


def ratio_ci95(ours: Sequence[float], peer: Sequence[float], *, draws: int = 10_000,
               seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(ours) / mean(peer), the seeds of each
    resampled with replacement (the searches are independent)."""
    import random

    rng = random.Random(seed)
    ratios = sorted(statistics.fmean(rng.choices(ours, k=len(ours)))
                    / statistics.fmean(rng.choices(peer, k=len(peer))) for _ in range(draws))
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def versus_best_peer(per_seed: dict[str, Sequence[float]]) -> dict[str, Any]:
    """Ours against the peer with the highest mean hypervolume (``per_seed``: each method's
    per-seed values, ours among them): ``best_peer``, ``hv_ratio_vs_best_peer`` and its
    ``hv_ratio_ci95``; empty without ours or a peer."""
    peers = [m for m in per_seed if m != OURS]
    if OURS not in per_seed or not peers:
        return {}
    best = max(peers, key=lambda m: statistics.fmean(per_seed[m]))
    target = statistics.fmean(per_seed[best])
    return {"best_peer": best,
            "hv_ratio_vs_best_peer": statistics.fmean(per_seed[OURS]) / target if target else None,
            "hv_ratio_ci95": ratio_ci95(per_seed[OURS], per_seed[best]) if target else None}


def summarize(runs: Sequence[RunResult], *, max_params: int, wall: float,
              methods: Sequence[str]) -> tuple[dict[str, Any], dict[str, list]]:
    """Per method: mean / sd of the hypervolume at ``wall``; ours against the best peer."""
    curves = {m: [[(s, h) for s, h in hv_curve(r.points, max_params=max_params) if s <= wall]
                  for r in runs if r.method == m] for m in methods}
    at_wall = {m: [hv_at(c, wall) for c in cs] for m, cs in curves.items()}
    means = {m: mean_curve(cs) for m, cs in curves.items()}

    def stats(m: str) -> dict[str, Any]:
        vs = at_wall[m]
        mine = [r for r in runs if r.method == m]
        return {"hv_mean": statistics.fmean(vs), "hv_sd": statistics.stdev(vs) if len(vs) > 1
                else 0.0, "hv_per_seed": vs,
                "trained_mean": statistics.fmean(sum(p.seconds <= wall for p in r.points
                                                     if not math.isnan(p.test_error))
                                                 for r in mine),
                "screened_out_mean": statistics.fmean(r.rejected for r in mine),
                "hv_pooled": pooled_hv(mine, max_params=max_params, wall=wall)}

    per = {m: stats(m) for m in methods}
    peers = [m for m in methods if m != OURS]
    result: dict[str, Any] = {"peers": peers, "methods": per,
                              "hv_pooled_all": pooled_hv(runs, max_params=max_params, wall=wall)}
    versus = versus_best_peer({m: per[m]["hv_per_seed"] for m in methods})
    if versus:
        best = versus["best_peer"]
        target = per[best]["hv_mean"]
        ours_t, peer_t = time_to_reach(means[OURS], target), time_to_reach(means[best], target)
        result |= versus | {
            "time_to_best_peer_hv_ratio": None if ours_t is None or not peer_t
            else ours_t / peer_t,
            "hv_ratio_vs": {m: per[OURS]["hv_mean"] / per[m]["hv_mean"]
                            for m in peers if per[m]["hv_mean"]},
        }
    return result, means


def table(runs: Sequence[RunResult], *, max_params: int, wall: float) -> str:
    lines = [f"{'method':<14}{'seed':>5}{'wall s':>9}{'trained':>9}{'no test':>9}"
             f"{'screened out':>14}{'best test acc':>15}{'HV at wall':>12}"]
    for r in runs:
        best = max((1 - p.test_error for p in r.points
                    if p.nonzero_params <= max_params and p.seconds <= wall), default=math.nan)
        hv = hv_at(hv_curve(r.points, max_params=max_params), wall)
        lines.append(f"{r.method:<14}{r.seed:>5}{r.wall_seconds:>9.1f}{r.trained():>9}"
                     f"{r.failed():>9}{r.rejected:>14}{best:>15.4f}{hv:>12.4f}")
    return "\n".join(lines)


def write_csv(runs: Sequence[RunResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["method", "seed", "seconds", "test_accuracy", "nonzero_params"])
        for r in runs:
            for p in r.points:
                trained = not math.isnan(p.test_error)
                w.writerow([r.method, r.seed, f"{p.seconds:.2f}",
                            f"{1 - p.test_error:.4f}" if trained else "",
                            int(p.nonzero_params) if trained else ""])


def plot(means: dict[str, list[tuple[float, float]]], path: Path, *, wall: float,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, c in means.items():
        xs, ys = [0, *[s for s, _ in c], wall], [0, *[h for _, h in c], c[-1][1] if c else 0]
        ax.step(xs, ys, where="post", lw=2.5 if m == OURS else 1.5, label=f"{m} (mean of seeds)")
    ax.set_xlabel("wall time since the search started (s)")
    ax.set_ylabel("hypervolume (test error, log10 params)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def combine(paths: Sequence[Path]) -> dict[str, Any]:
    """Runs' JSON files (same space and size, other seeds) as one run's figures: each method's
    per-seed hypervolumes joined, ours against the best peer over all of them."""
    docs = [json.loads(p.read_text()) for p in paths]
    size = ("space", "wall", "subset", "test_subset", "epochs", "batch_size", "concurrent",
            "cpus", "space_changes", "ours_changes")
    for p, d in zip(paths[1:], docs[1:], strict=True):
        differ = [k for k in size if d.get(k) != docs[0].get(k)]
        if differ:
            raise ValueError(f"{p}: {differ} differ from {paths[0]}'s: not one benchmark")
    seeds = [list(range(d.get("first_seed", 0), d.get("first_seed", 0) + d["seeds"]))
             for d in docs]
    flat = [s for ss in seeds for s in ss]
    if len(set(flat)) != len(flat):
        raise ValueError(f"seeds {seeds} overlap: the runs would count a search twice")
    methods = [m for m in docs[0]["methods"] if all(m in d["methods"] for d in docs)]
    per = {m: [v for d in docs for v in d["methods"][m]["hv_per_seed"]] for m in methods}
    return {"combined": [str(p) for p in paths], "seeds": flat,
            "hv_mean": {m: statistics.fmean(v) for m, v in per.items()}, **versus_best_peer(per)}


# ---------------------------------------------------------------------- main
def parse_changes(flag: str, items: Sequence[str]) -> list[tuple[str, Any]]:
    import yaml

    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=YAML, e.g. "
                             "'search.early_stopping={scheduler: moasha}'")
        out.append((key, yaml.safe_load(value)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search space YAML")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="the space's dataset file (default: MNIST .npz, Keras layout)")
    helps = {"wall": "wall seconds per search", "subset": "train+val images",
             "test_subset": "test images", "epochs": "epochs per trial",
             "batch_size": "images per step", "seeds": "searches per method"}
    for name, text in helps.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int,
                        help=f"{text} (default {DEFAULT_SIZE[name]}, --quick {QUICK_SIZE[name]})")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="the first sampler seed (default 0): seeds first..first+seeds-1")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at once (default 2)")
    ap.add_argument("--cpus", type=float, default=2.0, help="CPUs shared by those trials")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)} (default: all)")
    ap.add_argument("--ours", action="append", default=[], metavar="KEY=YAML",
                    help="change sparse-search's spec (dotted key, YAML value); repeatable")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=YAML", dest="every",
                    help="change the space for every method (dotted key, YAML value); "
                    "repeatable")
    ap.add_argument("--quick", action="store_true", help="a ~3-minute smoke check")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                    help="run nothing: the figures of these runs' JSON files (same size, other "
                    "seeds) taken together, ours against the best peer over all their seeds")
    ap.add_argument("--json-out", type=Path, help="default docs/results/search_quality-"
                    "<space>.json (--quick, --set, --ours, --methods or --first-seed: not written "
                    "unless given)")
    ap.add_argument("--csv", type=Path, help="every finished trial (default: beside --json-out)")
    args = ap.parse_args(argv)
    if args.combine:
        try:
            print(json.dumps(combine(args.combine)))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: --combine: {e}", file=sys.stderr)
            return 2
        return 0
    base = QUICK_SIZE if args.quick else DEFAULT_SIZE
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        print(f"error: --methods {args.methods!r}: expected some of {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    for name, v in [*size.items(), ("concurrent", args.concurrent)]:
        if v < 1:
            print(f"error: --{name.replace('_', '-')}={v} must be >= 1", file=sys.stderr)
            return 2
    if args.first_seed < 0:
        print(f"error: --first-seed={args.first_seed} must be >= 0", file=sys.stderr)
        return 2
    if not args.data.is_file():
        print(f"error: no dataset at {args.data}: pass --data PATH", file=sys.stderr)
        return 2
    if MOREA in methods:
        import importlib.util

        if importlib.util.find_spec("syne_tune") is None:
            print(f"error: --methods has {MOREA}, which needs Syne Tune: pip install -e '.[bench]'"
                  f" (or leave it out: --methods {','.join(m for m in methods if m != MOREA)})",
                  file=sys.stderr)
            return 2
    official = not (args.quick or args.ours or args.every or args.first_seed
                    or args.methods != ",".join(METHODS))
    json_out = args.json_out or (RESULTS / f"search_quality-{args.space.stem}.json"
                                 if official else None)

    from search.errors import UserError
    from search.run.ray_runtime import init_ray

    seeds, wall = size.pop("seeds"), size["wall"]
    seed_list = range(args.first_seed, args.first_seed + seeds)
    try:
        ours, every = parse_changes("--ours", args.ours), parse_changes("--set", args.every)
        specs = {(m, s): bench_spec(args.space, method=m, seed=s, data=args.data,
                                    concurrent=args.concurrent, cpus=args.cpus, ours=ours,
                                    every=every, **size)
                 for s in seed_list for m in methods}
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_params = specs[(methods[0], seed_list[0])].constraints.max_params
    print(f"space {args.space.name}: budget {max_params:,} params; {len(methods)} methods x "
          f"{seeds} seeds ({seed_list[0]}-{seed_list[-1]}) x {wall} s; data subset {size['subset']}, test {size['test_subset']}, "
          f"{size['epochs']} epoch(s), batch {size['batch_size']}; {args.concurrent} trials at "
          f"once on {args.cpus:g} CPUs" + (f"; all: {args.every}" if args.every else "")
          + (f"; ours: {args.ours}" if args.ours else ""),
          flush=True)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    init_ray(num_cpus=math.ceil(args.cpus))
    runs: list[RunResult] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="search-quality-") as tmp:
        for s in seed_list:  # seeds outermost: a drift in the machine's speed hits all
            for m in methods:
                run = run_one(specs[(m, s)], Path(tmp) / f"{m}-{s}", m)
                runs.append(run)
                hv = hv_at(hv_curve(run.points, max_params=max_params), wall)
                print(f"  {m:<14} seed {s}: {run.wall_seconds:6.1f} s, {run.trained()} trained,"
                      f" {run.rejected} screened out, HV at {wall} s {hv:.4f}", flush=True)
    result, means = summarize(runs, max_params=max_params, wall=wall, methods=methods)
    print()
    print(table(runs, max_params=max_params, wall=wall))
    print()
    for m in methods:
        r = result["methods"][m]
        print(f"{m:<14} HV at {wall} s: mean {r['hv_mean']:.4f} (sd {r['hv_sd']:.4f}), "
              f"{r['trained_mean']:.1f} trained, {r['screened_out_mean']:.1f} screened out")
    if "best_peer" in result:
        lo, hi = result["hv_ratio_ci95"] or (math.nan, math.nan)
        print(f"ours / best peer ({result['best_peer']}): HV {result['hv_ratio_vs_best_peer']:.3f}"
              f"x (95% bootstrap over seeds {lo:.3f}-{hi:.3f}); time to its HV: "
              f"{result['time_to_best_peer_hv_ratio']}")
    print("pooled hypervolume (all seeds' trials together): " + ", ".join(
        f"{m} {result['methods'][m]['hv_pooled']:.4f}" for m in methods)
        + f"; all methods {result['hv_pooled_all']:.4f}")
    result |= {"space": args.space.name, "seeds": seeds, "first_seed": args.first_seed, **size, "concurrent": args.concurrent,
               "cpus": args.cpus, "space_changes": args.every, "ours_changes": args.ours,
               "minutes": round((time.time() - started) / 60, 1)}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        csv_out = args.csv or json_out.with_suffix(".csv")
        write_csv(runs, csv_out)
        plot(means, json_out.with_suffix(".png"), wall=wall,
             title=f"{args.space.name}: {seeds} seeds x {wall} s, data subset {size['subset']}, "
                   f"{size['epochs']} epoch(s), budget {max_params:,}")
        print(f"wrote {json_out}, {csv_out} and {json_out.with_suffix('.png')}")
    elif args.csv:
        write_csv(runs, args.csv)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
