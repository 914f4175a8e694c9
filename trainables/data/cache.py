"""The dataset cache: fixed-shape datasets named, not located.

One folder (:func:`cache_dir`: ``$SPARSE_SEARCH_DATA``, else
``$XDG_CACHE_HOME/sparse-search/data``, default ``~/.cache/sparse-search/data``) holds each of
mnist, fashion-mnist, cifar10 and cifar100 as ``<name>.npz`` in the Keras layout
:mod:`trainables.data` reads (``x_train, y_train, x_test, y_test``, uint8 images ``(N, H, W)``
or ``(N, H, W, C)``, plus ``class_names``). Files are written uncompressed (``np.savez``: the
180 MB CIFAR-10 file loads in a fraction of a second) and atomically (a temp file in the same
folder, then ``os.replace``), so a killed fetch never leaves a half file behind.

- :func:`fetch` downloads through torchvision's own dataset classes (which check their md5
  sums), from ``$SPARSE_SEARCH_DATA_MIRROR/<file name>`` when that is set; each socket
  operation gives up after :data:`SOCKET_TIMEOUT_S` seconds, so an offline machine fails in
  well under 5 s with a :class:`~trainables.data.DataError` that says how to supply the data.
- :func:`import_dataset` copies in what a user already has: a Keras-layout ``.npz``, a
  torchvision root folder, or an image folder ``<root>/train/<class>/*.png`` +
  ``<root>/test/<class>/...`` at the dataset's native size.
- :func:`cached` lists the cache without reading any pixels.

This module imports only the standard library, numpy and the file-format readers
(:mod:`trainables.data.formats`, no torch) at module level (``sparse-search data path`` and
``data list`` stay fast); torch and torchvision are imported by the functions that need them.
It never imports :mod:`trainables.data`, which builds on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainables.data.formats import (
    KNOWN,
    DataError,
    list_imagefolder,
    read_cifar_pickles,
    read_fixed,
    read_npz_headers,
    read_torchvision_mnist,
)

__all__ = [
    "DATASETS",
    "ENV_DATA",
    "ENV_MIRROR",
    "SHAPES",
    "CachedDataset",
    "cache_dir",
    "cache_file",
    "cached",
    "ensure",
    "fetch",
    "import_dataset",
    "read_npz_headers",
]

# The fixed-shape datasets, as trainables.data._KNOWN lists them (a test checks they agree).
DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
# (C, H, W) every image of a cached dataset has; import and fetch refuse anything else.
SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
}
ENV_DATA = "SPARSE_SEARCH_DATA"  # the cache folder itself, when set
ENV_MIRROR = "SPARSE_SEARCH_DATA_MIRROR"  # base URL: every file is fetched from <mirror>/<file>
# Seconds one socket operation (connect, one read) may wait. Unreachable hosts fail at once
# (no DNS, refused); a firewall that drops packets costs this, once: see _FETCH_BUDGET_S.
SOCKET_TIMEOUT_S = 3.0
# After this many seconds of failures no further default mirror is tried (offline < 5 s).
_FETCH_BUDGET_S = 1.5
_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class CachedDataset:
    """One ``<name>.npz`` of the cache, described from its headers (no pixels read)."""

    name: str  # mnist | fashion-mnist | cifar10 | cifar100
    file: Path  # <cache_dir()>/<name>.npz
    size_bytes: int
    n_train: int | None  # images in x_train; None when the file is unreadable
    n_test: int | None  # images in x_test; None when the file is unreadable
    note: str = ""  # import: how class folders became labels; list: why a file is unreadable

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": str(self.file), "size_bytes": self.size_bytes,
                "n_train": self.n_train, "n_test": self.n_test, "note": self.note}


# ---------------------------------------------------------------------------- where
def cache_dir() -> Path:
    """The cache folder (absolute; created only when something is written there)."""
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "sparse-search" / "data").absolute()


def cache_file(name: str) -> Path:
    """``<cache_dir()>/<name>.npz`` (whether or not it exists)."""
    _check_name(name)
    return cache_dir() / f"{name}.npz"


def cached() -> list[CachedDataset]:
    """What the cache holds, in :data:`DATASETS` order (headers only, no pixels read)."""
    out = []
    for name in DATASETS:
        path = cache_dir() / f"{name}.npz"
        if not path.is_file():
            continue
        size = path.stat().st_size
        try:
            headers = read_npz_headers(path)
            n_train, n_test = headers["x_train"][0][0], headers["x_test"][0][0]
        except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
            out.append(CachedDataset(name, path, size, None, None, note=f"unreadable ({e})"))
            continue
        out.append(CachedDataset(name, path, size, n_train, n_test))
    return out


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise _data_error(f"dataset {name!r} has no cache entry: expected one of "
                          f"{', '.join(DATASETS)} (digits needs no file; imagefolder needs a path)")


def _data_error(message: str) -> DataError:

    return DataError(message)


def _supply_hint(name: str) -> str:
    return (f"supply the data yourself: `sparse-search data import {name} FILE_OR_FOLDER` "
            "(a Keras-layout .npz, a torchvision root folder or an image folder), or "
            "`--data-path FILE` (data.path in the spec)")


# ---------------------------------------------------------------------------- fetch
def ensure(name: str) -> Path:
    """The cache file of ``name``, fetched first when absent (concurrent callers, e.g. Ray
    trials starting together, wait for one fetch instead of each downloading)."""
    path = cache_file(name)
    if path.is_file():
        return path
    folder = _make_folder()
    with open(folder / f".{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                fetch(name)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def fetch(name: str) -> CachedDataset:
    """Download ``name`` with torchvision (md5 checked), convert it, write ``<name>.npz``.

    The raw download goes to a temporary folder inside the cache and is removed afterwards,
    whether or not the fetch succeeded. Overwrites an existing cache file.
    """
    _check_name(name)
    folder = _make_folder()
    raw = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=folder))
    try:
        arrays, names = _download(name, raw)
        return _write(name, arrays, names)
    finally:
        shutil.rmtree(raw, ignore_errors=True)


def _make_folder() -> Path:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _data_error(f"{folder}: cannot create the dataset cache folder ({e}): expected a "
                          f"writable folder (set ${ENV_DATA} to choose another)") from None
    return folder


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _mirror_unreachable(mirror: str) -> str | None:
    """Why the mirror's host cannot be reached (refused, no route, no name), or None: a
    second's socket check that spares importing torchvision (seconds) when it cannot work."""
    from urllib.parse import urlparse

    u = urlparse(mirror)
    if not u.hostname:
        return None
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=1.0).close()
    except OSError as e:
        return f"{mirror}: {e.strerror or e}"
    return None


