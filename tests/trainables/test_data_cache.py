"""The dataset cache against real files and a real HTTP server (python -m http.server).

Downloads go through torchvision's own MNIST class from a loopback mirror serving gzip idx
files these tests write; only torchvision's md5 table is replaced, for the positive fetch.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import (
    KNOWN,
    DataConfig,
    DataError,
    fixed_shape,
    load_dataset,
    probe_dataset,
)
from trainables.data import cache as data_cache

SHARED = Path("/work/shared/datasets")
needs_mnist = pytest.mark.skipif(not (SHARED / "mnist.npz").is_file(), reason="no shared mnist.npz")
needs_cifar = pytest.mark.skipif(not (SHARED / "cifar10.npz").is_file(), reason="no shared cifar10.npz")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache and no mirror."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(data_cache.ENV_DATA, str(folder))
    monkeypatch.delenv(data_cache.ENV_MIRROR, raising=False)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _idx_gz(path: Path, arr: np.ndarray) -> str:
    """Write an idx file (uint8; magic 0x0803 images, 0x0801 labels), gzipped; its md5."""
    header = struct.pack(">I", 0x800 + arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], dict[str, np.ndarray]]]:
    """(base URL, {file: md5}, arrays) of a real HTTP server serving a small MNIST."""
    root = tmp_path_factory.mktemp("mirror")
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(300) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(100) % 10).astype(np.uint8),
    }
    md5s = {
        "train-images-idx3-ubyte.gz": _idx_gz(root / "train-images-idx3-ubyte.gz", arrays["x_train"]),
        "train-labels-idx1-ubyte.gz": _idx_gz(root / "train-labels-idx1-ubyte.gz", arrays["y_train"]),
        "t10k-images-idx3-ubyte.gz": _idx_gz(root / "t10k-images-idx3-ubyte.gz", arrays["x_test"]),
        "t10k-labels-idx1-ubyte.gz": _idx_gz(root / "t10k-labels-idx1-ubyte.gz", arrays["y_test"]),
    }
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("http.server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", md5s, arrays
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _no_leftovers(folder: Path) -> None:
    """No raw download folder and no half-written file stays in the cache."""
    if folder.exists():
        junk = [p.name for p in folder.iterdir() if p.name.startswith(".fetch-") or p.suffix == ".part"]
        assert junk == []


# ---------------------------------------------------------------------------- where
def test_cache_dir_env_then_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data_cache.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(data_cache.ENV_DATA)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_cache.cache_dir() == tmp_path / "xdg" / "sparse-search" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_cache.cache_dir() == tmp_path / "home" / ".cache" / "sparse-search" / "data"
    assert not (tmp_path / "home").exists()  # nothing is created by asking


def test_cache_names_are_the_fixed_datasets() -> None:
    assert tuple(KNOWN) == data_cache.DATASETS
    assert {n: s[0] for n, s in data_cache.SHAPES.items()} == {n: c for n, (c, _) in KNOWN.items()}
    with pytest.raises(DataError, match=r"dataset 'digits' has no cache entry: expected one of mnist"):
        data_cache.fetch("digits")


# ---------------------------------------------------------------------------- fetch
def test_checksum_mismatch_is_a_clear_error(mirror: tuple, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, _ = mirror
    monkeypatch.setenv(data_cache.ENV_MIRROR, url)  # torchvision's real md5s: ours differ
    with pytest.raises(DataError, match=r"could not fetch mnist: checksum mismatch for "
                       r"train-images-idx3-ubyte\.gz from http://127\.0\.0\.1:\d+/ \(md5 [0-9a-f]{32}, "
                       r"expected f68b3c2dcbeaaa9fbdd348bbdeb94873\)") as e:
        load_dataset(DataConfig(name="mnist"))
    assert str(cache) in str(e.value) and "sparse-search data import mnist" in str(e.value)
    assert not (cache / "mnist.npz").exists()
    _no_leftovers(cache)


def test_fetch_on_first_use_then_read_from_the_cache(mirror: tuple, cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import MNIST

    url, md5s, arrays = mirror
    monkeypatch.setenv(data_cache.ENV_MIRROR, url)
    monkeypatch.setattr(MNIST, "resources", list(md5s.items()))
    s = load_dataset(DataConfig(name="mnist", val_fraction=0.2))
    assert s.sizes() == {"train": 240, "val": 60, "test": 100}
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert torch.equal(s.x_test[:, 0], torch.from_numpy(arrays["x_test"]))
    with np.load(cache / "mnist.npz") as z:
        assert z["x_train"].shape == (300, 28, 28) and z["x_train"].dtype == np.uint8
        np.testing.assert_array_equal(z["y_train"], arrays["y_train"])
    _no_leftovers(cache)
    # Now cached: no server needed (the mirror points at a closed port).
    monkeypatch.setenv(data_cache.ENV_MIRROR, f"http://127.0.0.1:{_free_port()}")
    again = load_dataset(DataConfig(name="mnist", val_fraction=0.2))
    assert torch.equal(again.x_train, s.x_train)
    assert probe_dataset(DataConfig(name="mnist")) == ((1, 28, 28), 10)
    assert [(e.name, e.n_train, e.n_test) for e in data_cache.cached()] == [("mnist", 300, 100)]


def _assert_offline_error(cfg: DataConfig, cache: Path, call: object = load_dataset) -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        call(cfg)  # type: ignore[operator]
    assert time.monotonic() - start < 5.0
    msg = str(e.value)
    assert msg.startswith(f"could not fetch {cfg.name} into the dataset cache {cache} (")
    assert f"sparse-search data import {cfg.name} FILE_OR_FOLDER" in msg
    assert "--data-path FILE" in msg and "data.path" in msg
    assert not (cache / f"{cfg.name}.npz").exists()
    _no_leftovers(cache)


def test_offline_mirror_fails_fast_with_both_ways_to_supply(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data_cache.ENV_MIRROR, f"http://127.0.0.1:{_free_port()}")
    _assert_offline_error(DataConfig(name="mnist"), cache)
    _assert_offline_error(DataConfig(name="cifar10"), cache)
    _assert_offline_error(DataConfig(name="fashion-mnist"), cache, probe_dataset)


def test_offline_default_sources_fail_fast(cache: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        socket.getaddrinfo(urlparse(MNIST.mirrors[0]).hostname, 443)
    except OSError:
        pass
    else:
        pytest.skip("this machine can resolve the public mirror: not offline")
    _assert_offline_error(DataConfig(name="mnist"), cache)
    _assert_offline_error(DataConfig(name="cifar100"), cache, probe_dataset)


# ---------------------------------------------------------------------------- import
@needs_mnist
def test_import_real_mnist_npz_loads_identically(cache: Path) -> None:
    entry = data_cache.import_dataset("mnist", SHARED / "mnist.npz")
    assert (entry.name, entry.file, entry.n_train, entry.n_test) == ("mnist", cache / "mnist.npz", 60000, 10000)
    assert entry.size_bytes == (cache / "mnist.npz").stat().st_size
    _no_leftovers(cache)
    a = load_dataset(DataConfig(name="mnist"))
    b = load_dataset(DataConfig(name="mnist", path=str(SHARED / "mnist.npz")))
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.class_names == b.class_names and a.mean == b.mean
    assert data_cache.cached() == [entry]


def _cifar_batch(path: Path, n: int, offset: int) -> np.ndarray:
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    labels = [(offset + i) % 10 for i in range(n)]
    with open(path, "wb") as fh:
        pickle.dump({"data": data, "labels": labels}, fh, protocol=2)
    return data


def test_import_torchvision_cifar_folder(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [_cifar_batch(folder / f"data_batch_{i}", 4, 10 * i) for i in range(1, 6)]
    test = _cifar_batch(folder / "test_batch", 5, 100)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(KNOWN["cifar10"][1])}, fh, protocol=2)
    entry = data_cache.import_dataset("cifar10", tmp_path / "root")
    assert (entry.n_train, entry.n_test) == (20, 5)
    with np.load(cache / "cifar10.npz") as z:
        assert z["x_train"].shape == (20, 32, 32, 3)  # the Keras layout
        want = np.concatenate(train).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(z["x_train"], want)
        np.testing.assert_array_equal(z["x_test"], test.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        assert tuple(z["class_names"]) == KNOWN["cifar10"][1]
    assert probe_dataset(DataConfig(name="cifar10")) == ((3, 32, 32), 10)
    assert load_dataset(DataConfig(name="cifar10", val_fraction=0.25)).sizes() == {"train": 15, "val": 5, "test": 5}


def _image_folder(root: Path, classes: list[str], side: int, mode: str, per: int = 2) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    shape = (side, side) if mode == "L" else (side, side, 3)
    written: dict[str, list[np.ndarray]] = {}
    for split, n in (("train", per), ("test", 1)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(px, mode).save(root / split / c / f"{i}.png")
                written.setdefault(f"{split}/{c}", []).append(px)
    return written


def test_import_image_folder_matches_class_names(tmp_path: Path, cache: Path) -> None:
    names = list(KNOWN["cifar10"][1])
    # Folder names differ in case and punctuation only; listed sorted they are not in label order.
    folders = [n.upper() if n == "truck" else n.replace("automobile", "Auto-mobile") for n in names]
    written = _image_folder(tmp_path / "imgs", folders, 32, "RGB")
    entry = data_cache.import_dataset("cifar10", tmp_path / "imgs")
    assert (entry.n_train, entry.n_test) == (20, 10)
    assert entry.note == "class folders matched to cifar10's class names"
    with np.load(cache / "cifar10.npz") as z:
        truck = z["x_test"][z["y_test"] == names.index("truck")]
        np.testing.assert_array_equal(truck[0], written["test/TRUCK"][0])
        assert tuple(z["class_names"]) == tuple(names)


def test_import_image_folder_falls_back_to_sorted_order(tmp_path: Path, cache: Path) -> None:
    folders = [f"digit_{chr(ord('a') + i)}" for i in range(10)]
    written = _image_folder(tmp_path / "imgs", folders[::-1], 28, "L")
    entry = data_cache.import_dataset("mnist", tmp_path / "imgs")
    assert "do not match mnist's class names" in entry.note
    assert "labelled in sorted order (digit_a=0, digit_b=1, ..., digit_j=9)" in entry.note
    s = load_dataset(DataConfig(name="mnist", val_fraction=0.5))
    assert s.class_names == tuple(folders) and s.input_shape == (1, 28, 28)
    with np.load(cache / "mnist.npz") as z:
        np.testing.assert_array_equal(z["x_test"][z["y_test"] == 3][0], written["test/digit_d"][0])


def test_import_rejects_wrong_sizes_counts_and_files(tmp_path: Path, cache: Path) -> None:
    _image_folder(tmp_path / "small", [str(i) for i in range(10)], 16, "RGB", per=1)
    with pytest.raises(DataError, match=r"0\.png: image is 16x16: expected 32x32 for cifar10"):
        data_cache.import_dataset("cifar10", tmp_path / "small")
    _image_folder(tmp_path / "three", ["a", "b", "c"], 28, "L", per=1)
    with pytest.raises(DataError, match=r"train: found 3 class folders: expected 10 for mnist"):
        data_cache.import_dataset("mnist", tmp_path / "three")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes\.txt: not an \.npz file"):
        data_cache.import_dataset("mnist", tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"absent: no such file or folder"):
        data_cache.import_dataset("mnist", tmp_path / "absent")
    np.savez(tmp_path / "wide.npz", x_train=np.zeros((4, 30, 30), np.uint8), y_train=np.zeros(4, np.uint8),
             x_test=np.zeros((2, 30, 30), np.uint8), y_test=np.zeros(2, np.uint8))
    with pytest.raises(DataError, match=r"wide\.npz: train images have shape \(C, H, W\) = \(1, 30, 30\): "
                       r"expected \(1, 28, 28\) for mnist"):
        data_cache.import_dataset("mnist", tmp_path / "wide.npz")
    assert data_cache.cached() == [] and not (cache / "mnist.npz").exists()


def test_cached_reports_an_unreadable_file(cache: Path) -> None:
    cache.mkdir(parents=True)
    (cache / "cifar100.npz").write_bytes(b"not a zip")
    [entry] = data_cache.cached()
    assert (entry.name, entry.n_train, entry.size_bytes) == ("cifar100", None, 9)
    assert entry.note.startswith("unreadable (")


# ---------------------------------------------------------------------------- probe
@needs_cifar
def test_probe_real_cifar10_is_fast_and_agrees_with_load() -> None:
    cfg = DataConfig(name="cifar10", path=str(SHARED / "cifar10.npz"))
    start = time.perf_counter()
    probed = probe_dataset(cfg)
    assert time.perf_counter() - start < 1.0
    s = load_dataset(cfg.replace(subset=100, test_subset=100))
    assert probed == (s.input_shape, s.num_classes) == ((3, 32, 32), 10)


def _same_error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as probed:
        probe_dataset(cfg)
    with pytest.raises(DataError) as loaded:
        load_dataset(cfg)
    # The same message; a parenthesised cause may differ (zipfile's words vs numpy's).
    assert str(probed.value).split(" (")[0] == str(loaded.value).split(" (")[0]
    return str(probed.value)


def test_probe_errors_are_load_errors(tmp_path: Path) -> None:
    msg = _same_error(DataConfig(name="mnist", path=str(tmp_path / "nope.npz")))
    assert msg == f"{tmp_path / 'nope.npz'}: no such file: expected a Keras-layout .npz for mnist " \
                  "(keys x_train, y_train, x_test, y_test)"
    np.savez(tmp_path / "rgb.npz", x_train=np.zeros((4, 28, 28, 3), np.uint8), y_train=np.zeros(4, np.uint8),
             x_test=np.zeros((2, 28, 28, 3), np.uint8), y_test=np.zeros(2, np.uint8))
    msg = _same_error(DataConfig(name="mnist", path=str(tmp_path / "rgb.npz")))
    assert msg == f"{tmp_path / 'rgb.npz'}: x_train has shape (4, 28, 28, 3): expected (N, H, W) or (N, H, W, 1)"
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    assert "junk.npz: not a readable .npz file (" in _same_error(DataConfig(name="mnist", path=str(tmp_path / "junk.npz")))
    np.savez(tmp_path / "labels.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.array([0, 1, 2, 12]),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, np.uint8))
    assert "train label 12 is out of range: expected 0..9" in _same_error(
        DataConfig(name="mnist", path=str(tmp_path / "labels.npz")))
    np.savez(tmp_path / "short.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.zeros(3, np.uint8),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, np.uint8))
    assert "x_train has 4 images but y_train has 3 labels" in _same_error(
        DataConfig(name="mnist", path=str(tmp_path / "short.npz")))
    np.savez(tmp_path / "keys.npz", x_train=np.zeros((4, 28, 28), np.uint8))
    assert "missing keys ['y_train', 'x_test', 'y_test']" in _same_error(
        DataConfig(name="mnist", path=str(tmp_path / "keys.npz")))
    assert "no such directory" in _same_error(DataConfig(name="mnist", path=str(tmp_path / "absent")))
    assert "cifar10 not found" in _same_error(DataConfig(name="cifar10", path=str(tmp_path)))


def test_probe_torchvision_idx_reads_headers_only(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, arr in (("train-images-idx3-ubyte", np.zeros((6, 28, 28))), ("train-labels-idx1-ubyte", np.zeros(6)),
                      ("t10k-images-idx3-ubyte", np.zeros((3, 28, 28))), ("t10k-labels-idx1-ubyte", np.zeros(3))):
        header = struct.pack(">I", 0x800 + arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
        (raw / name).write_bytes(header + arr.astype(np.uint8).tobytes())
    cfg = DataConfig(name="mnist", path=str(tmp_path), val_fraction=0.5)
    assert probe_dataset(cfg) == ((1, 28, 28), 10) == (load_dataset(cfg).input_shape, 10)
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-5])
    assert "corrupt mnist idx file (t10k-images-idx3-ubyte: 2363 bytes, expected 2368 " in _same_error(cfg)
    os.remove(raw / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match=r"mnist not found: expected .*raw to hold train-images-idx3-ubyte"):
        probe_dataset(cfg)


def test_probe_image_folder_and_num_classes(tmp_path: Path) -> None:
    _image_folder(tmp_path / "imgs", ["cat", "dog", "owl"], 20, "RGB", per=1)
    cfg = DataConfig(name="imagefolder", path=str(tmp_path / "imgs"), image_size=16)
    assert probe_dataset(cfg) == ((3, 16, 16), 3)
    assert probe_dataset(cfg.replace(num_classes=3)) == ((3, 16, 16), 3)
    wrong = cfg.replace(num_classes=4)
    msg = _same_error(wrong)
    assert msg == f"{tmp_path / 'imgs' / 'train'}: found 3 class folders but data.num_classes=4: expected them to agree"
    assert "no such directory" in _same_error(cfg.replace(path=str(tmp_path / "absent")))


def test_fixed_shape_without_data() -> None:
    table = {
        "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
        "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
    }
    for name, want in table.items():
        assert fixed_shape(DataConfig(name=name)) == want, name
    folder = DataConfig(name="imagefolder", path="/absent", image_size=64)
    assert fixed_shape(folder) is None
    assert fixed_shape(folder.replace(num_classes=6)) == ((3, 64, 64), 6)


def test_num_classes_validates_and_round_trips() -> None:
    cfg = DataConfig(name="imagefolder", path="/x", image_size=64, num_classes=6)
    assert cfg.to_flat()["data/num_classes"] == 6
    assert DataConfig.from_flat(cfg.to_flat()) == cfg
    assert DataConfig.from_flat(DataConfig(name="cifar10").to_flat()) == DataConfig(name="cifar10")
    with pytest.raises(DataError, match=r"data\.num_classes=1 is invalid: expected an integer >= 2 or null"):
        cfg.replace(num_classes=1)
    assert DataConfig(name="cifar100", num_classes=100).num_classes == 100
