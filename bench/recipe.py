"""A training recipe for ~50k-parameter nets on CIFAR-10: one change at a time.

Two shipped ~45k-param nets (``spaces/archs/cifar10-50k-best.yaml``: the 30-minute search's
best, separable; ``spaces/archs/resnet8-44k.yaml``: MLPerf Tiny's ResNet-8 scaled to 12/24/48
channels), all 45,000 training images (val: the other 5,000, the search's split; test: all
10,000), a fixed epoch budget (``--epochs``, default 8: cifar10-50k-long's trials), the same seed. Each
variant changes ONE thing of the baseline recipe (``BASE``: cifar10-50k.yaml's recipe at
lr 0.1); ``base-seed1`` is the baseline with seed 1, the seed-to-seed noise the deltas are
read against. Flip test-time augmentation is free to measure: the baseline's and the EMA
run's final models are scored again with it (``+tta``), so it costs no run.

Runs go two at a time (one thread each, longest first) in child processes; each finished run
is appended to ``--out`` (JSON lines) and a rerun skips what is there, so an interrupted bench
resumes. Prints the table of val/test accuracy and each variant's delta against the baseline
of the same net (measured in this run), and seconds per epoch; the LAST line is JSON.

    .venv/bin/python bench/recipe.py --data-path ../shared/datasets/cifar10.npz \
        --variants base,base-seed1,lr0.2,bs256-lr0.2,cosine,decay-norms,ls0.2,crop2,cutout8,ema0.995
                                          # the one-change rows: 20 runs, ~65 min on 2 idle cores
    .venv/bin/python bench/recipe.py --data-path ... --variants lr0.4,winners   # then these
    .venv/bin/python bench/recipe.py --data-path ... --epochs 24 --archs resnet8-44k \
        --variants winners-crop4,winners --baseline winners-crop4   # the crop at a finalize budget
    .venv/bin/python bench/recipe.py --data-path ... --epochs 1 --subset 4000 --quick    # smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"best50k": ROOT / "spaces/archs/cifar10-50k-best.yaml",
         "resnet8-44k": ROOT / "spaces/archs/resnet8-44k.yaml"}
# cifar10-50k.yaml's recipe with its searched lr fixed mid-range: SGD-Nesterov one-cycle
# (15% warm-up), batch 128, wd 5e-4 on kernels only, label smoothing 0.1, crop 4 + flip.
BASE = {"optimizer": "sgd", "lr": 0.1, "batch_size": 128, "schedule": "onecycle",
        "weight_decay": 5e-4, "label_smoothing": 0.1, "augment": "crop+flip", "crop_padding": 4}
VARIANTS: dict[str, dict[str, object]] = {
    "base": {},
    "base-seed1": {"seed": 1},
    "lr0.2": {"lr": 0.2},
    "bs256-lr0.2": {"batch_size": 256, "lr": 0.2},
    "cosine": {"schedule": "cosine"},
    "decay-norms": {"decay_norms": True},
    "ls0.2": {"label_smoothing": 0.2},
    "crop2": {"crop_padding": 2},
    "cutout8": {"cutout": 8},
    "ema0.995": {"ema": 0.995},
    # after the one-change rows: the biggest lever once more, and the winners together
    "lr0.4": {"lr": 0.4},
    "winners": {"lr": 0.2, "crop_padding": 2},
    "winners-crop4": {"lr": 0.2},  # at a longer budget: does the crop's sign flip?
}
QUICK = ("base", "ema0.995")
TTA_OF = ("base", "ema0.995", "winners", "winners-crop4")  # runs whose final model is scored again with flip TTA


def one(arch: str, variant: str, *, data_path: str, epochs: int, subset: int | None) -> dict:
    """Train ``arch`` with ``variant`` in this process; the result row."""
    import torch

    from trainables.arch import ArchConfig
    from trainables.data import DataConfig, load_dataset
    from trainables.models import build_model
    from trainables.train import TrainConfig, _batcher, evaluate, fit

    changes = dict(VARIANTS[variant])
    seed = int(changes.pop("seed", 0))
    cfg = TrainConfig(**{**BASE, **changes}, epochs=epochs, seed=seed, threads=1, int8_eval=False)
    splits = load_dataset(DataConfig(name="cifar10", path=data_path, subset=subset))
    torch.manual_seed(seed)
    model = build_model(ArchConfig.load(ARCHS[arch]))
    t0 = time.perf_counter()
    result = fit(model, splits, cfg)
    m = result.metrics
    row = {"arch": arch, "variant": variant, "epochs": epochs, "seed": seed,
           "val_accuracy": m["val_accuracy"], "test_accuracy": m["test_accuracy"],
           "nonzero_params": m["nonzero_params"], "seconds": time.perf_counter() - t0,
           "epoch_seconds": sum(h["epoch_seconds"] for h in result.history) / len(result.history)}
    if variant in TTA_OF:
        b = _batcher(splits, cfg, "cifar10", torch.device("cpu"))
        for split, x, y in (("val", splits.x_val, splits.y_val), ("test", splits.x_test, splits.y_test)):
            acc, _ = evaluate(model, x, y, b, batch_size=1024, device=torch.device("cpu"), tta_flip=True)
            row[f"tta_{split}_accuracy"] = acc
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-path", required=True, help="cifar10 .npz (or torchvision root)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--subset", type=int, default=None, help="train+val images (default: all 50,000)")
    ap.add_argument("--out", default="bench-recipe.jsonl", help="JSON lines, one per finished run (resume)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of the nets")
    ap.add_argument("--baseline", default="base", help="the variant deltas are taken against")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--one", nargs=2, metavar=("ARCH", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(*a.one, data_path=a.data_path, epochs=a.epochs, subset=a.subset)))
        return 0

    out = Path(a.out)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if r["epochs"] == a.epochs:
                done[(r["arch"], r["variant"])] = r
    variants = QUICK if a.quick else tuple(a.variants.split(",") if a.variants else VARIANTS)
    archs = a.archs.split(",")
    for name, known in (("variant", VARIANTS), ("net", ARCHS)):
        bad = [v for v in (variants if name == "variant" else archs) if v not in known]
        if bad:
            ap.error(f"unknown {name} {bad}: expected some of {', '.join(known)}")
    # the ResNet (2.4x the MACs) first: the longest runs start first
    todo = [(arch, v) for arch in reversed(ARCHS) if arch in archs for v in variants
            if (arch, v) not in done]
    started = time.perf_counter()

    def run(job: tuple[str, str]) -> dict:
        cmd = [sys.executable, __file__, "--data-path", a.data_path, "--epochs", str(a.epochs),
               "--one", *job] + (["--subset", str(a.subset)] if a.subset else [])
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise RuntimeError(f"{job} failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        with out.open("a") as f:  # one write per line: two finishing runs do not interleave
            f.write(json.dumps(row) + "\n")
        print(f"  done {job[0]:<12} {job[1]:<12} val {row['val_accuracy']:.4f}  "
              f"test {row['test_accuracy']:.4f}  {row['seconds']:.0f} s", flush=True)
        return row

    with ThreadPoolExecutor(a.jobs) as pool:
        for row in pool.map(run, todo):
            done[(row["arch"], row["variant"])] = row
    wall = time.perf_counter() - started

    n = a.subset or 50_000
    print(f"\n{a.epochs} epochs, {n - round(0.1 * n):,} train / {round(0.1 * n):,} val / 10,000 test, "
          f"seed 0 (base-seed1: 1); deltas in accuracy points against the same net's {a.baseline}")
    print(f"{'net':<12} {'variant':<14} {'val':>7} {'d val':>6} {'test':>7} {'d test':>6} {'s/epoch':>8}")
    summary: dict[str, dict[str, float]] = {}
    for arch in (x for x in ARCHS if x in archs):
        base = done.get((arch, a.baseline))
        for v in variants:
            r = done.get((arch, v))
            if r is None or base is None:
                continue
            rows = [(v, r["val_accuracy"], r["test_accuracy"])]
            if "tta_val_accuracy" in r:
                rows.append((v + "+tta", r["tta_val_accuracy"], r["tta_test_accuracy"]))
            for name, val, test in rows:
                dv, dt = 100 * (val - base["val_accuracy"]), 100 * (test - base["test_accuracy"])
                summary.setdefault(name, {})[arch] = round(dv, 2)
                print(f"{arch:<12} {name:<14} {val:7.4f} {dv:+6.2f} {test:7.4f} {dt:+6.2f} "
                      f"{r['epoch_seconds']:8.1f}")
    print(json.dumps({"bench": "recipe", "epochs": a.epochs, "baseline": a.baseline, "wall_s": round(wall, 1),
                      "val_delta_pp": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
