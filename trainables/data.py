"""Datasets as uint8 tensors, split once into train / val / test.

Every format ends in the same :class:`Splits`: images ``(N, C, H, W)`` uint8 (normalised per
batch on the training device, never stored as float: 4x less memory and transfer), labels
int64. Validation is carved from TRAIN with a fixed seed and stratified, so it never overlaps
test. Formats:

- ``digits``: scikit-learn's embedded 8x8 digits (no files; 0-16 scaled to 0-255), test carved
  with a constant seed (20 %);
- ``mnist`` / ``fashion-mnist`` / ``cifar10`` / ``cifar100``: by name (``path=None``) from the
  dataset cache (:mod:`trainables.data_cache`: ``<cache>/<name>.npz``, fetched with torchvision
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
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch

from trainables import data_cache, flat
from trainables.errors import ConfigError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
FLAT_PREFIX = "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DIGITS_TEST_FRACTION = 0.2
# The digits test carve never depends on DataConfig.seed: every trial sees the same test set.
_DIGITS_TEST_SEED = 20240
_MNIST_NAMES = tuple(str(i) for i in range(10))
_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck")
_CIFAR100_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe",
    "whale", "willow_tree", "wolf", "woman", "worm",
)
# name -> (channels, class names) for the fixed-format datasets.
_KNOWN: dict[str, tuple[int, tuple[str, ...]]] = {
    "mnist": (1, _MNIST_NAMES),
    "fashion-mnist": (1, _FASHION_NAMES),
    "cifar10": (3, _CIFAR10_NAMES),
    "cifar100": (3, _CIFAR100_NAMES),
}


class DataError(ConfigError):
    """A dataset that cannot be loaded; the message names the path and what was expected."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives and how it is split. Flat keys ``data/<field>``."""

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
        return len(_MNIST_NAMES)
    return len(_KNOWN[name][1]) if name in _KNOWN else None


