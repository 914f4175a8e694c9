"""Deployment figures: what flash/SRAM add to the budget screen, latency cold and cached, the
int8 accuracy drop of small trained nets.

In one run, against baselines measured in the same run:

- ``screen``: N feasible configs of a space (``search.space.preview``, nothing trained); each is
  counted, interleaved, by :func:`trainables.accounting.count` (params, MACs, flash, SRAM) and by
  the same meta build + shape-only pass without the dataflow recorder (params and MACs only:
  the screen before this change). CPU time of this process; the goal is <= 1.2x.
- ``latency``: K configs through :class:`search.space.latency.LatencyScreen` (what a search's
  screen runs: ONNX Runtime, batch 1, 1 thread) with empty caches: the cold call (build,
  export, time), a run-dir hit and a user-cache hit, in wall ms and as ratios of (params/MACs
  screen + latency) to the params/MACs screen of the same configs.
- ``repeatability``: the K nets exported once and timed ``--reps`` times by each method of
  TIMINGS (wall clock, thread CPU time, pinned, rounds), interleaved: run-to-run CV.
- ``int8``: nets sampled from spaces/quickstart.yaml trained on digits and from
  spaces/mnist.yaml trained on MNIST (``--data-path`` to an mnist .npz; skipped without it),
  then :func:`trainables.deploy.quantize.quantize_int8`: fp32 and int8 test accuracy (ONNX Runtime).

Latest figures (AMD EPYC, 2 shared cores, torch 2.14.1, onnxruntime 1.32.0;
``.venv/bin/python bench/deploy.py --data-path <mnist.npz>``):

    screen: 100 configs of cifar10.yaml: params+MACs 5.73 ms, + flash/SRAM 6.51 ms per config
            (median CPU time): 1.136x (total 1.158x)                       goal <= 1.2x: met
    latency (5 cifar10 configs, fp32; earlier run, wall clock): 0.42-2.94 ms per image; CV
            median 5.4%, max 12.8% on this busy shared box
    latency screen (``--n 20 --latency 5 --reps 6 --digits 0 --mnist 0``, load average 17 on
            2 cores: NOT an idle machine), per proposal, wall time, median of 5: params/MACs
            93.8 ms; + latency cold 10.1 s (109x; build, TorchScript export, timing), from the
            run dir 0.20 ms (1.002x), from the user cache 3.8 ms (1.04x)
    repeatability (same run; 5 nets x 6 measurements, interleaved, CV of the medians): wall
            clock 36.7% median / 75.2% max; thread CPU time 2.2% / 4.3% (the default now);
            + pinned to one core 3.2% / 3.9%; + 5 rounds of 20 2.8% / 3.7%: within 5% on this
            loaded box with the CPU-time clock; pinning and rounds brought nothing measurable
    int8: 3 digits nets (20 epochs) drop +0.28, +0.28, +1.95 points; 2 MNIST nets (12k
          images, 5 epochs) drop -0.03, +0.10 points; max +1.95 (S8S8; U8S8 lost 9.7 on digits)

The last line is JSON.

    .venv/bin/python bench/deploy.py [--space spaces/cifar10.yaml] [--n 100] [--latency 5]
        [--reps 6] [--digits 3] [--mnist 2] [--data-path mnist.npz] [--epochs 20] [--mnist-subset 12000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from search.space import dry_run
from search.spec import load_spec
from trainables import accounting
from trainables.accounting import count

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
          "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "digits": ((1, 8, 8), 10)}


def _params_macs_only(arch):
    """The screen's count before flash/SRAM: the same meta build and pass, no dataflow recorder."""
    model = accounting.meta_model(arch)
    rows = accounting._row_modules(model)
    shapes = accounting.trace_shapes(model, rows, (arch.in_channels, *arch.input_size), record=False)
    return accounting._account(model, rows, *shapes)


def _cpu_ms(fn, *args):
    t = time.process_time()
    fn(*args)
    return (time.process_time() - t) * 1000


def _sample(space: str, n: int):
    spec = load_spec(space)
    shape, classes = SHAPES[spec.data.name]
    return [p.arch for p in dry_run(spec, n, input_shape=shape, num_classes=classes).proposals]


