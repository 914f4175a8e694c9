"""Search quality on real MNIST: hypervolume against wall time, sparse-search vs two baselines.

Three ways to search the same space (default spaces/studies/tiny-mnist.yaml: tiny CNNs under a
3,500-param budget) with the same trainable, data, epochs, trials and resources:

- ``sparse-search``: ``search.run.driver.run_search`` as ``sparse-search run`` runs it: the Proposer's
  TPE with the budget screen (each proposal is built on the meta device and counted, ~80 ms on
  a 2-core machine; over-budget shapes are told to Optuna as infeasible and never trained),
  Ray Tune underneath;
- ``random``: Ray Tune + ``OptunaSearch`` with a ``RandomSampler`` over the same define-by-run
  space (Ray's own random search cannot express its conditionals), WITHOUT the screen: an
  over-budget config is trained like any other and then counts as infeasible;
- ``optuna``: stock Ray Tune ``OptunaSearch`` with Optuna's default ``TPESampler``; each trial
  carries its params excess as an Optuna constraint (``Trial.set_constraint``, the count a user
  would take from the built model), but TPE only reads the constraints of COMPLETE trials and
  ``OptunaSearch`` has no way to skip a suggestion: every config is trained, and the budget is
  learned only from trials that finished training.

Quality is the hypervolume of the (test error, log10 nonzero params) front of the finished,
within-budget trials (``search.rundir.pareto.hypervolume_2d``, reference: the budget; an over-budget
trial adds nothing), recorded each time a trial finishes, against wall time since that
method's search started (its own data loading, Tuner start and training; one Ray runtime,
started before any method, is shared). Each method runs ``--seeds`` times (sampler seeds 0..).

Prints a per-run table, the mean final hypervolume of each method, the ratios, and the time
each method's mean curve takes to reach random search's mean final hypervolume; writes a plot
(``--out``) and every finished trial as CSV (``--csv``). The LAST line is JSON with
``hv_ratio_vs_random``, ``hv_ratio_vs_optuna`` and ``time_to_random_hv_ratio`` (sparse-search's
time to reach random's final hypervolume / random's own; < 1 is faster; null if never reached).

    .venv/bin/python bench/search_quality.py --quick     # ~2-minute smoke check
    .venv/bin/python bench/search_quality.py             # ~15 minutes on 2 idle cores
    .venv/bin/python bench/search_quality.py --trials 40 --subset 12000 --epochs 2 --seeds 5
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/search_quality.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_SPACE = REPO_ROOT / "spaces" / "studies" / "tiny-mnist.yaml"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "mnist.npz"
DEFAULT_OUT = REPO_ROOT / "docs" / "results" / "search_quality.png"
DEFAULT_CSV = REPO_ROOT / "docs" / "results" / "search_quality.csv"
METHODS = ("sparse-search", "random", "optuna")
# The default run and --quick. A small batch, so that tiny nets learn in the few optimizer
# steps a CPU budget allows (3,000 images x 1 epoch at 128 leave a 2k-param net near chance).
DEFAULT_SIZE = {"trials": 16, "subset": 6000, "test_subset": 2000, "epochs": 2,
                "batch_size": 32, "seeds": 3}
QUICK_SIZE = {"trials": 6, "subset": 1500, "test_subset": 1000, "epochs": 1,
              "batch_size": 32, "seeds": 1}
CONFIG_KEY = "flat_config"  # baselines: the flat arch/train config travels as one JSON string


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
    wall_seconds: float
    points: tuple[TrialPoint, ...]  # in completion order
    rejected: int  # proposals screened out without training (sparse-search only)

    def trained(self) -> int:
        return sum(1 for p in self.points if not math.isnan(p.test_error))

    def failed(self) -> int:
        return len(self.points) - self.trained()

    def over_budget(self, max_params: int) -> int:
        return sum(1 for p in self.points if p.nonzero_params > max_params)


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
def bench_spec(space: Path, *, data: Path, trials: int, subset: int, test_subset: int,
               epochs: int, batch_size: int, seed: int, concurrent: int, cpus: float,
               method: str) -> Any:
    """The study space with the benchmark's size; every method gets the same one."""
    from search.spec import load_spec

    spec = load_spec(space, num_samples=trials, seed=seed)
    if spec.constraints.max_params is None:
        raise ValueError(f"{space}: constraints.max_params is null: the benchmark needs a budget")
    search = dataclasses.replace(spec.search, max_concurrent=concurrent, early_stopping=None)
    if method != "sparse-search":
        search = dataclasses.replace(search, fill_budget=None)  # filling needs the screen
    return dataclasses.replace(
        spec,
        name=f"search-quality-{method}-s{seed}",
        data=spec.data.replace(path=str(data.resolve()), subset=subset, test_subset=test_subset,
                               seed=0),
        train={**spec.train, "epochs": epochs, "batch_size": batch_size},
        search=search,
        resources=dataclasses.replace(spec.resources, cpu=cpus / concurrent, gpu=0.0),
    )