# ---------------------------------------------------------------------------- entry point
def load_dataset(cfg: DataConfig) -> Splits:
    """Load, validate, split (stratified val from TRAIN) and subset one dataset."""
    if cfg.name == "digits":
        x, y = _load_digits_arrays()
        test_idx, train_idx = _stratified_split(y, DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
        x_tr, y_tr, x_te, y_te = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        names: tuple[str, ...] = _MNIST_NAMES
        where = "sklearn digits"
    elif cfg.name == "imagefolder":
        x_tr, y_tr, x_te, y_te, names = _load_imagefolder(Path(cfg.path), int(cfg.image_size or 0))
        _check_num_classes(cfg, Path(cfg.path), len(names))
        where = cfg.path
    else:
        x_tr, y_tr, x_te, y_te, names = _load_fixed(cfg)
        where = str(_fixed_path(cfg))
    k = len(names)
    for split, yy in (("train", y_tr), ("test", y_te)):
        _check_label_range(yy, where, split, cfg.name, k)

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


def _check_label_range(y: np.ndarray, where: str | Path, split: str, name: str, k: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= k):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{where}: {split} label {bad} is out of range: expected 0..{k - 1} "
                        f"for {name} ({k} classes)")


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
        return (1, 8, 8), len(_MNIST_NAMES)
    if cfg.name in data_cache.SHAPES:
        return data_cache.SHAPES[cfg.name], len(_KNOWN[cfg.name][1])
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
        return (1, 8, 8), len(_MNIST_NAMES)
    if cfg.name == "imagefolder":
        root = Path(cfg.path)
        listing, classes = _list_imagefolder(root)
        for split in ("train", "test"):
            first = next((p for ps in listing[split].values() for p in ps), None)
            if first is None:
                raise DataError(f"{root / split}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        size = int(cfg.image_size or 0)
        _decode(next(p for ps in listing["train"].values() for p in ps), size)
        _check_num_classes(cfg, root, len(classes))
        return (3, size, size), len(classes)
    channels, names = _KNOWN[cfg.name]
    path = _fixed_path(cfg)
    if path.suffix == ".npz":
        shape = _probe_npz(path, cfg.name, channels, len(names))
    elif cfg.name in ("mnist", "fashion-mnist"):
        shape = _probe_idx(path, cfg)
    else:
        shape = _probe_cifar(path, cfg)
    return shape, len(names)


def _probe_npz(path: Path, name: str, channels: int, k: int) -> tuple[int, int, int]:
    if not path.is_file():
        raise DataError(_no_npz(path, name))
    try:
        headers = data_cache.read_npz_headers(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    _check_keys(path, list(headers))
    shape: tuple[int, int, int] = (0, 0, 0)
    for split in ("train", "test"):
        xs, xdt = headers[f"x_{split}"]
        ys, ydt = headers[f"y_{split}"]
        n, shape = _check_image_header(xs, xdt, path, f"x_{split}", channels)
        m = _check_label_header(ys, ydt, path, f"y_{split}")
        if n != m:
            raise DataError(f"{path}: x_{split} has {n} images but y_{split} has {m} "
                            "labels: expected the same number")
        try:
            with np.load(path, allow_pickle=False) as z:
                y = z[f"y_{split}"]  # labels only: N bytes to 8N, never the pixels
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        _check_label_range(_to_labels(y, path, f"y_{split}"), path, split, name, k)
    return shape


def _probe_idx(root: Path, cfg: DataConfig) -> tuple[int, int, int]:
    from torchvision.datasets import MNIST, FashionMNIST

    cls = MNIST if cfg.name == "mnist" else FashionMNIST
    raw = root / cls.__name__ / "raw"
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    if not all((raw / f).is_file() for f in files):
        if cfg.download:  # what load_dataset would do: download (and read) it
            arrays = _read_torchvision_mnist(root, cfg.name, True)
            return (1, *arrays["x_train"].shape[1:])
        if not root.is_dir():
            raise DataError(f"{root}: no such directory: expected an .npz file or a torchvision "
                            f"root holding {cls.__name__}/raw/*-idx?-ubyte (or set download)")
        raise DataError(f"{root}: {cfg.name} not found: expected {raw} to hold "
                        f"{', '.join(files[:3])} and {files[3]} (or set download)")
    shape: tuple[int, int, int] = (1, 0, 0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n, h, w = _idx_header(raw / f"{prefix}-images-idx3-ubyte", 2051, 3, root, cfg.name)
        (m,) = _idx_header(raw / f"{prefix}-labels-idx1-ubyte", 2049, 1, root, cfg.name)
        if n != m:
            raise DataError(f"{root}: x_{split} has {n} images but y_{split} has {m} "
                            "labels: expected the same number")
        shape = (1, h, w)
    return shape


def _idx_header(path: Path, magic: int, ndim: int, root: Path, name: str) -> tuple[int, ...]:
    """The dims of an idx file, after checking its magic number and that its size matches."""
    with open(path, "rb") as fh:
        head = fh.read(4 + 4 * ndim)
    found = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    if len(head) < 4 + 4 * ndim or found != magic:
        raise DataError(f"{root}: corrupt {name} idx file ({path.name}: magic number {found}, "
                        f"expected {magic})")
    dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if path.stat().st_size != expected:
        raise DataError(f"{root}: corrupt {name} idx file ({path.name}: {path.stat().st_size} "
                        f"bytes, expected {expected} for dims {dims})")
    return dims


def _probe_cifar(root: Path, cfg: DataConfig) -> tuple[int, int, int]:
    folder = root / ("cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python")
    if not folder.is_dir():
        if cfg.download:  # what load_dataset would do: download (and read) it
            arrays, _ = _read_cifar_pickles(root, cfg.name, True)
            return (3, *arrays["x_train"].shape[1:3])
        raise DataError(f"{root}: {cfg.name} not found: expected an .npz file or a torchvision "
                        f"root holding {folder.name}/ (or set download)")
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if cfg.name == "cifar10"
             else ["train", "test"])
    for f in files:
        path = folder / f
        if not path.is_file():
            raise DataError(f"{path}: no such file: expected a CIFAR python-pickle batch")
        with open(path, "rb") as fh:
            head = fh.read(1)
        # Pickle protocol >= 2 opens with the PROTO opcode; a batch holds >= one 3x32x32 image.
        if head != b"\x80" or path.stat().st_size < 3 * 32 * 32:
            raise DataError(f"{path}: not a CIFAR pickle batch ({path.stat().st_size} bytes, "
                            f"starting {head!r}: expected a pickled dict of >= 3072-byte rows)")
    return 3, 32, 32


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


# ---------------------------------------------------------------------------- formats
def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel intensities are 0..16; 255/16 maps them onto the usual uint8 range.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return np.ascontiguousarray(x), bunch.target.astype(np.int64)


def _fixed_path(cfg: DataConfig) -> Path:
    """``cfg.path``, or the cache file of ``cfg.name`` (fetched first when absent)."""
    if cfg.path is not None:
        return Path(cfg.path)
    return data_cache.ensure(cfg.name)


def _no_npz(path: Path, name: str) -> str:
    return (f"{path}: no such file: expected a Keras-layout .npz for {name} "
            "(keys x_train, y_train, x_test, y_test)")


def _load_fixed(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    channels, names = _KNOWN[cfg.name]
    path = _fixed_path(cfg)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(_no_npz(path, cfg.name))
        arrays = _read_npz(path)
        if "class_names" in arrays and len(arrays["class_names"]) == len(names):
            names = tuple(str(n) for n in arrays["class_names"])
    elif cfg.name in ("mnist", "fashion-mnist"):
        arrays = _read_torchvision_mnist(path, cfg.name, cfg.download)
    else:
        arrays, names = _read_cifar_pickles(path, cfg.name, cfg.download)
    out = []
    for split in ("train", "test"):
        x = _to_nchw(arrays[f"x_{split}"], path, f"x_{split}", channels)
        y = _to_labels(arrays[f"y_{split}"], path, f"y_{split}")
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} "
                            "labels: expected the same number")
        out += [x, y]
    return out[0], out[1], out[2], out[3], names


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_keys(path, z.files)
            return {k: z[k] for k in z.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


def _check_keys(path: Path, found: list[str]) -> None:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in found]
    if missing:
        raise DataError(f"{path}: missing keys {missing}: expected x_train, y_train, "
                        f"x_test, y_test (found {sorted(found)})")


def _check_image_header(
    shape: tuple[int, ...], dtype: np.dtype, path: Path, key: str, channels: int
) -> tuple[int, tuple[int, int, int]]:
    """(N, (C, H, W)) of a Keras-layout image array of this shape and dtype, or DataError."""
    if dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {dtype}: expected uint8 images (0-255)")
    if len(shape) == 3:
        n, c, h, w = shape[0], 1, shape[1], shape[2]
    elif len(shape) == 4 and shape[-1] == channels:
        n, h, w, c = shape
    else:
        raise DataError(f"{path}: {key} has shape {tuple(shape)}: expected (N, H, W) or "
                        f"(N, H, W, {channels})")
    if c != channels:
        raise DataError(f"{path}: {key} has {c} channel(s): expected {channels}")
    return n, (c, h, w)


def _check_label_header(shape: tuple[int, ...], dtype: np.dtype, path: Path, key: str) -> int:
    """N of a label array of this shape and dtype ((N,) or Keras CIFAR's (N, 1)), or DataError."""
    if len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]
    if len(shape) != 1 or not np.issubdtype(dtype, np.integer):
        raise DataError(f"{path}: {key} has shape {tuple(shape)} and dtype {dtype}: expected "
                        "(N,) integer class labels")
    return shape[0]


