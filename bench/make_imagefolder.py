"""Export a CIFAR-10 subset as an image folder (the Intel-scenes layout study 002 used).

The Intel image-classification set (6 scene classes, 150x150 JPEGs) is not on this machine and
cannot be downloaded here, so the lottery-ticket study (spaces/studies/lottery-ticket.yaml)
runs on a stand-in with the same on-disk layout::

    OUT/train/<class>/<index>.png
    OUT/test/<class>/<index>.png

taken from a Keras-layout CIFAR-10 npz (x_* uint8 (N, 32, 32, 3), y_* labels). PNG is
lossless, so the folder holds exactly the npz's pixels. A stratified, seeded subset keeps
the export small (default 300 train + 100 test images per class: 4,000 files, 16 MB on disk).

OUT must lie outside this repository (a git-tracked tree is no place for thousands of
images), e.g.::

    .venv/bin/python bench/make_imagefolder.py /tmp/cifar10-folder
    .venv/bin/python bench/make_imagefolder.py /tmp/scenes6 --classes airplane,automobile,bird,cat,deer,ship
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "cifar10.npz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def export(
    data: Path,
    out: Path,
    *,
    train_per_class: int,
    test_per_class: int,
    classes: tuple[str, ...] = CIFAR10_CLASSES,
    seed: int = 0,
) -> dict[str, int]:
    """Write the folder; returns images written per split. Raises ValueError on bad input."""
    out = out.resolve()
    if out == REPO_ROOT or REPO_ROOT in out.parents:
        raise ValueError(f"{out} is inside the repository ({REPO_ROOT}): expected a folder "
                         "outside it, e.g. /tmp/cifar10-folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: expected a new or empty folder")
    unknown = [c for c in classes if c not in CIFAR10_CLASSES]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes={','.join(classes)} is invalid: expected at least two "
                         f"distinct names of {', '.join(CIFAR10_CLASSES)}")
    for name, n in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if n < 1:
            raise ValueError(f"{name}={n} must be >= 1")
    if not data.is_file():
        raise ValueError(f"{data}: no such file: expected a Keras-layout CIFAR-10 .npz "
                         "(x_train, y_train, x_test, y_test)")
    rng = np.random.default_rng(seed)
    written = {}
    with np.load(data, allow_pickle=False) as z:
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            x, y = z[f"x_{split}"], z[f"y_{split}"].reshape(-1)
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"{data}: x_{split} has shape {x.shape} and dtype {x.dtype}: "
                                 "expected uint8 (N, H, W, 3)")
            written[split] = 0
            for c in classes:
                idx = np.flatnonzero(y == CIFAR10_CLASSES.index(c))
                if len(idx) < per_class:
                    raise ValueError(f"{data}: {split} has {len(idx)} images of {c!r}: expected "
                                     f"at least {per_class} (lower --{split}-per-class)")
                folder = out / split / c
                folder.mkdir(parents=True, exist_ok=True)
                for i in np.sort(rng.choice(idx, per_class, replace=False)):
                    Image.fromarray(x[i]).save(folder / f"{i:05d}.png")
                written[split] += per_class
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create (outside the repository)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"CIFAR-10 npz (default {DEFAULT_DATA})")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--classes", default=",".join(CIFAR10_CLASSES),
                    help="comma-separated CIFAR-10 class names (default: all ten)")
    ap.add_argument("--seed", type=int, default=0, help="seeds which images are taken")
    args = ap.parse_args(argv)
    try:
        counts = export(args.data, args.out, train_per_class=args.train_per_class,
                        test_per_class=args.test_per_class,
                        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
                        seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train + {counts['test']} test images to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
