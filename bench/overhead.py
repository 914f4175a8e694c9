"""What a search costs beyond training: sparse-search vs the stock Ray Tune stack vs a bare loop.

The same 12 tiny digits trials (~0.1 s of training each), three ways, in one run:

1. **sparse-search**: ``search.run.driver.run_search`` (ProposerSearcher, reused actors, the
   Recorder, MLflow tracking to a local sqlite store);
2. **stock**: Ray's ``OptunaSearch`` over a Tune param space (the same 12 configs as
   ``points_to_evaluate``), a fresh worker per trial (``reuse_actors=False``), the shipped
   ``MLflowLoggerCallback`` to a file store, Ray's default loggers;
3. **bare loop**: ``trainables.trial.train_arch`` on the same configs, one after the other, in
   this process (the floor: data already in memory, nothing but training and evaluation).

Ray is started once before any timing (``startup_s``, reported apart); all three run
``--concurrent`` trials at a time (default 1, so that "beyond training" is wall time minus
training time). Printed per setup: wall time, training seconds the trials reported, and
(wall x concurrent - training) / trials. For sparse-search, one at a time, also the steady
state: per trial after the first, the time between consecutive trial ends minus training
(median), apart from the one-time start-up the first trial carries (imports, the MLflow store,
the first worker). The last line is JSON with ``overhead_s_per_trial`` (that steady-state
figure), ``overhead_incl_startup_s_per_trial`` and ``speedup_vs_stock`` (wall-time ratio).
Goals: <= 0.25 s per trial beyond training, >= 5x faster than stock.

    .venv/bin/python bench/overhead.py               # ~1-2 min on 2 cores
    .venv/bin/python bench/overhead.py --concurrent 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SPEC = """
name: overhead
data: {name: digits, val_fraction: 0.2, subset: 600}
constraints: {max_params: 20000}
search: {sampler: random, num_samples: 12, max_concurrent: 1, seed: 0}
resources: {cpu: 1, gpu: 0}
train: {epochs: 2, batch_size: 64, optimizer: adamw, lr: {float: [0.005, 0.03], log: true},
        threads: 1}
space:
  stem: {width: {int: [4, 12]}}
  num_stages: 1
  stages: {width: {int: [8, 24]}, layers: 1}