def _to_nchw(x: np.ndarray, path: Path, key: str, channels: int) -> np.ndarray:
    _check_image_header(x.shape, x.dtype, path, key, channels)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _to_labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    _check_label_header(y.shape, y.dtype, path, key)
    if y.ndim == 2:  # Keras CIFAR stores labels as (N, 1)
        y = y[:, 0]
    return y.astype(np.int64)


def _download_error(path: Path, name: str, e: BaseException) -> DataError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DataError(f"{path}: could not download {name} ({first}): this machine may be "
                     "offline; put the files there or pass an .npz file as the data path")


def _read_torchvision_mnist(root: Path, name: str, download: bool) -> dict[str, np.ndarray]:
    from torchvision.datasets import MNIST, FashionMNIST

    cls = MNIST if name == "mnist" else FashionMNIST
    if not download and not root.is_dir():
        raise DataError(f"{root}: no such directory: expected an .npz file or a torchvision root "
                        f"holding {cls.__name__}/raw/*-idx?-ubyte (or set download)")
    raw = root / cls.__name__ / "raw"
    for f, magic, ndim in (("train-images-idx3-ubyte", 2051, 3), ("train-labels-idx1-ubyte", 2049, 1),
                           ("t10k-images-idx3-ubyte", 2051, 3), ("t10k-labels-idx1-ubyte", 2049, 1)):
        if (raw / f).is_file():  # a truncated file is corrupt, not "not found"
            _idx_header(raw / f, magic, ndim, root, name)
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(str(root), train=train, download=download)
        except (RuntimeError, URLError, OSError) as e:
            if download:
                raise _download_error(root, name, e) from None
            raise DataError(f"{root}: {name} not found: expected {root / cls.__name__ / 'raw'} "
                            "to hold train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                            "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
                            f"(or set download) ({e})") from None
        except ValueError as e:  # torchvision's idx parser on a corrupt or truncated file
            raise DataError(f"{root}: corrupt {name} idx file ({e})") from None
        out[f"x_{split}"] = ds.data.numpy()
        out[f"y_{split}"] = ds.targets.numpy()
    return out