# ---------------------------------------------------------------------- (a) sparse-search
def run_sparse_search(spec: Any, storage: Path) -> RunResult:
    """``sparse-search run`` in-process; trial end times are its result.json write times."""
    from search.run.driver import run_search

    start = time.time()
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
    return RunResult("sparse-search", spec.search.seed, wall,
                     tuple(sorted(points, key=lambda p: p.seconds)),
                     rejected=int(outcome.summary["rejected"]))


# ---------------------------------------------------------------------- (b), (c) stock Tune
class DefineByRun:
    """OptunaSearch's define-by-run space: the same suggestions as sparse-search, no screen.

    Returns the flat config as one JSON string: OptunaSearch unflattens "/" keys, and
    ``arch/stem`` (a flag) next to ``arch/stem/width`` cannot be unflattened. A sampled
    combination that makes no valid network goes out as ``{}``: the trial then fails on its
    worker, as it would in any search without a screen. With ``max_params``, the trial's
    relative params excess is set as its Optuna constraint (> 0: over budget).
    """

    def __init__(self, space: Any, *, max_params: int | None = None) -> None:
        self.space, self.max_params = space, max_params

    def __call__(self, trial: Any) -> dict[str, Any]:
        proposal = self.space.sample(trial)
        if self.max_params is not None and proposal.screened_params is not None:
            trial.set_constraint("max_params",
                                 (proposal.screened_params - self.max_params) / self.max_params)
        return {CONFIG_KEY: json.dumps(proposal.config)}


class FinishTimes(Callback):
    """A Ray Tune callback in the driver: when each trial ended and what it reported last."""

    def __init__(self) -> None:
        self.start = time.time()
        self.points: list[TrialPoint] = []

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        ok = "test_accuracy" in r
        self.points.append(TrialPoint(time.time() - self.start,
                                      1.0 - r["test_accuracy"] if ok else math.nan,
                                      float(r["nonzero_params"]) if ok else math.nan))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.points.append(TrialPoint(time.time() - self.start, math.nan, math.nan))


def stock_trial(config: dict[str, Any], splits: Any) -> None:
    """The project's trainable, fed the flat config the define-by-run space serialised."""
    from trainables.trial import train_trial

    train_trial(json.loads(config[CONFIG_KEY]), splits)


def run_stock(spec: Any, storage: Path, *, method: str) -> RunResult:
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from search.run.ray_runtime import TUNE_ENV, scoped_env
    from search.space import SearchSpace
    from trainables.data import load_dataset

    timer = FinishTimes()
    splits = load_dataset(spec.data)
    space = SearchSpace(spec, input_shape=splits.input_shape, num_classes=splits.num_classes)
    metrics = [o.metric for o in spec.objectives]
    seed = spec.search.seed
    if method == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
        define_by_run = DefineByRun(space)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
        define_by_run = DefineByRun(space, max_params=spec.constraints.max_params)
    searcher = OptunaSearch(space=define_by_run, metric=metrics,
                            mode=[o.mode for o in spec.objectives], sampler=sampler)
    trainable = tune.with_resources(tune.with_parameters(stock_trial, splits=splits),
                                    {"cpu": spec.resources.cpu, "gpu": 0})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent),
            num_samples=spec.search.num_samples, reuse_actors=True),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(storage), verbose=0, callbacks=[timer],
            failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    # The Tune settings run_search uses (no per-result CSV/JSON/TensorBoard loggers, quiet
    # output): without them the baselines would pay for logging that sparse-search skips.
    with scoped_env(TUNE_ENV):
        tuner.fit()
    return RunResult(method, seed, time.time() - timer.start,
                     tuple(sorted(timer.points, key=lambda p: p.seconds)), rejected=0)