def bench_screen(space: str, n: int) -> dict:
    archs = _sample(space, n)
    for a in archs[:3]:  # warm-up
        count(a)
        _params_macs_only(a)
    new, old = [], []
    for a in archs:
        old.append(_cpu_ms(_params_macs_only, a))
        new.append(_cpu_ms(count, a))
    ratio = statistics.median(new) / statistics.median(old)
    print(f"screen: {len(archs)} configs of {Path(space).name}: params+MACs "
          f"{statistics.median(old):.2f} ms, + flash/SRAM {statistics.median(new):.2f} ms per config "
          f"(median CPU time): {ratio:.3f}x (total {sum(new) / sum(old):.3f}x)")
    return {"configs": len(archs), "baseline_ms_median": round(statistics.median(old), 3),
            "count_ms_median": round(statistics.median(new), 3), "ratio_median": round(ratio, 3),
            "ratio_total": round(sum(new) / sum(old), 3)}


def _wall_ms(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1000


def bench_latency(space: str, k: int) -> dict:
    """The screen's cost per proposal with latency (search.space.latency, as a search runs it):
    cold (both caches empty: export + timing), from the user's cache, from the run dir's, as
    wall-time ratios against the params/MACs screen of the same configs in this run."""
    from search.space.latency import LatencyScreen

    archs = _sample(space, k)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _params_macs_only(archs[0])
        screen = LatencyScreen(None, run_cache=Path(tmp) / "run", user_cache=Path(tmp) / "user")
        fresh_run = LatencyScreen(None, run_cache=Path(tmp) / "run2", user_cache=Path(tmp) / "user")
        for a in archs:
            base = _wall_ms(_params_macs_only, a)
            cold = _wall_ms(screen.latency, a)
            run_hit = _wall_ms(screen.latency, a)
            user_hit = _wall_ms(fresh_run.latency, a)
            lat = screen.latency(a)
            rows.append((base, cold, run_hit, user_hit, lat.median_ms, lat.cv))
            print(f"latency: {a.canonical()[:56]:56} {lat.median_ms:8.3f} ms  CV {lat.cv:6.2%}  "
                  f"screen {base:6.2f} ms, + cold {cold / 1000:5.2f} s, + cached {run_hit:5.2f} ms")
        assert screen.measured == len(archs) and screen.run_hits == 2 * len(archs)
        assert fresh_run.user_hits == len(archs)
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    out = {"configs": len(rows), "params_macs_ms_median": round(med[0], 3),
           "cold_s_median": round(med[1] / 1000, 3), "run_cache_ms_median": round(med[2], 3),
           "user_cache_ms_median": round(med[3], 3),
           "ratio_cold": round((med[0] + med[1]) / med[0], 1),
           "ratio_run_cache": round((med[0] + med[2]) / med[0], 3),
           "ratio_user_cache": round((med[0] + med[3]) / med[0], 3),
           "median_ms": [round(r[4], 4) for r in rows],
           "sample_cv_median": round(statistics.median(r[5] for r in rows), 4), "cpu": lat.cpu}
    print(f"latency screen per proposal (wall, median of {len(rows)}): params/MACs {med[0]:.2f} ms; "
          f"+ latency cold {med[1] / 1000:.2f} s ({out['ratio_cold']}x), from the run dir "
          f"{med[2]:.2f} ms ({out['ratio_run_cache']}x), from the user cache {med[3]:.2f} ms "
          f"({out['ratio_user_cache']}x); cpu {lat.cpu}, onnxruntime {lat.onnxruntime}")
    return out


# How the timing is done: the old default (wall clock, unpinned) and what was tried against it.
TIMINGS = {"wall": {"clock": "wall", "pin": False}, "cpu": {"clock": "cpu", "pin": False},
           "cpu+pin": {"clock": "cpu", "pin": True},
           "cpu+pin+5x20": {"clock": "cpu", "pin": True, "rounds": 5, "repeats": 20}}


def bench_repeatability(space: str, k: int, reps: int) -> dict:
    """Run-to-run CV: each net exported once, then timed ``reps`` times by every method of
    TIMINGS, interleaved (so each method sees the same load); CV of the ``reps`` medians."""
    from trainables.deploy.latency import _export, time_onnx
    from trainables.deploy.quantize import deploy_model
    from trainables.models import build_model

    archs = _sample(space, k)
    cvs: dict[str, list[float]] = {m: [] for m in TIMINGS}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, a in enumerate(archs):
            shape = (a.in_channels, *a.input_size)
            torch.manual_seed(0)
            path = _export(deploy_model(build_model(a).eval(), shape), shape, Path(tmp) / f"{i}.onnx")
            got: dict[str, list[float]] = {m: [] for m in TIMINGS}
            for _ in range(reps):
                for m, kw in TIMINGS.items():
                    got[m].append(time_onnx(path, shape, **kw)[0])
            for m, v in got.items():
                cvs[m].append(statistics.stdev(v) / statistics.fmean(v))
            print(f"repeatability: {a.canonical()[:50]:50} " + "  ".join(
                f"{m} {statistics.median(got[m]):.3f} ms CV {cvs[m][-1]:.1%}" for m in TIMINGS))
    out = {m: {"cv_median": round(statistics.median(v), 4), "cv_max": round(max(v), 4)}
           for m, v in cvs.items()}
    print(f"repeatability ({len(archs)} nets x {reps} measurements, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: NOT an idle machine): " + "; ".join(
              f"{m} CV median {o['cv_median']:.1%} max {o['cv_max']:.1%}" for m, o in out.items()))
    return {"nets": len(archs), "reps": reps, "load_average": round(os.getloadavg()[0], 1),
            **out}


def bench_int8(space: str, n: int, data, epochs: int) -> list[dict]:
    from trainables.data import load_dataset
    from trainables.deploy.quantize import quantize_int8
    from trainables.models import build_model
    from trainables.train import TrainConfig, fit

    splits = load_dataset(data)
    out = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, a in enumerate(_sample(space, n)):
            torch.manual_seed(0)
            model = build_model(a)
            fit(model, splits, TrainConfig(epochs=epochs, threads=torch.get_num_threads(), seed=0), device="cpu")
            q = quantize_int8(model, splits, Path(tmp) / f"{i}.onnx")
            acc = count(a)
            print(f"int8 {data.name}: {a.canonical()[:56]:56} fp32 {q.accuracy_fp32:.4f} int8 "
                  f"{q.accuracy_int8:.4f} drop {q.accuracy_drop:+.4f} ({q.images} test images; "
                  f"flash {acc.flash_bytes:,} B, SRAM {acc.sram_bytes:,} B)")
            out.append({"data": data.name, "arch": a.canonical(), "accuracy_fp32": round(q.accuracy_fp32, 4),
                        "accuracy_int8": round(q.accuracy_int8, 4), "drop": round(q.accuracy_drop, 4),
                        "flash_bytes": acc.flash_bytes, "sram_bytes": acc.sram_bytes})
    return out


def main() -> None:
    from trainables.data import DataConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(REPO / "spaces" / "cifar10.yaml"), help="screen and latency configs")
    ap.add_argument("--n", type=int, default=100, help="configs for the screen's cost")
    ap.add_argument("--latency", type=int, default=5, help="configs timed for latency")
    ap.add_argument("--reps", type=int, default=6, help="repeated measurements per net (repeatability)")
    ap.add_argument("--digits", type=int, default=3, help="digits nets trained for the int8 drop")
    ap.add_argument("--mnist", type=int, default=2, help="MNIST nets (needs --data-path)")
    ap.add_argument("--data-path", default=None, help="an mnist .npz file")
    ap.add_argument("--epochs", type=int, default=20, help="digits epochs (MNIST: a quarter)")
    ap.add_argument("--mnist-subset", type=int, default=12000, help="MNIST train+val images")
    args = ap.parse_args()
    torch.set_num_threads(1)

    result = {"screen": bench_screen(args.space, args.n)}
    if args.latency:
        result["latency"] = bench_latency(args.space, args.latency)
        result["repeatability"] = bench_repeatability(args.space, args.latency, args.reps)
    int8 = []
    if args.digits:
        int8 += bench_int8(str(REPO / "spaces" / "quickstart.yaml"), args.digits, DataConfig(name="digits"), args.epochs)
    if args.mnist and args.data_path:
        torch.set_num_threads(2)
        int8 += bench_int8(str(REPO / "spaces" / "mnist.yaml"), args.mnist,
                           DataConfig(name="mnist", path=args.data_path, subset=args.mnist_subset),
                           max(1, args.epochs // 4))
    if int8:
        drops = [r["drop"] for r in int8]
        print(f"int8: {len(int8)} nets, accuracy drop median {statistics.median(drops):+.4f}, "
              f"max {max(drops):+.4f}")
        result["int8"] = int8
        result["int8_drop_max"] = max(drops)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