def _download(name: str, raw: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    from urllib.error import URLError

    mirror = os.environ.get(ENV_MIRROR, "").strip().rstrip("/")
    why = _mirror_unreachable(mirror) if mirror else None
    if why is not None:
        raise _data_error(
            f"could not fetch {name} into the dataset cache {cache_dir()} ({why}): this "
            f"machine may be offline or the source unreachable; {_supply_hint(name)}")
    from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST


    base = {"mnist": MNIST, "fashion-mnist": FashionMNIST, "cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    is_mnist = name in ("mnist", "fashion-mnist")
    if is_mnist:
        bases = [mirror + "/"] if mirror else list(base.mirrors)
        # One class per mirror, each a subclass that only changes where files come from (and
        # keeps the name: torchvision's folder layout is <root>/<class name>/raw).
        classes = [type(base.__name__, (base,), {"mirrors": [b]}) for b in bases]
        where = bases
    else:
        url = f"{mirror}/{base.filename}" if mirror else base.url
        classes, where = [type(base.__name__, (base,), {"url": url})], [url]
    start, errors, mismatch, ok = time.monotonic(), [], None, False
    with _socket_timeout(SOCKET_TIMEOUT_S):
        for cls, src in zip(classes, where, strict=True):
            try:
                cls(str(raw), train=False, download=True)  # downloads both splits, checks md5
                ok = True
                break
            except (RuntimeError, URLError, OSError, ValueError) as e:
                # torchvision says "File not found or corrupted." when a finished download
                # has the wrong md5 (a timeout mid-file is an OSError, not a mismatch).
                bad = _checksum_mismatch(cls, raw, is_mnist) if "corrupted" in str(e) else None
                if bad is not None:
                    mismatch = (*bad, src)
                why = _one_line(e)
                errors.append(why if src in why else f"{src}: {why}")
                if time.monotonic() - start > _FETCH_BUDGET_S:
                    break  # an offline machine will not reach the next mirror either
    if not ok and mismatch is not None:
        file, got, want, src = mismatch
        raise _data_error(
            f"could not fetch {name}: checksum mismatch for {file.name} from {src} "
            f"(md5 {got}, expected {want}): a corrupt download or a mirror serving other "
            f"files; nothing was written to {cache_dir()}; {_supply_hint(name)}"
        )
    if not ok:
        raise _data_error(
            f"could not fetch {name} into the dataset cache {cache_dir()} "
            f"({'; '.join(errors)}): this machine may be offline or the source unreachable; "
            f"{_supply_hint(name)}"
        )
    if is_mnist:
        return read_torchvision_mnist(raw, name, False), ()
    arrays, names = read_cifar_pickles(raw, name, False)
    return arrays, names


def _checksum_mismatch(cls: type, raw: Path, is_mnist: bool) -> tuple[Path, str, str] | None:
    """(file, md5 found, md5 expected) of a downloaded file whose md5 is wrong, if any."""
    from torchvision.datasets.utils import calculate_md5

    if is_mnist:
        expected = [(raw / cls.__name__ / "raw" / f, md5) for f, md5 in cls.resources]
    else:
        expected = [(raw / cls.filename, cls.tgz_md5)]
        expected += [(raw / cls.base_folder / f, md5) for f, md5 in cls.train_list + cls.test_list]
    for path, md5 in expected:
        if path.is_file():
            got = calculate_md5(path)
            if got != md5:
                return path, got, md5
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------- import
def import_dataset(name: str, source: str | os.PathLike[str]) -> CachedDataset:
    """Validate ``source`` as dataset ``name`` and write it to the cache as ``<name>.npz``.

    ``source``: a Keras-layout ``.npz``; a torchvision root folder (``MNIST/raw/*-idx?-ubyte``,
    ``cifar-10-batches-py/``, ...); or an image folder ``train/<class>/*`` + ``test/<class>/*``
    whose images all have the dataset's size (28x28 for the MNISTs, 32x32 for the CIFARs;
    converted to grayscale / RGB). Class folders are matched to the dataset's class names
    (case, spaces and punctuation ignored) or, failing that, labelled in sorted order; the
    returned :attr:`CachedDataset.note` says which.
    """

    _check_name(name)
    src = Path(source).expanduser()
    if not src.exists():
        raise DataError(f"{src}: no such file or folder: expected a Keras-layout .npz, a "
                        f"torchvision root folder or an image folder (train/<class>/, test/<class>/) "
                        f"holding {name}")
    note = ""
    if src.is_dir() and (src / "train").is_dir() and (src / "test").is_dir():
        x_tr, y_tr, x_te, y_te, names, note = _read_image_folder(src, name)
    elif src.is_file() and src.suffix != ".npz":
        raise DataError(f"{src}: not an .npz file: expected a Keras-layout .npz (keys x_train, "
                        "y_train, x_test, y_test), a torchvision root folder or an image folder")
    else:
        x_tr, y_tr, x_te, y_te, names = read_fixed(src, name, download=False)
    want = SHAPES[name]
    k = len(names)
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if len(y) == 0:
            raise DataError(f"{src}: no {split} images: expected at least one")
        if tuple(x.shape[1:]) != want:
            raise DataError(f"{src}: {split} images have shape (C, H, W) = {tuple(x.shape[1:])}: "
                            f"expected {want} for {name}")
        if y.min() < 0 or y.max() >= k:
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(f"{src}: {split} label {bad} is out of range: expected 0..{k - 1} "
                            f"for {name} ({k} classes)")
    # Back to the Keras layout: (N, H, W) for one channel, (N, H, W, C) for three.
    keras = {
        "x_train": x_tr[:, 0] if want[0] == 1 else x_tr.transpose(0, 2, 3, 1),
        "y_train": y_tr,
        "x_test": x_te[:, 0] if want[0] == 1 else x_te.transpose(0, 2, 3, 1),
        "y_test": y_te,
    }
    written = _write(name, keras, names)
    return CachedDataset(written.name, written.file, written.size_bytes, written.n_train,
                         written.n_test, note=note)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _read_image_folder(
    root: Path, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], str]:

    listing, folders = list_imagefolder(root)
    known = KNOWN[name][1]
    if len(folders) != len(known):
        raise DataError(f"{root / 'train'}: found {len(folders)} class folders: expected "
                        f"{len(known)} for {name}")
    by_norm = {_norm(n): i for i, n in enumerate(known)}
    if sorted(by_norm) == sorted(_norm(f) for f in folders):
        label = {f: by_norm[_norm(f)] for f in folders}
        names = known
        note = f"class folders matched to {name}'s class names"
    else:
        label = {f: i for i, f in enumerate(folders)}  # folders are listed sorted
        names = folders
        note = (f"class folders do not match {name}'s class names ({', '.join(known[:3])}, ...): "
                f"labelled in sorted order ({folders[0]}=0, {folders[1]}=1, ..., "
                f"{folders[-1]}={len(folders) - 1})")
    channels, h, w = SHAPES[name]
    mode = "L" if channels == 1 else "RGB"
    out: list[np.ndarray] = []
    for split in ("train", "test"):
        files = [(p, label[c]) for c, ps in listing[split].items() for p in ps]
        if not files:
            raise DataError(f"{root / split}: no images found: expected {split}/<class>/<image>")
        images = np.empty((len(files), h, w), dtype=np.uint8) if channels == 1 else \
            np.empty((len(files), h, w, channels), dtype=np.uint8)
        for i, (p, _) in enumerate(files):
            images[i] = _decode_native(p, mode, (w, h), name)
        out.append(images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2))
        out.append(np.array([c for _, c in files], dtype=np.int64))
    return out[0], out[1], out[2], out[3], tuple(names), note


def _decode_native(path: Path, mode: str, size: tuple[int, int], name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError


    try:
        with Image.open(path) as im:
            if im.size != size:
                raise DataError(f"{path}: image is {im.size[0]}x{im.size[1]}: expected "
                                f"{size[0]}x{size[1]} for {name} (images are not resized)")
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


# ---------------------------------------------------------------------------- write
def _write(name: str, arrays: dict[str, np.ndarray], names: tuple[str, ...]) -> CachedDataset:
    """Write ``<name>.npz`` atomically (temp file in the cache folder, then os.replace)."""

    folder = _make_folder()
    target = folder / f"{name}.npz"
    tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.npz.part"
    names = names or KNOWN[name][1]
    try:
        with open(tmp, "xb") as fh:  # honours the umask (a shared cache stays readable)
            np.savez(fh, **{k: np.ascontiguousarray(arrays[k]) for k in _KEYS},
                     class_names=np.array(names, dtype=str))
        os.replace(tmp, target)
    except OSError as e:
        raise _data_error(f"{target}: could not write the dataset cache file ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return CachedDataset(name, target, target.stat().st_size, len(arrays["y_train"]),
                         len(arrays["y_test"]))
