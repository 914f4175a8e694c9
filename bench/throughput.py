"""Training throughput (images/s): our fit loop against two baselines, in one run.

Same model (a small CIFAR-like CNN from ``build_model``), same images, same optimizer, same
thread count, same number of steps:

- naive:   torchvision-style Dataset of PIL images + per-sample transforms (RandomCrop(32,
           padding=4), RandomHorizontalFlip, ToTensor, Normalize) through a DataLoader; measured
           with 0 and 2 workers and the FASTER one is the baseline;
- minimal: a hand-written loop over a pre-normalised float tensor, shuffled, NO augmentation
           (an upper bound for any loop that augments);
- ours:    ``trainables.train.fit`` with crop+flip augmentation (val set of 2 images, so the
           per-epoch evaluation costs nothing), channels_last as by default; ``ours_nchw`` is
           the same loop in NCHW, to show what the memory format alone brings.

Rounds are interleaved (naive, minimal, ours, naive, ...) and each method's best round counts,
because this machine is shared and wall-clock timings are noisy. Beside images/s (wall clock)
the table gives CPU milliseconds per image (this process + its joined DataLoader workers; for
ours the whole ``fit`` call, setup included), which other load on the machine barely moves.
Data: the real cifar10.npz when ``../shared/datasets`` exists (a slice of it), else synthetic
uint8 images; the output says which. The LAST line is JSON: images/s of each method,
ratio_vs_naive, ratio_vs_minimal (wall clock) and the CPU-time ratios.

    .venv/bin/python bench/throughput.py [--images 2560] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from trainables.arch import ArchConfig, StageConfig, StemConfig
from trainables.data import Splits, channel_stats
from trainables.models import build_model
from trainables.train import TrainConfig, fit, make_optimizer

ARCH = ArchConfig(
    stem=StemConfig(width=16),
    stages=(
        StageConfig(width=32, downsample="maxpool"),
        StageConfig(width=64, downsample="maxpool"),
    ),
    pooling="gap",
)
CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10.npz"
BATCH = 128


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, 32, 32, 3) uint8 images, int64 labels, and where they came from."""
    if CIFAR.is_file():
        with np.load(CIFAR) as z:
            return z["x_train"][:n], z["y_train"][:n].astype(np.int64), f"real CIFAR-10 ({CIFAR})"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return x, rng.integers(0, 10, n).astype(np.int64), "synthetic uint8 images"


class PilImages(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: array -> PIL image -> transforms."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: transforms.Compose) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> None:
    loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers are joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def naive(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, mean: tuple, std: tuple, workers: int) -> tuple[int, float]:
    """(images, seconds) through a DataLoader of PIL images with per-sample transforms."""
    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(mean, std),
    ])
    loader = DataLoader(PilImages(x, y, tf), batch_size=BATCH, shuffle=True, drop_last=True,
                        num_workers=workers)
    torch.manual_seed(0)
    model = build_model(ARCH)
    opt = make_optimizer(model, cfg)
    t = time.perf_counter()
    n = 0
    for xb, yb in loader:
        _step(model, opt, xb, yb)
        n += len(yb)
    return n, time.perf_counter() - t


def minimal(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, mean: tuple, std: tuple) -> tuple[int, float]:
    """(images, seconds) of a bare loop over a pre-normalised float tensor, no augmentation."""
    xf = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    xf = ((xf - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).contiguous()
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    model = build_model(ARCH)
    opt = make_optimizer(model, cfg)
    t = time.perf_counter()
    perm = torch.randperm(len(yt))
    steps = len(yt) // BATCH
    for s in range(steps):
        idx = perm[s * BATCH:(s + 1) * BATCH]
        _step(model, opt, xf[idx], yt[idx])
    return steps * BATCH, time.perf_counter() - t


def ours(splits: Splits, cfg: TrainConfig) -> tuple[int, float]:
    """(images, seconds of the training epoch) of ``fit``; its setup is not timed."""
    torch.manual_seed(0)
    result = fit(build_model(ARCH), splits, cfg)
    return len(splits.y_train) // BATCH * BATCH, result.history[-1]["epoch_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2560, help="training images per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best counts")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y, source = load_images(args.images)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    mean, std = channel_stats(x_nchw)
    t = torch.from_numpy
    splits = Splits(name="cifar10", x_train=t(x_nchw), y_train=t(y), x_val=t(x_nchw[:2]),
                    y_val=t(y[:2]), x_test=t(x_nchw[:2]), y_test=t(y[:2]), num_classes=10,
                    class_names=tuple(str(i) for i in range(10)), mean=mean, std=std)
    cfg = TrainConfig(epochs=1, batch_size=BATCH, augment="crop+flip", threads=args.threads, seed=0)
    print(f"data: {source}, {len(y)} images/round; model {ARCH.canonical()}; "
          f"batch {BATCH}; threads {args.threads}; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    methods = {
        "naive_w0": lambda: naive(x, y, cfg, mean, std, workers=0),
        "naive_w2": lambda: naive(x, y, cfg, mean, std, workers=2),
        "minimal": lambda: minimal(x, y, cfg, mean, std),
        "ours": lambda: ours(splits, cfg),
        # The same loop in NCHW: how much of the gain is the channels_last memory format.
        "ours_nchw": lambda: ours(splits, cfg.replace(channels_last=False)),
    }
    ours(splits, cfg)  # warm-up: first-call costs (allocator, FLOP counter import) are not throughput
    speed: dict[str, list[float]] = {k: [] for k in methods}  # images per wall second
    cpu: dict[str, list[float]] = {k: [] for k in methods}  # CPU ms per image, whole call
    for _ in range(args.rounds):
        for k, fn in methods.items():
            c = _cpu_seconds()
            n, seconds = fn()
            cpu[k].append(1000 * (_cpu_seconds() - c) / n)
            speed[k].append(n / seconds)
    best = {k: max(v) for k, v in speed.items()}
    lean = {k: min(v) for k, v in cpu.items()}
    naive_key = max(("naive_w0", "naive_w2"), key=best.__getitem__)
    print(f"{'method':<10}{'img/s best':>12}{'CPU ms/img':>12}   img/s per round")
    for k in methods:
        print(f"{k:<10}{best[k]:>12.1f}{lean[k]:>12.2f}   " + ", ".join(f"{r:.1f}" for r in speed[k]))
    out = {
        "naive_images_per_s": round(best[naive_key], 1),
        "naive_baseline": naive_key,
        "naive_workers0_images_per_s": round(best["naive_w0"], 1),
        "naive_workers2_images_per_s": round(best["naive_w2"], 1),
        "minimal_images_per_s": round(best["minimal"], 1),
        "ours_images_per_s": round(best["ours"], 1),
        "ours_nchw_images_per_s": round(best["ours_nchw"], 1),
        "ratio_vs_naive": round(best["ours"] / best[naive_key], 3),
        "ratio_vs_minimal": round(best["ours"] / best["minimal"], 3),
        # CPU time per image: robust to other load on a shared machine (lower is better).
        "cpu_ratio_vs_naive_w0": round(lean["naive_w0"] / lean["ours"], 3),
        "cpu_ratio_vs_minimal": round(lean["minimal"] / lean["ours"], 3),
        "data": source,
        "threads": args.threads,
    }
    print(f"ours / naive ({naive_key}) = {out['ratio_vs_naive']:.2f}x   "
          f"ours / minimal = {out['ratio_vs_minimal']:.2f}x   (wall clock, best round)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