def _read_cifar_pickles(
    root: Path, name: str, download: bool
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """torchvision's CIFAR layout, read directly (torchvision would insist on the md5 sums)."""
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = ["test_batch"], "batches.meta", "labels", "label_names"
    else:
        train_files, test_files = ["train"], ["test"]
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    if download and not folder.is_dir():
        from torchvision.datasets import CIFAR10, CIFAR100

        try:
            (CIFAR10 if name == "cifar10" else CIFAR100)(str(root), train=True, download=True)
        except (RuntimeError, URLError, OSError) as e:
            raise _download_error(root, name, e) from None
    if not folder.is_dir():
        raise DataError(f"{root}: {name} not found: expected an .npz file or a torchvision root "
                        f"holding {folder.name}/ (or set download)")
    out: dict[str, np.ndarray] = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for f in files:
            batch = _unpickle(folder / f)
            try:
                data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
            except KeyError as e:
                raise DataError(f"{folder / f}: missing key {e}: expected 'data' and "
                                f"{label_key!r}") from None
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % 3:
                raise DataError(f"{folder / f}: 'data' has shape {data.shape} and dtype "
                                f"{data.dtype}: expected (N, 3*H*W) uint8")
            side = round((data.shape[1] // 3) ** 0.5)
            if 3 * side * side != data.shape[1]:
                raise DataError(f"{folder / f}: rows of {data.shape[1]} values are not "
                                "3 square planes")
            # Rows are 3 planes (R, G, B) of side*side pixels: reshaping gives (N, C, H, W).
            xs.append(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
            ys.append(labels)
        out[f"x_{split}"], out[f"y_{split}"] = np.concatenate(xs), np.concatenate(ys)
    names = _KNOWN[name][1]
    meta = folder / meta_file
    if meta.is_file():
        listed = _unpickle(meta).get(names_key)
        if listed is not None and len(listed) == len(names):
            names = tuple(str(n) for n in listed)
    return out, names


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: no such file: expected a CIFAR python-pickle batch")
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a CIFAR pickle batch ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: holds a {type(d).__name__}: expected a dict batch")
    return d


def _list_imagefolder(root: Path) -> tuple[dict[str, dict[str, list[Path]]], tuple[str, ...]]:
    """{split: {class: sorted image paths}} and the (sorted) train class names, checked."""
    if not root.is_dir():
        raise DataError(f"{root}: no such directory: expected train/<class>/*.jpg and "
                        "test/<class>/*.jpg under it")
    listing = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{root}: missing {split}/: expected {split}/<class>/<image> folders")
        listing[split] = {
            c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for c in sorted(d.iterdir()) if c.is_dir()
        }
    classes = tuple(listing["train"])
    if len(classes) < 2:
        raise DataError(f"{root / 'train'}: found {len(classes)} class folder(s): expected at least 2")
    extra = sorted(set(listing["test"]) - set(classes))
    if extra:
        raise DataError(f"{root / 'test'}: class folder(s) {extra} are not in train/: expected "
                        f"a subset of {list(classes)}")
    return listing, classes


def _load_imagefolder(
    root: Path, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    listing, classes = _list_imagefolder(root)
    out = []
    for split in ("train", "test"):
        files = [(p, classes.index(c)) for c, ps in listing[split].items() for p in ps]
        if not files:
            raise DataError(f"{root / split}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        workers = max(1, len(os.sched_getaffinity(0)))
        # PIL releases the GIL while decoding, so threads give a near-linear speedup here.
        with ThreadPoolExecutor(workers) as pool:
            images = list(pool.map(lambda p: _decode(p, size), [p for p, _ in files]))
        out.append(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
        out.append(np.array([c for _, c in files], dtype=np.int64))
    return out[0], out[1], out[2], out[3], classes


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
            rgb = im.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
