"""The dataset file formats behind :mod:`trainables.data`: reading and probing them.

Owns every on-disk layout a dataset can come in and what each must hold: a Keras-layout
``.npz``, torchvision's MNIST idx files and CIFAR python pickles, an image folder
(``<root>/{train,test}/<class>/*``), and sklearn's embedded digits. Readers return uint8
``(N, C, H, W)`` images and int64 labels (or the raw arrays :mod:`trainables.data.cache`
stores); probes check a layout from headers alone. Choosing a format from a
:class:`~trainables.data.DataConfig`, splitting and subsetting stay in :mod:`trainables.data`.
The layering: data_formats (readers; imports neither) <- data_cache (the cache, its fetch and
import) <- data (configs, splits).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
from numpy.lib import format as npy_format

from trainables.errors import ConfigError

__all__ = [
    "IMAGE_SUFFIXES",
    "KNOWN",
    "MNIST_NAMES",
    "DataError",
    "check_label_range",
    "decode_image",
    "list_imagefolder",
    "load_digits_arrays",
    "load_imagefolder",
    "probe_cifar",
    "probe_idx",
    "probe_npz",
    "read_cifar_pickles",
    "read_fixed",
    "read_npz_headers",
    "read_torchvision_mnist",
]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

MNIST_NAMES = tuple(str(i) for i in range(10))
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
KNOWN: dict[str, tuple[int, tuple[str, ...]]] = {
    "mnist": (1, MNIST_NAMES),
    "fashion-mnist": (1, _FASHION_NAMES),
    "cifar10": (3, _CIFAR10_NAMES),
    "cifar100": (3, _CIFAR100_NAMES),
}


class DataError(ConfigError):
    """A dataset that cannot be loaded; the message names the path and what was expected."""

    # Defined here so the readers can raise it without importing trainables.data (a cycle);
    # public, pickled and printed as trainables.data.DataError, as it always has been.
    __module__ = "trainables.data"


def check_label_range(y: np.ndarray, where: str | Path, split: str, name: str, k: int) -> None:
    if len(y) and (y.min() < 0 or y.max() >= k):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{where}: {split} label {bad} is out of range: expected 0..{k - 1} "
                        f"for {name} ({k} classes)")


def probe_npz(path: Path, name: str, channels: int, k: int) -> tuple[int, int, int]:
    if not path.is_file():
        raise DataError(_no_npz(path, name))
    try:
        headers = read_npz_headers(path)
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
        check_label_range(_to_labels(y, path, f"y_{split}"), path, split, name, k)
    return shape


def probe_idx(root: Path, name: str, download: bool) -> tuple[int, int, int]:
    from torchvision.datasets import MNIST, FashionMNIST

    cls = MNIST if name == "mnist" else FashionMNIST
    raw = root / cls.__name__ / "raw"
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    if not all((raw / f).is_file() for f in files):
        if download:  # what load_dataset would do: download (and read) it
            arrays = read_torchvision_mnist(root, name, True)
            return (1, *arrays["x_train"].shape[1:])
        if not root.is_dir():
            raise DataError(f"{root}: no such directory: expected an .npz file or a torchvision "
                            f"root holding {cls.__name__}/raw/*-idx?-ubyte (or set download)")
        raise DataError(f"{root}: {name} not found: expected {raw} to hold "
                        f"{', '.join(files[:3])} and {files[3]} (or set download)")
    shape: tuple[int, int, int] = (1, 0, 0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n, h, w = _idx_header(raw / f"{prefix}-images-idx3-ubyte", 2051, 3, root, name)
        (m,) = _idx_header(raw / f"{prefix}-labels-idx1-ubyte", 2049, 1, root, name)
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


def probe_cifar(root: Path, name: str, download: bool) -> tuple[int, int, int]:
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not folder.is_dir():
        if download:  # what load_dataset would do: download (and read) it
            arrays, _ = read_cifar_pickles(root, name, True)
            return (3, *arrays["x_train"].shape[1:3])
        raise DataError(f"{root}: {name} not found: expected an .npz file or a torchvision "
                        f"root holding {folder.name}/ (or set download)")
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10"
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


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel intensities are 0..16; 255/16 maps them onto the usual uint8 range.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return np.ascontiguousarray(x), bunch.target.astype(np.int64)


def _no_npz(path: Path, name: str) -> str:
    return (f"{path}: no such file: expected a Keras-layout .npz for {name} "
            "(keys x_train, y_train, x_test, y_test)")


def read_npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of every ``.npy`` member of an ``.npz``, read from the npy
    headers alone (microseconds, whatever the file's size).

    Raises ``OSError`` / ``ValueError`` / ``zipfile.BadZipFile`` on an unreadable file.
    """
    out = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as fh:
                version = npy_format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = npy_format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, _, dtype = npy_format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"{member}: npy format version {version} is not supported")
            out[member[: -len(".npy")]] = (tuple(int(s) for s in shape), dtype)
    return out


def read_fixed(path: Path, name: str, *, download: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """A fixed dataset ``name`` (mnist, fashion-mnist, cifar10, cifar100) from ``path``: a
    Keras-layout ``.npz`` or a torchvision root folder. uint8 ``(N, C, H, W)`` train and test
    images, int64 labels and the class names."""
    channels, names = KNOWN[name]
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(_no_npz(path, name))
        arrays = _read_npz(path)
        if "class_names" in arrays and len(arrays["class_names"]) == len(names):
            names = tuple(str(n) for n in arrays["class_names"])
    elif name in ("mnist", "fashion-mnist"):
        arrays = read_torchvision_mnist(path, name, download)
    else:
        arrays, names = read_cifar_pickles(path, name, download)
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


def read_torchvision_mnist(root: Path, name: str, download: bool) -> dict[str, np.ndarray]:
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


def read_cifar_pickles(
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
    names = KNOWN[name][1]
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


def list_imagefolder(root: Path) -> tuple[dict[str, dict[str, list[Path]]], tuple[str, ...]]:
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


def load_imagefolder(
    root: Path, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    listing, classes = list_imagefolder(root)
    out = []
    for split in ("train", "test"):
        files = [(p, classes.index(c)) for c, ps in listing[split].items() for p in ps]
        if not files:
            raise DataError(f"{root / split}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        workers = max(1, len(os.sched_getaffinity(0)))
        # PIL releases the GIL while decoding, so threads give a near-linear speedup here.
        with ThreadPoolExecutor(workers) as pool:
            images = list(pool.map(lambda p: decode_image(p, size), [p for p, _ in files]))
        out.append(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
        out.append(np.array([c for _, c in files], dtype=np.int64))
    return out[0], out[1], out[2], out[3], classes


def decode_image(path: Path, size: int) -> np.ndarray:
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