# ---------------------------------------------------------------------- report
def summarize(runs: Sequence[RunResult], *, max_params: int
              ) -> tuple[dict[str, Any], dict[str, list[tuple[float, float]]]]:
    """Mean final hypervolumes, ratios and times to random's final hypervolume; mean curves."""
    curves = {m: [hv_curve(r.points, max_params=max_params) for r in runs if r.method == m]
              for m in METHODS}
    final = {m: sum(c[-1][1] if c else 0.0 for c in cs) / len(cs) for m, cs in curves.items()}
    means = {m: mean_curve(cs) for m, cs in curves.items()}
    target = final["random"]
    reach = {m: time_to_reach(means[m], target) for m in METHODS}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    return {
        "hv_ratio_vs_random": ratio(final["sparse-search"], final["random"]),
        "hv_ratio_vs_optuna": ratio(final["sparse-search"], final["optuna"]),
        "time_to_random_hv_ratio": ratio(reach["sparse-search"], reach["random"]),
        "final_hv": final,
        "seconds_to_random_hv": reach,
        "mean_wall_seconds": {m: sum(r.wall_seconds for r in runs if r.method == m)
                              / max(1, sum(r.method == m for r in runs)) for m in METHODS},
    }, means


def table(runs: Sequence[RunResult], *, max_params: int) -> str:
    lines = [f"{'method':<14}{'seed':>5}{'wall s':>9}{'trained':>9}{'over budget':>13}"
             f"{'failed':>8}{'screened out':>14}{'best test acc':>15}{'final HV':>10}"]
    for r in runs:
        ok = [p for p in r.points if p.nonzero_params <= max_params]
        best = max((1 - p.test_error for p in ok), default=math.nan)
        curve = hv_curve(r.points, max_params=max_params)
        lines.append(f"{r.method:<14}{r.seed:>5}{r.wall_seconds:>9.1f}{r.trained():>9}"
                     f"{r.over_budget(max_params):>13}{r.failed():>8}{r.rejected:>14}"
                     f"{best:>15.4f}{(curve[-1][1] if curve else 0.0):>10.4f}")
    return "\n".join(lines)


def write_csv(runs: Sequence[RunResult], path: Path, *, max_params: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["method", "seed", "seconds", "test_accuracy", "nonzero_params", "within_budget"])
        for r in runs:
            for p in r.points:
                trained = not math.isnan(p.test_error)
                w.writerow([r.method, r.seed, f"{p.seconds:.2f}",
                            f"{1 - p.test_error:.4f}" if trained else "",
                            int(p.nonzero_params) if trained else "",
                            trained and p.nonzero_params <= max_params])


