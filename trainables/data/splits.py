"""Datasets as uint8 tensors, split once into train / val / test.

Every format ends in the same :class:`Splits`: images ``(N, C, H, W)`` uint8 (normalised per
batch on the training device, never stored as float: 4x less memory and transfer), labels
int64. Validation is carved from TRAIN with a fixed seed and stratified, so it never overlaps
test. Formats:

- ``digits``: scikit-learn's embedded 8x8 digits (no files; 0-16 scaled to 0-255), test carved
  with a constant seed (20 %);
- ``mnist`` / ``fashion-mnist`` / ``cifar10`` / ``cifar100``: by name (``path=None``) from the
  dataset cache (:mod:`trainables.data.cache`: ``<cache>/<name>.npz``, fetched with torchvision
  on first use; ``sparse-search data import`` fills it offline), or from ``path``: a Keras-layout
  ``.npz`` (keys ``x_train, y_train, x_test, y_test``; images ``(N, H, W)`` or ``(N, H, W, C)``)
  or torchvision's on-disk layout under a root dir (``MNIST/raw/*-idx?-ubyte``,
  ``cifar-10-batches-py/``, ...);
- ``imagefolder``: ``<root>/train/<class>/*.jpg`` and ``<root>/test/<class>/*.jpg`` (the Intel
  scenes layout), resized to ``image_size`` and decoded once.

:func:`probe_dataset` checks that the data is there and has the right shape from headers alone
(milliseconds, no pixels read); :func:`fixed_shape` gives (input shape, classes) known without
any data. Nothing is cached in memory across calls: loading MNIST from an npz takes well under
a second.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables import flat
from trainables.data import cache as data_cache

# The file formats live in formats (below cache, which builds on them).
from trainables.data.formats import (
    IMAGE_SUFFIXES,
    KNOWN,
    MNIST_NAMES,
    DataError,
    check_label_range,
    decode_image,
    list_imagefolder,
    load_digits_arrays,
    load_imagefolder,
    probe_cifar,
    probe_idx,
    probe_npz,
    read_fixed,
)

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
FLAT_PREFIX = "data"
DIGITS_TEST_FRACTION = 0.2
# The digits test carve never depends on DataConfig.seed: every trial sees the same test set.
_DIGITS_TEST_SEED = 20240


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives and how it is split. Flat keys ``data/<field>``."""

    # Ray pickles it under the package's public path (trainables.data.DataConfig), as always.
    __module__ = "trainables.data"

    name: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder
    # An .npz file, a torchvision root dir or an image-folder root. None: digits (embedded) or,
    # for the four fixed datasets, <cache>/<name>.npz (fetched on first use). imagefolder needs it.
    path: str | None = None
    val_fraction: float = 0.1  # share of the (subset of) TRAIN held out for validation, stratified
    subset: int | None = None  # images drawn from TRAIN for train+val (stratified); None: all
    test_subset: int | None = None  # images drawn from TEST (stratified); None: all
    image_size: int | None = None  # imagefolder only (required there): resize to image_size^2 pixels
    seed: int = 0  # seeds the val carve and the subsets (not the digits test carve)
    download: bool = False  # with a path: let torchvision fetch mnist/fashion-mnist/cifar into it
    # imagefolder: the class count a dry run uses when the folder is absent; checked against the
    # folder's class folders when it is present. Fixed datasets: must equal theirs when set.
    num_classes: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.name not in DATASETS:
            raise DataError(f"data.name={self.name!r} is invalid: expected one of {', '.join(DATASETS)}")
        if self.path is not None and not isinstance(self.path, str):
            raise DataError(f"data.path={self.path!r} is invalid: expected a path string or null")
        if self.name == "imagefolder" and self.path is None:
            raise DataError("data.path=None is invalid for data.name='imagefolder': expected an "
                            "image-folder root (train/<class>/*.jpg, test/<class>/*.jpg)")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < vf < 1.0:
            raise DataError(f"data.val_fraction={vf!r} is invalid: expected a number in (0, 1)")
        for f in ("subset", "test_subset", "image_size"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise DataError(f"data.{f}={v!r} is invalid: expected an integer >= 2 or null")
        if self.name == "imagefolder" and self.image_size is None:
            raise DataError("data.image_size=None is invalid for imagefolder: expected the side "
                            "in pixels every image is resized to (e.g. 64)")
        k = self.num_classes
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
            raise DataError(f"data.num_classes={k!r} is invalid: expected an integer >= 2 or null")
        known = _fixed_classes(self.name)
        if k is not None and known is not None and k != known:
            raise DataError(f"data.num_classes={k!r} is invalid for data.name={self.name!r}: "
                            f"expected {known} (or null)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DataError(f"data.seed={self.seed!r} is invalid: expected an integer >= 0")
        if not isinstance(self.download, bool):
            raise DataError(f"data.download={self.download!r} is invalid: expected true or false")

    def to_flat(self, prefix: str = FLAT_PREFIX) -> dict[str, Any]:
        return flat.to_flat(self, prefix)

    @classmethod
    def from_flat(cls, flat_dict: Mapping[str, Any], prefix: str = FLAT_PREFIX) -> DataConfig:
        """Inverse of :meth:`to_flat`; other prefixes are ignored, unknown ``data/`` keys are errors."""
        return flat.from_flat(cls, flat_dict, prefix, DataError)

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / val / test images ``(N, C, H, W)`` uint8 and int64 labels, plus what models need.

    Pickles its tensors as numpy arrays: Ray then ships them out-of-band (shared memory, zero
    copy) and they arrive read-only; they are wrapped back into tensors without a copy. The
    training loop only ever indexes them (a copy per batch), never writes in place.
    """

    name: str  # the DataConfig name (picks the "auto" augmentation)
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, 0-1 scale, from x_train
    std: tuple[float, ...]  # per channel, 0-1 scale, from x_train

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        arrays = {k: v.numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
        return _rebuild_splits, ({**state, **arrays},)


def _rebuild_splits(state: dict[str, Any]) -> Splits:
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; torch warns that writing through the
        # tensor would be undefined. Splits are never written in place, so share, don't copy.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        tensors = {k: torch.from_numpy(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    return Splits(**{**state, **tensors})


def _fixed_classes(name: str) -> int | None:
    if name == "digits":
        return len(MNIST_NAMES)
    return len(KNOWN[name][1]) if name in KNOWN else None


# ---------------------------------------------------------------------------- entry point
def load_dataset(cfg: DataConfig) -> Splits:
    """Load, validate, split (stratified val from TRAIN) and subset one dataset."""
    if cfg.name == "digits":
        x, y = load_digits_arrays()
        test_idx, train_idx = _stratified_split(y, DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
        x_tr, y_tr, x_te, y_te = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        names: tuple[str, ...] = MNIST_NAMES
        where = "sklearn digits"
    elif cfg.name == "imagefolder":
        x_tr, y_tr, x_te, y_te, names = load_imagefolder(Path(cfg.path), int(cfg.image_size or 0))
        _check_num_classes(cfg, Path(cfg.path), len(names))
        where = cfg.path
    else:
        x_tr, y_tr, x_te, y_te, names = _load_fixed(cfg)
        where = str(_fixed_path(cfg))
    k = len(names)
    for split, yy in (("train", y_tr), ("test", y_te)):
        check_label_range(yy, where, split, cfg.name, k)

    pool = np.arange(len(y_tr))
    if cfg.subset is not None:
        pool = _take_stratified(y_tr, cfg.subset, cfg.seed, where, "subset")
    val_local, train_local = _stratified_split(y_tr[pool], cfg.val_fraction, cfg.seed)
    train_idx, val_idx = pool[train_local], pool[val_local]
    if len(train_idx) < 2 or len(val_idx) < 1:
        raise DataError(f"{where}: {len(pool)} train images leave {len(train_idx)} for training "
                        f"and {len(val_idx)} for validation: expected at least 2 and 1")
    test_idx = np.arange(len(y_te))
    if cfg.test_subset is not None:
        test_idx = _take_stratified(y_te, cfg.test_subset, cfg.seed, where, "test_subset")
    x_train = x_tr[train_idx]
    mean, std = channel_stats(x_train)
    t = torch.from_numpy
    return Splits(
        name=cfg.name,
        x_train=t(x_train), y_train=t(y_tr[train_idx]),
        x_val=t(x_tr[val_idx]), y_val=t(y_tr[val_idx]),
        x_test=t(x_te[test_idx]), y_test=t(y_te[test_idx]),
        num_classes=k, class_names=tuple(names), mean=mean, std=std,
    )


def _check_num_classes(cfg: DataConfig, root: Path, found: int) -> None:
    if cfg.num_classes is not None and cfg.num_classes != found:
        raise DataError(f"{root / 'train'}: found {found} class folders but "
                        f"data.num_classes={cfg.num_classes}: expected them to agree")


# ---------------------------------------------------------------------------- without loading
def fixed_shape(cfg: DataConfig) -> tuple[tuple[int, int, int], int] | None:
    """``((C, H, W), num_classes)`` known without any data, or None (imagefolder without
    ``num_classes``). For the fixed datasets this is the canonical shape (a custom ``path`` may
    hold other sizes; :func:`probe_dataset` reads what it holds)."""
    if cfg.name == "digits":
        return (1, 8, 8), len(MNIST_NAMES)
    if cfg.name in data_cache.SHAPES:
        return data_cache.SHAPES[cfg.name], len(KNOWN[cfg.name][1])
    if cfg.name == "imagefolder" and cfg.num_classes is not None and cfg.image_size is not None:
        return (3, cfg.image_size, cfg.image_size), cfg.num_classes
    return None


def probe_dataset(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` after checking the data is present, readable and of the
    right shape, from headers alone (an npz's .npy headers and its labels, idx headers, one
    image of a folder): milliseconds even for CIFAR-10. Raises the DataError
    :func:`load_dataset` would raise. A named dataset missing from the cache is fetched first
    (offline: the fetch's DataError, in well under 5 s).

    Not seen without loading: corrupt pixel payloads, CIFAR pickles' contents beyond their
    header byte, images of a folder other than the first.
    """
    if cfg.name == "digits":
        return (1, 8, 8), len(MNIST_NAMES)
    if cfg.name == "imagefolder":
        root = Path(cfg.path)
        listing, classes = list_imagefolder(root)
        for split in ("train", "test"):
            first = next((p for ps in listing[split].values() for p in ps), None)
            if first is None:
                raise DataError(f"{root / split}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        size = int(cfg.image_size or 0)
        decode_image(next(p for ps in listing["train"].values() for p in ps), size)
        _check_num_classes(cfg, root, len(classes))
        return (3, size, size), len(classes)
    channels, names = KNOWN[cfg.name]
    path = _fixed_path(cfg)
    if path.suffix == ".npz":
        shape = probe_npz(path, cfg.name, channels, len(names))
    elif cfg.name in ("mnist", "fashion-mnist"):
        shape = probe_idx(path, cfg.name, cfg.download)
    else:
        shape = probe_cifar(path, cfg.name, cfg.download)
    return shape, len(names)


# ---------------------------------------------------------------------------- splitting
def _stratified_order(y: np.ndarray, seed: int) -> np.ndarray:
    """A permutation whose every prefix is (nearly) class-balanced.

    Each class is shuffled and its i-th member gets the key (i + 0.5) / n_class; sorting by
    that key interleaves the classes in proportion, so the first k items hold about
    k * n_class / N of each class, for any k.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    ys = y[perm]
    order_in_class = np.empty(len(y), dtype=np.float64)
    for c in np.unique(ys):
        members = np.flatnonzero(ys == c)
        order_in_class[members] = (np.arange(len(members)) + 0.5) / len(members)
    return perm[np.argsort(order_in_class, kind="stable")]


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, rest) sorted index arrays; the held-out part is round(fraction * N), >= 1."""
    order = _stratified_order(y, seed)
    n_out = min(max(1, round(fraction * len(y))), len(y) - 1)
    return np.sort(order[:n_out]), np.sort(order[n_out:])


def _take_stratified(y: np.ndarray, n: int, seed: int, where: str | None, field: str) -> np.ndarray:
    if n > len(y):
        raise DataError(f"data.{field}={n} is invalid: {where} has only {len(y)} images there")
    return np.sort(_stratified_order(y, seed + 1)[:n])


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std on the 0-1 scale from a uint8 histogram (no float copy)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = np.bincount(x[:, c].reshape(-1), minlength=256).astype(np.float64)
        p = hist / hist.sum()
        m = float(p @ values)
        means.append(m)
        stds.append(max(float(np.sqrt(p @ (values - m) ** 2)), 1e-3))
    return tuple(means), tuple(stds)


# ---------------------------------------------------------------------------- a fixed dataset
def _fixed_path(cfg: DataConfig) -> Path:
    """``cfg.path``, or the cache file of ``cfg.name`` (fetched first when absent)."""
    if cfg.path is not None:
        return Path(cfg.path)
    return data_cache.ensure(cfg.name)


def _load_fixed(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    return read_fixed(_fixed_path(cfg), cfg.name, download=cfg.download)