"""


def _spec(trials: int, concurrent: int) -> Any:
    from search.spec import parse_spec

    data = yaml.safe_load(SPEC)
    data["search"].update(num_samples=trials, max_concurrent=concurrent)
    return parse_spec(data, source="bench/overhead.py")


def run_sparse_search(spec: Any, root: Path) -> tuple[float, float, list[dict[str, Any]]]:
    """Wall seconds of run_search (Ray already up), its start (time.time(), the clock of the
    trials' ``finished_at``) and the trials' records (flat config, metrics)."""
    from search.run.driver import run_search

    t0, started = time.perf_counter(), time.time()
    out = run_search(spec, storage_dir=root / "runs", tracking_uri=f"sqlite:///{root}/mlflow.db",
                     progress=False)
    wall = time.perf_counter() - t0
    trials = [json.loads(p.read_text()) for p in sorted(out.run_dir.glob("trials/*/result.json"))]
    assert len(trials) == spec.search.num_samples and all(t["status"] == "TERMINATED" for t in trials)
    return wall, started, trials


def run_bare_loop(configs: list[dict[str, Any]], splits: Any) -> tuple[float, float]:
    """Wall seconds of training the configs one by one here, and the summed train_seconds."""
    from trainables.arch import ArchConfig
    from trainables.train import TrainConfig
    from trainables.trial import train_arch

    t0 = time.perf_counter()
    trained = 0.0
    for cfg in configs:
        result = train_arch(ArchConfig.from_flat(cfg), splits, TrainConfig.from_flat(cfg))
        trained += result.metrics["train_seconds"]
    return time.perf_counter() - t0, trained


def _stock_trainable(config: dict[str, Any], splits: Any) -> None:
    from trainables.trial import train_trial

    # OptunaSearch refuses "/" in parameter names: the space spells them with ".".
    train_trial({k.replace(".", "/"): v for k, v in config.items()}, splits)


def run_stock(configs: list[dict[str, Any]], splits: Any, root: Path, concurrent: int) -> tuple[float, float]:
    """The stock stack on the same configs; wall seconds and summed train_seconds."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    def dotted(c: dict[str, Any]) -> dict[str, Any]:
        return {k.replace("/", "."): v for k, v in c.items()}

    keys = sorted(configs[0])
    space = dotted({k: tune.choice(sorted({c[k] for c in configs}, key=repr)) for k in keys})
    searcher = OptunaSearch(metric=["val_accuracy", "nonzero_params"], mode=["max", "min"],
                            points_to_evaluate=[dotted(c) for c in configs], seed=0)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_stock_trainable, splits=splits), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(configs),
                                    max_concurrent_trials=concurrent, reuse_actors=False),
        run_config=tune.RunConfig(
            name="stock", storage_path=str(root / "stock"), verbose=0,
            callbacks=[MLflowLoggerCallback(tracking_uri=(root / "mlruns").as_uri(),
                                            experiment_name="stock")]),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    trained = sum(r.metrics.get("train_seconds", 0.0) for r in grid)
    return wall, trained


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--concurrent", type=int, default=1, help="trials at a time (all setups)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (runs, stores)")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="sparse-search-overhead-"))
    try:
        from search.run.ray_runtime import init_ray
        from trainables.data import load_dataset

        t0 = time.perf_counter()
        init_ray(num_cpus=2)
        startup = time.perf_counter() - t0
        spec = _spec(args.trials, args.concurrent)

        ss_wall, ss_started, trials = run_sparse_search(spec, root)
        configs = [t["config"] for t in trials]
        ss_train = sum(t["metrics"]["train_seconds"] for t in trials)

        splits = load_dataset(spec.data)
        bare_wall, bare_train = run_bare_loop(configs, splits)

        # The stock stack as shipped (sparse-search's quiet settings are scoped to its own
        # runs, so Ray's default loggers and output are on here).
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses file stores otherwise
        stock_wall, stock_train = run_stock(configs, splits, root, args.concurrent)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    n, c = args.trials, args.concurrent
    steady, first = steady_overhead(trials, ss_started) if c == 1 else (math.nan, math.nan)

    def per_trial(wall: float, trained: float) -> float:
        return (wall * c - trained) / n

    print(f"{n} trials, {c} at a time; Ray startup {startup:.1f} s (not counted below)")
    print(f"{'setup':<14} {'wall s':>8} {'train s':>8} {'overhead s/trial':>17}")
    for name, wall, trained in (("sparse-search", ss_wall, ss_train),
                                ("stock Tune", stock_wall, stock_train),
                                ("bare loop", bare_wall, bare_train)):
        print(f"{name:<14} {wall:>8.2f} {trained:>8.2f} {per_trial(wall, trained):>17.3f}")
    speedup = stock_wall / ss_wall
    if c == 1:
        print(f"sparse-search per trial beyond training: {steady:.3f} s in steady state (median, "
              f"trials 2..{n}; goal <= 0.25); the first trial also carried {first:.1f} s of "
              "one-time start-up (imports, MLflow store, first worker)")
    print(f"sparse-search is {speedup:.1f}x faster than stock (goal >= 5), "
          f"{(ss_wall - bare_wall) / n:+.3f} s/trial vs the bare loop")
    print(json.dumps({
        "trials": n, "concurrent": c, "startup_s": round(startup, 3),
        "sparse_search_wall_s": round(ss_wall, 3), "stock_wall_s": round(stock_wall, 3),
        "bare_loop_wall_s": round(bare_wall, 3), "train_s": round(ss_train, 3),
        "overhead_s_per_trial": None if math.isnan(steady) else round(steady, 4),
        "first_trial_overhead_s": None if math.isnan(first) else round(first, 3),
        "overhead_incl_startup_s_per_trial": round(per_trial(ss_wall, ss_train), 4),
        "stock_overhead_s_per_trial": round(per_trial(stock_wall, stock_train), 4),
        "speedup_vs_stock": round(speedup, 2),
    }))


def steady_overhead(trials: list[dict[str, Any]], started: float) -> tuple[float, float]:
    """(median per-trial overhead after the first, the first trial's overhead), one at a time.

    A trial's overhead is the time between the previous trial's end and its own end (as the
    Recorder saw them) minus its training seconds. The first trial is measured from the
    search's start and carries every one-time cost.
    """
    ends = sorted((t["finished_at"], t["metrics"]["train_seconds"]) for t in trials)
    gaps = [(b - a) - train for (a, _), (b, train) in itertools.pairwise(ends)]
    return statistics.median(gaps), ends[0][0] - started - ends[0][1]


if __name__ == "__main__":
    main()
