"""Deployment figures: what flash/SRAM add to the budget screen, latency cold and cached, the
int8 accuracy drop of small trained nets.

In one run, against baselines measured in the same run:

- ``screen``: N feasible configs of a space (``search.space.dry_run``, nothing trained); each is
  counted, interleaved, by :func:`trainables.accounting.count` (params, MACs, flash, SRAM) and by
  the same meta build + shape-only pass without the dataflow recorder (params and MACs only:
  the screen before this change). CPU time of this process; the goal is <= 1.2x.
- ``latency``: K configs timed with :func:`trainables.latency.measure_latency` (ONNX Runtime,
  batch 1, 1 thread) into a fresh cache: the cold call (build, export, time) and the cached
  call (wall seconds), and each net's median ms and CV over the samples.
- ``int8``: nets sampled from spaces/quickstart.yaml trained on digits and from
  spaces/mnist.yaml trained on MNIST (``--data-path`` to an mnist .npz; skipped without it),
  then :func:`trainables.quantize.quantize_int8`: fp32 and int8 test accuracy (ONNX Runtime).

Latest figures (AMD EPYC, 2 shared cores, torch 2.14.1, onnxruntime 1.32.0;
``.venv/bin/python bench/deploy.py --data-path <mnist.npz>``):

    screen: 100 configs of cifar10.yaml: params+MACs 5.73 ms, + flash/SRAM 6.51 ms per config
            (median CPU time): 1.136x (total 1.158x)                       goal <= 1.2x: met
    latency (5 cifar10 configs, fp32): 0.42-2.94 ms per image; cold 3.42 s (build, export,
            time), cached 0.47 ms per config; CV median 5.4%, max 12.8% on this busy shared box
            (other engineers' tests ran beside it): the 5% CV goal is NOT met here
    int8: 3 digits nets (20 epochs) drop +0.28, +0.28, +1.95 points; 2 MNIST nets (12k
          images, 5 epochs) drop -0.03, +0.10 points; max +1.95 (S8S8; U8S8 lost 9.7 on digits)

The last line is JSON.

    .venv/bin/python bench/deploy.py [--space spaces/cifar10.yaml] [--n 100] [--latency 5]
        [--digits 3] [--mnist 2] [--data-path mnist.npz] [--epochs 20] [--mnist-subset 12000]
"""

from __future__ import annotations

import argparse
import json
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
    shapes = accounting._trace_shapes(model, rows, (arch.in_channels, *arch.input_size), record=False)
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


def bench_latency(space: str, k: int) -> dict:
    from trainables.latency import measure_latency

    archs = _sample(space, k)
    rows = []
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in archs:
            t = time.perf_counter()
            cold = measure_latency(a, cache_dir=cache)
            cold_s = time.perf_counter() - t
            t = time.perf_counter()
            warm = measure_latency(a, cache_dir=cache)
            warm_s = time.perf_counter() - t
            assert warm.cached and warm.median_ms == cold.median_ms
            rows.append((cold_s, warm_s, cold.median_ms, cold.cv))
            print(f"latency: {a.canonical()[:60]:60} {cold.median_ms:8.3f} ms  CV {cold.cv:6.2%}  "
                  f"cold {cold_s:5.2f} s  cached {warm_s * 1000:6.2f} ms")
    cold_med = statistics.median(r[0] for r in rows)
    warm_med = statistics.median(r[1] for r in rows)
    cvs = [r[3] for r in rows]
    print(f"latency: cold {cold_med:.2f} s, cached {warm_med * 1000:.2f} ms per config "
          f"({cold_med / warm_med:.0f}x); CV median {statistics.median(cvs):.2%}, max {max(cvs):.2%}; "
          f"cpu {cold.cpu}, onnxruntime {cold.onnxruntime}")
    return {"configs": len(rows), "cold_s_median": round(cold_med, 3), "cached_ms_median": round(warm_med * 1000, 3),
            "cv_median": round(statistics.median(cvs), 4), "cv_max": round(max(cvs), 4),
            "median_ms": [round(r[2], 4) for r in rows], "cpu": cold.cpu}


def bench_int8(space: str, n: int, data, epochs: int) -> list[dict]:
    from trainables.data import load_dataset
    from trainables.models import build_model
    from trainables.quantize import quantize_int8
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