def plot(runs: Sequence[RunResult], means: dict[str, list[tuple[float, float]]], path: Path, *,
         max_params: int, target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sparse-search": "tab:blue", "random": "tab:gray", "optuna": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        c = hv_curve(r.points, max_params=max_params)
        if c:
            ax.step([0, *[s for s, _ in c]], [0, *[h for _, h in c]], where="post",
                    color=colors[r.method], alpha=0.25, lw=0.8)
    for m, c in means.items():
        if c:
            ax.step([0, *[s for s, _ in c]], [0, *[h for _, h in c]], where="post",
                    color=colors[m], lw=2, label=f"{m} (mean of seeds)")
    ax.axhline(target, color="tab:gray", ls="--", lw=0.8, label="random: final mean HV")
    ax.set_xlabel("wall time since the search started (s)")
    ax.set_ylabel("hypervolume (test error, log10 params)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search space YAML")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MNIST npz (Keras layout)")
    helps = {"trials": "trained trials per search", "subset": "train+val images",
             "test_subset": "test images", "epochs": "epochs per trial",
             "batch_size": "images per step", "seeds": "searches per method (seeds 0..)"}
    for name, text in helps.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int,
                        help=f"{text} (default {DEFAULT_SIZE[name]}, --quick {QUICK_SIZE[name]})")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at once (default 2)")
    ap.add_argument("--cpus", type=float, default=2.0, help="CPUs shared by those trials")
    ap.add_argument("--quick", action="store_true", help="a ~2-minute smoke check")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="plot (png)")
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="every finished trial (csv)")
    args = ap.parse_args(argv)
    base = QUICK_SIZE if args.quick else DEFAULT_SIZE
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    for name, v in [*size.items(), ("concurrent", args.concurrent)]:
        if v < 1:
            print(f"error: --{name.replace('_', '-')}={v} must be >= 1", file=sys.stderr)
            return 2
    if not args.data.is_file():
        print(f"error: MNIST not found at {args.data} (a Keras-layout .npz with x_train, y_train, "
              "x_test, y_test as uint8): pass --data PATH", file=sys.stderr)
        return 2

    from search.errors import UserError
    from search.run.ray_runtime import init_ray

    seeds = size.pop("seeds")
    try:
        specs = {(m, s): bench_spec(args.space, method=m, seed=s, data=args.data,
                                    concurrent=args.concurrent, cpus=args.cpus, **size)
                 for s in range(seeds) for m in METHODS}
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_params = specs[(METHODS[0], 0)].constraints.max_params
    trials, subset, epochs = size["trials"], size["subset"], size["epochs"]
    print(f"space {args.space.name}: budget {max_params:,} params; {trials} trials x "
          f"{len(METHODS)} methods x {seeds} seeds; MNIST subset {subset}, test "
          f"{size['test_subset']}, {epochs} epoch(s), batch {size['batch_size']}; "
          f"{args.concurrent} trials at once on {args.cpus:g} CPUs", flush=True)
    warnings.filterwarnings("ignore", message=".*Define-by-run function.*")
    init_ray(num_cpus=math.ceil(args.cpus))
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="search-quality-") as tmp:
        for s in range(seeds):
            for m in METHODS:
                spec, storage = specs[(m, s)], Path(tmp) / f"{m}-{s}"
                run = (run_sparse_search(spec, storage) if m == "sparse-search"
                       else run_stock(spec, storage, method=m))
                runs.append(run)
                print(f"  {m:<14} seed {s}: {run.wall_seconds:6.1f} s, {run.trained()} trained, "
                      f"{run.over_budget(max_params)} over budget, {run.failed()} failed, "
                      f"{run.rejected} screened out", flush=True)
    result, means = summarize(runs, max_params=max_params)
    print()
    print(table(runs, max_params=max_params))
    print()
    for m in METHODS:
        t = result["seconds_to_random_hv"][m]
        print(f"{m:<14} mean final HV {result['final_hv'][m]:.4f}   mean wall "
              f"{result['mean_wall_seconds'][m]:6.1f} s   reaches random's final HV "
              + ("never" if t is None else f"after {t:.1f} s"))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    print(f"HV ratio vs random {fmt(result['hv_ratio_vs_random'])}, vs optuna "
          f"{fmt(result['hv_ratio_vs_optuna'])}; time to random's final HV, sparse-search / "
          f"random: {fmt(result['time_to_random_hv_ratio'])}")
    write_csv(runs, args.csv, max_params=max_params)
    plot(runs, means, args.out, max_params=max_params, target=result["final_hv"]["random"],
         title=f"{args.space.name}, MNIST subset {subset}, {epochs} epoch(s), {trials} trials, "
               f"{seeds} seed(s), budget {max_params:,}")
    print(f"wrote {args.out} and {args.csv}")
    print(json.dumps({**result, **size, "seeds": seeds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
