"""Lottery-ticket IMP with rewinding on real MNIST: does accuracy hold at ~51% of the weights?

Trains a small dense CNN, then runs ``--rounds`` rounds of: prune ``--rate`` of the surviving
conv/linear weights by global magnitude (output layer at half the rate, as in Frankle & Carbin
2019), rewind the survivors to their values after epoch ``--rewind-epoch`` (Frankle et al.
2020), retrain the remaining epochs with a fresh optimizer. Each retraining sees the same batches
in the same order as the dense run after the rewind point, so the mask is the only difference.

Prints a table (round, fraction of prunable weights remaining, nonzero params, test accuracy,
change vs dense in percentage points) and ends with one JSON line. Acceptance: after 3 rounds at
20% (~51% of the weights) test accuracy within 0.5 pp of the dense network.

    .venv/bin/python bench/imp_mnist.py     # 3 rounds: 0.803, 0.645, 0.519 of the weights
    .venv/bin/python bench/imp_mnist.py --train-subset 5000 --epochs 2 --rounds 1   # smoke run

0.519 rather than 0.8**3 = 0.512 after 3 rounds: the output layer, pruned at half the rate,
keeps 0.9**3 of its weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trainables.pruning import nonzero_fraction, prunable, prune_step, rewind, snapshot

DEFAULT_DATA = Path("/work/shared/datasets/mnist.npz")


class SmallCNN(nn.Module):
    """conv5x5(1->8) pool conv5x5(8->16) pool -> Linear(256, 64) -> classifier(64, 10).

    (N, 1, 28, 28) -> (N, 8, 12, 12) -> (N, 16, 4, 4) -> (N, 256) -> (N, 64) -> (N, 10);
    20,522 parameters (20,424 prunable conv/linear weights), ~0.34 M MACs per image.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(256, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.features(x)))


def load_mnist(path: Path, *, train_subset: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised float tensors (N, 1, 28, 28) and int64 labels; a seeded training subset."""
    if not path.is_file():
        sys.exit(f"error: MNIST not found at {path} (an .npz with x_train, y_train, x_test, "
                 "y_test as uint8); pass --data PATH")
    with np.load(path) as d:
        x_train, y_train, x_test, y_test = (d[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    keep = np.random.default_rng(seed).permutation(len(x_train))[:train_subset]
    x_train, y_train = x_train[keep], y_train[keep]
    scale = x_train.astype(np.float32) / 255.0
    mean, std = float(scale.mean()), float(scale.std())

    def prep(x: np.ndarray) -> Tensor:
        return ((torch.from_numpy(x).float() / 255.0 - mean) / std).unsqueeze(1)

    return (prep(x_train), torch.from_numpy(y_train.astype(np.int64)),
            prep(x_test), torch.from_numpy(y_test.astype(np.int64)))


def train_epochs(
    model: nn.Module, x: Tensor, y: Tensor, epochs: range, *, lr: float, batch_size: int, seed: int
) -> None:
    """Adam over ``epochs``; epoch e's batch order depends only on (seed, e)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in epochs:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum())
                  for i in range(0, len(x), 2000))
    return correct / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--train-subset", type=int, default=20000, help="training images used")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the dense run")
    p.add_argument("--rewind-epoch", type=int, default=1, help="rewind point (epochs trained)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=0.2, help="fraction of survivors pruned per round")
    p.add_argument("--scope", choices=("global", "layer"), default="global")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not 0 <= args.rewind_epoch < args.epochs:
        sys.exit(f"error: --rewind-epoch={args.rewind_epoch} must be in [0, --epochs={args.epochs})")

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_mnist(args.data, train_subset=args.train_subset,
                                                  seed=args.seed)
    torch.manual_seed(args.seed)
    model = SmallCNN()
    total = sum(m.weight.numel() for m, _ in prunable(model))
    fit = dict(lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    train_epochs(model, x_train, y_train, range(args.rewind_epoch), **fit)
    snap = snapshot(model)
    train_epochs(model, x_train, y_train, range(args.rewind_epoch, args.epochs), **fit)

    rows = []
    for rnd in range(args.rounds + 1):
        if rnd:
            prune_step(model, rate=args.rate, scope=args.scope)
            rewind(model, snap)
            train_epochs(model, x_train, y_train, range(args.rewind_epoch, args.epochs), **fit)
        frac = nonzero_fraction(model)
        rows.append({"round": rnd, "weights_remaining": round(frac, 4),
                     "nonzero_weights": round(frac * total), "test_accuracy": accuracy(model, x_test, y_test),
                     "seconds": round(time.perf_counter() - start, 1)})
        dense = rows[0]["test_accuracy"]
        r = rows[-1]
        print(f"round {rnd}: {r['weights_remaining']:.3f} of {total} weights "
              f"({r['nonzero_weights']}), test acc {100 * r['test_accuracy']:.2f}% "
              f"({100 * (r['test_accuracy'] - dense):+.2f} pp), {r['seconds']:.0f} s", flush=True)

    print("\n| round | weights remaining | nonzero weights | test accuracy | vs dense |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['weights_remaining']:.3f} | {r['nonzero_weights']} | "
              f"{100 * r['test_accuracy']:.2f}% | {100 * (r['test_accuracy'] - dense):+.2f} pp |")
    delta_pp = 100 * (rows[-1]["test_accuracy"] - dense)
    print(json.dumps({
        "bench": "imp_mnist", "config": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": rows,
        "dense_accuracy": dense, "final_weights_remaining": rows[-1]["weights_remaining"],
        "final_accuracy": rows[-1]["test_accuracy"], "delta_pp": round(delta_pp, 3),
        "held_within_0.5pp": delta_pp >= -0.5, "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
