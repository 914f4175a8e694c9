"""Early stopping on a front: no early stopping vs Ray's ASHA vs multi-objective ASHA.

The same sparse-search search (default spaces/studies/tiny-mnist.yaml on a real MNIST subset,
TPE with the budget screen) three ways, each under the same wall-time budget
(``search.time_budget``, counted from the search's start) with more trials asked than fit:

- ``fifo``: every trial trains all its epochs;
- ``asha``: Ray's ``ASHAScheduler`` on validation accuracy alone;
- ``moasha``: ``search.run.moasha.MultiObjectiveASHA`` on (validation accuracy, nonzero params):
  a trial on its rung's Pareto front always goes on.

Quality is the hypervolume of the (test error, log10 nonzero params) front of the trials that
trained to the end (an early-stopped trial never reaches the front), at the end of the budget,
mean over ``--seeds`` searches per method (sampler seeds 0..). Prints a per-run table, the
ratios of each method's mean final hypervolume to fifo's (the baseline, measured in the same
run), and when each mean curve reaches fifo's final hypervolume. The LAST line is JSON with
``hv_ratio_moasha_vs_fifo``, ``hv_ratio_asha_vs_fifo``, ``hv_ratio_moasha_vs_asha``.

    .venv/bin/python bench/early_stopping.py --quick    # ~3-minute smoke check
    .venv/bin/python bench/early_stopping.py            # ~20 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import search_quality as sq  # noqa: E402  (the shared curves, spec sizing and runner)

from search.spec import EarlyStopping  # noqa: E402

METHODS = ("fifo", "asha", "moasha")
DEFAULT_SIZE = {"subset": 6000, "test_subset": 2000, "epochs": 6, "batch_size": 32,
                "seeds": 3, "budget_s": 150}
QUICK_SIZE = {"subset": 1500, "test_subset": 1000, "epochs": 3, "batch_size": 32,
              "seeds": 1, "budget_s": 45}


def method_spec(base: object, method: str, *, budget_s: float) -> object:
    """``base`` with the method's scheduler, the time budget, and more trials than fit."""
    es = None if method == "fifo" else EarlyStopping(scheduler=method, grace_epochs=1,
                                                      reduction_factor=3.0)
    search = dataclasses.replace(base.search, early_stopping=es, time_budget=budget_s,  # type: ignore[attr-defined]
                                 num_samples=1000)
    return dataclasses.replace(base, name=f"early-stopping-{method}-s{base.search.seed}",  # type: ignore[attr-defined]
                               search=search)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=sq.DEFAULT_SPACE, help="search space YAML")
    ap.add_argument("--data", type=Path, default=sq.DEFAULT_DATA, help="MNIST npz (Keras layout)")
    for name in DEFAULT_SIZE:
        ap.add_argument(f"--{name.replace('_', '-')}", type=int,
                        help=f"default {DEFAULT_SIZE[name]}, --quick {QUICK_SIZE[name]}")
    ap.add_argument("--quick", action="store_true", help="a ~3-minute smoke check")
    args = ap.parse_args(argv)
    base = QUICK_SIZE if args.quick else DEFAULT_SIZE
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    if any(v < 1 for v in size.values()):
        print(f"error: every size must be >= 1, got {size}", file=sys.stderr)
        return 2
    if not args.data.is_file():
        print(f"error: MNIST not found at {args.data}: pass --data PATH", file=sys.stderr)
        return 2

    from search.run.ray_runtime import init_ray

    seeds, budget_s = size.pop("seeds"), size.pop("budget_s")
    specs = {}
    for s in range(seeds):
        plain = sq.bench_spec(args.space, method="sparse-search", seed=s, data=args.data,
                              trials=1000, concurrent=2, cpus=2.0, **size)
        for m in METHODS:
            specs[(m, s)] = method_spec(plain, m, budget_s=budget_s)
    max_params = specs[(METHODS[0], 0)].constraints.max_params
    print(f"space {args.space.name}: budget {max_params:,} params; {len(METHODS)} methods x "
          f"{seeds} seeds x {budget_s} s; MNIST subset {size['subset']}, test "
          f"{size['test_subset']}, {size['epochs']} epochs, batch {size['batch_size']}; "
          "2 trials at once on 2 CPUs", flush=True)
    init_ray(num_cpus=2)
    runs: list[sq.RunResult] = []
    stopped: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory(prefix="early-stopping-") as tmp:
        for s in range(seeds):
            for m in METHODS:
                start = time.time()
                run = sq.run_sparse_search(specs[(m, s)], Path(tmp) / f"{m}-{s}")
                # run_sparse_search counts only TERMINATED trials as trained points; the
                # early-stopped ones show up as NaN points (no test accuracy on the front)
                runs.append(dataclasses.replace(run, method=m))
                stopped[(m, s)] = run.failed()
                print(f"  {m:<7} seed {s}: {time.time() - start:6.1f} s, {run.trained()} trained "
                      f"to the end, {run.failed()} stopped early or failed", flush=True)

    curves = {m: [sq.hv_curve(r.points, max_params=max_params) for r in runs if r.method == m]
              for m in METHODS}
    final = {m: sum(c[-1][1] if c else 0.0 for c in cs) / len(cs) for m, cs in curves.items()}
    means = {m: sq.mean_curve(cs) for m, cs in curves.items()}
    reach = {m: sq.time_to_reach(means[m], final["fifo"]) for m in METHODS}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else round(a / b, 4)

    print(f"\n{'method':<8}{'seed':>5}{'trained':>9}{'stopped':>9}{'best test acc':>15}"
          f"{'final HV':>10}")
    for r in runs:
        ok = [p for p in r.points if p.nonzero_params <= max_params]
        best = max((1 - p.test_error for p in ok), default=math.nan)
        c = sq.hv_curve(r.points, max_params=max_params)
        print(f"{r.method:<8}{r.seed:>5}{r.trained():>9}{r.failed():>9}{best:>15.4f}"
              f"{(c[-1][1] if c else 0.0):>10.4f}")
    print()
    for m in METHODS:
        t = reach[m]
        print(f"{m:<8} mean final HV {final[m]:.4f}  ratio to fifo {ratio(final[m], final['fifo'])}"
              f"  reaches fifo's final HV " + ("never" if t is None else f"after {t:.0f} s"))
    result = {
        "hv_ratio_moasha_vs_fifo": ratio(final["moasha"], final["fifo"]),
        "hv_ratio_asha_vs_fifo": ratio(final["asha"], final["fifo"]),
        "hv_ratio_moasha_vs_asha": ratio(final["moasha"], final["asha"]),
        "final_hv": {m: round(v, 4) for m, v in final.items()},
        "seconds_to_fifo_hv": {m: None if v is None else round(v, 1) for m, v in reach.items()},
        "trained": {m: sum(r.trained() for r in runs if r.method == m) for m in METHODS},
        "stopped_or_failed": {m: sum(v for (mm, _), v in stopped.items() if mm == m)
                              for m in METHODS},
        **size, "seeds": seeds, "budget_s": budget_s,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
