"""Every dataset format round-trips from tiny generated files; splits are stratified and disjoint."""

from __future__ import annotations

import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import DataConfig, DataError, Splits, load_dataset


def _images(n: int, h: int, w: int, c: int | None, *, offset: int = 0) -> np.ndarray:
    """uint8 images whose first two pixels encode a unique id (offset + index)."""
    rng = np.random.default_rng(offset)
    shape = (n, h, w) if c is None else (n, h, w, c)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    flat = x.reshape(n, -1)
    flat[:, 0], flat[:, 1] = ids % 256, ids // 256
    return x


def _ids(x: torch.Tensor) -> set[int]:
    """The ids :func:`_images` wrote, read back from (N, C, H, W) tensors."""
    flat = x.permute(0, 2, 3, 1).reshape(len(x), -1).numpy().astype(np.int64)
    return set((flat[:, 0] + 256 * flat[:, 1]).tolist())


def _labels(n: int, k: int = 10) -> np.ndarray:
    return (np.arange(n) % k).astype(np.uint8)


def _write_npz(path: Path, *, n_train: int = 200, n_test: int = 50, c: int | None = None,
               side: int = 28, **override: np.ndarray) -> Path:
    arrays = {
        "x_train": _images(n_train, side, side, c),
        "y_train": _labels(n_train),
        "x_test": _images(n_test, side, side, c, offset=10_000),
        "y_test": _labels(n_test),
    }
    arrays.update(override)
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------- splits
def test_digits_splits_are_stratified_disjoint_and_uint8() -> None:
    s = load_dataset(DataConfig(name="digits", val_fraction=0.2))
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert s.x_train.dtype == torch.uint8 and s.y_train.dtype == torch.int64
    assert int(s.x_train.max()) == 255  # 0-16 intensities rescaled to the uint8 range
    n = sum(s.sizes().values())
    assert n == 1797 and s.sizes()["test"] == round(0.2 * 1797)
    assert s.sizes()["val"] == round(0.2 * (1797 - s.sizes()["test"]))
    val_counts = torch.bincount(s.y_val, minlength=10)
    assert int(val_counts.max() - val_counts.min()) <= 2  # stratified: ~29 of each digit


def test_digits_test_split_does_not_depend_on_the_seed() -> None:
    a = load_dataset(DataConfig(name="digits", seed=0))
    b = load_dataset(DataConfig(name="digits", seed=7))
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.y_val, b.y_val) or not torch.equal(a.x_val, b.x_val)


def test_npz_mnist_layout_round_trips_with_disjoint_val(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "mnist.npz")
    s = load_dataset(DataConfig(name="mnist", path=str(path), val_fraction=0.25))
    assert s.input_shape == (1, 28, 28)
    assert s.sizes() == {"train": 150, "val": 50, "test": 50}
    train, val, test = _ids(s.x_train), _ids(s.x_val), _ids(s.x_test)
    assert not train & val and train | val == set(range(200)) and test == set(range(10_000, 10_050))
    # every label still belongs to its image: label = id % 10
    for x, y in ((s.x_train, s.y_train), (s.x_val, s.y_val)):
        ids = x.reshape(len(x), -1)[:, :2].long()  # one channel: NCHW order is NHW order
        assert torch.equal((ids[:, 0] + 256 * ids[:, 1]) % 10, y)
    assert torch.bincount(s.y_val, minlength=10).tolist() == [5] * 10
    assert s.class_names == tuple(str(i) for i in range(10))


def test_npz_cifar_layout_nhwc_with_column_labels(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "c.npz", c=3, side=32, y_train=_labels(200)[:, None],
                      y_test=_labels(50)[:, None], class_names=np.array([f"c{i}" for i in range(10)]))
    s = load_dataset(DataConfig(name="cifar10", path=str(path)))
    assert s.input_shape == (3, 32, 32) and s.class_names[3] == "c3"
    raw = np.load(path)["x_test"]
    assert np.array_equal(s.x_test.numpy(), raw.transpose(0, 3, 1, 2))
    # mean/std per channel on the 0-1 scale, from the train split only
    expect = s.x_train.double().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(s.mean, expect.numpy(), atol=1e-9)
    assert np.allclose(s.std, s.x_train.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
                       .std(dim=1, unbiased=False).numpy(), atol=1e-9)


def test_subsets_are_stratified_and_sized(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "m.npz", n_train=400, n_test=100)
    s = load_dataset(DataConfig(name="mnist", path=str(path), subset=100, test_subset=40))
    assert s.sizes() == {"train": 90, "val": 10, "test": 40}
    assert torch.bincount(s.y_test, minlength=10).tolist() == [4] * 10
    assert torch.bincount(torch.cat([s.y_train, s.y_val]), minlength=10).tolist() == [10] * 10


def _idx(path: Path, array: np.ndarray) -> None:
    """Write an MNIST idx file (big-endian dims; type 0x08 = uint8)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_idx_layout(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    x_tr, x_te = _images(60, 28, 28, None), _images(20, 28, 28, None, offset=500)
    _idx(raw / "train-images-idx3-ubyte", x_tr)
    _idx(raw / "train-labels-idx1-ubyte", _labels(60))
    _idx(raw / "t10k-images-idx3-ubyte", x_te)
    _idx(raw / "t10k-labels-idx1-ubyte", _labels(20))
    s = load_dataset(DataConfig(name=name, path=str(tmp_path)))
    assert s.sizes() == {"train": 54, "val": 6, "test": 20}
    assert np.array_equal(s.x_test.numpy()[:, 0], x_te)
    assert _ids(s.x_train) | _ids(s.x_val) == set(range(60))
    if name == "fashion-mnist":
        assert s.class_names[9] == "Ankle boot"


def _cifar_batch(x_nhwc: np.ndarray, labels: np.ndarray, key: str) -> dict:
    # CIFAR rows are 3 planes of H*W values: (N, H, W, C) -> (N, C*H*W)
    return {"data": x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), -1), key: labels.tolist()}


def test_cifar10_pickle_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = []
    for i in range(1, 6):
        x = _images(20, 32, 32, 3, offset=20 * (i - 1))
        parts.append(x)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(x, _labels(20), "labels")))
    x_te = _images(10, 32, 32, 3, offset=1000)
    (folder / "test_batch").write_bytes(pickle.dumps(_cifar_batch(x_te, _labels(10), "labels")))
    names = [f"n{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    s = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert s.sizes() == {"train": 90, "val": 10, "test": 10}
    assert np.array_equal(s.x_test.numpy(), x_te.transpose(0, 3, 1, 2))
    assert _ids(s.x_train) | _ids(s.x_val) == set(range(100))
    assert s.class_names == tuple(names)


def test_cifar100_pickle_layout_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x_tr, x_te = _images(200, 32, 32, 3), _images(100, 32, 32, 3, offset=1000)
    y_tr = np.arange(200) % 100
    (folder / "train").write_bytes(pickle.dumps(_cifar_batch(x_tr, y_tr, "fine_labels")))
    (folder / "test").write_bytes(pickle.dumps(_cifar_batch(x_te, np.arange(100), "fine_labels")))
    s = load_dataset(DataConfig(name="cifar100", path=str(tmp_path), val_fraction=0.5))
    assert s.num_classes == 100 and s.class_names[-1] == "worm"
    assert torch.bincount(s.y_val, minlength=100).tolist() == [1] * 100


def test_imagefolder_decodes_resizes_and_labels(tmp_path: Path) -> None:
    colors = {"buildings": (200, 0, 0), "forest": (0, 200, 0), "sea": (0, 0, 200)}
    for split, n in (("train", 4), ("test", 2)):
        for cls, rgb in colors.items():
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                ext = ".png" if i % 2 else ".jpg"
                Image.new("RGB", (20 + i, 16), rgb).save(d / f"{i}{ext}")
    (tmp_path / "train" / "forest" / "notes.txt").write_text("not an image")
    s = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), image_size=8, val_fraction=0.25))
    assert s.input_shape == (3, 8, 8) and s.class_names == ("buildings", "forest", "sea")
    assert s.sizes() == {"train": 9, "val": 3, "test": 6}
    for x, y in ((s.x_train, s.y_train), (s.x_test, s.y_test)):
        dominant = x.float().mean(dim=(2, 3)).argmax(1)  # the colour channel names the class
        assert torch.equal(dominant, y)


def test_imagefolder_test_class_missing_from_train_is_an_error(tmp_path: Path) -> None:
    for split, cls in (("train", "a"), ("train", "b"), ("test", "c")):
        (tmp_path / split / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / split / cls / "0.png")
    with pytest.raises(DataError, match=r"test.*\['c'\]"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), image_size=4))


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / cls / "0.png")
    (tmp_path / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"bad\.jpg: not a readable image"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), image_size=4))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"x_train": _images(200, 28, 28, None).astype(np.float32)}, r"x_train has dtype float32: expected uint8"),
        ({"x_train": np.zeros((200, 28), np.uint8)}, r"x_train has shape \(200, 28\)"),
        ({"x_test": _images(50, 28, 28, 3)}, r"x_test has shape \(50, 28, 28, 3\)"),
        ({"y_train": _labels(199)}, r"x_train has 200 images but y_train has 199 labels"),
        ({"y_test": np.full(50, 10, np.uint8)}, r"test label 10 is out of range: expected 0\.\.9"),
        ({"y_train": np.zeros((200, 2), np.uint8)}, r"y_train has shape \(200, 2\)"),
    ],
)
def test_bad_npz_contents_raise_data_error_naming_the_path(tmp_path: Path, override: dict, match: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(DataConfig(name="mnist", path=str(path)))
    assert str(path) in str(e.value)


def test_npz_missing_keys_and_garbage_and_missing_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=r"keys\.npz: missing keys \['x_train'"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "keys.npz")))
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "junk.npz")))
    with pytest.raises(DataError, match=r"nope\.npz: no such file"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "nope.npz")))


def test_missing_torchvision_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent: no such directory"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "absent")))
    with pytest.raises(DataError, match=r"MNIST/raw to hold train-images-idx3-ubyte"):
        load_dataset(DataConfig(name="mnist", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"cifar-10-batches-py"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))


def test_corrupt_cifar_batch(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"data_batch_1: not a CIFAR pickle batch"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))


def test_offline_download_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import MNIST

    # Port 9 on loopback refuses at once: the same URLError an offline machine gives.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match=r"could not download mnist.*offline") as e:
        load_dataset(DataConfig(name="mnist", path=str(tmp_path / "root"), download=True))
    assert str(tmp_path / "root") in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "svhn"}, r"data\.name='svhn' is invalid: expected one of digits"),
        ({"name": "imagefolder", "image_size": 8}, r"data\.path=None is invalid for data\.name='imagefolder'"),
        ({"name": "mnist", "num_classes": 12}, r"data\.num_classes=12 is invalid for data\.name='mnist': expected 10"),
        ({"val_fraction": 1.0}, r"data\.val_fraction=1\.0 is invalid"),
        ({"subset": 1}, r"data\.subset=1 is invalid"),
        ({"name": "imagefolder", "path": "x"}, r"data\.image_size=None is invalid for imagefolder"),
        ({"seed": -1}, r"data\.seed=-1"),
    ],
)
def test_config_validation_names_field_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        DataConfig(**kwargs)


def test_subset_larger_than_the_data(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "m.npz")
    with pytest.raises(DataError, match=r"data\.subset=500 is invalid: .*only 200"):
        load_dataset(DataConfig(name="mnist", path=str(path), subset=500))


def test_flat_round_trip_ignores_other_prefixes() -> None:
    cfg = DataConfig(name="mnist", path="/x.npz", subset=1000, seed=3)
    flat = {**cfg.to_flat(), "arch/stem": True, "train/epochs": 2}
    assert DataConfig.from_flat(flat) == cfg
    with pytest.raises(DataError, match=r"data/colour is not a known field"):
        DataConfig.from_flat({"data/colour": "red"})


# ---------------------------------------------------------------------------- object store
def test_read_only_pickle5_buffers_become_tensors_without_copy_or_warning() -> None:
    s = load_dataset(DataConfig(name="digits"))
    buffers: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(s, protocol=5, buffer_callback=buffers.append)
    # Ray hands out-of-band numpy buffers back read-only (shared memory); so does bytes().
    frozen = [bytes(b.raw()) for b in buffers]
    assert len(frozen) == 6  # the six image/label arrays travelled out-of-band (zero copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = pickle.loads(blob, buffers=frozen)
    assert isinstance(back, Splits) and isinstance(back.x_train, torch.Tensor)
    assert torch.equal(back.x_train, s.x_train) and torch.equal(back.y_test, s.y_test)
    assert back.mean == s.mean and back.class_names == s.class_names
    view = np.frombuffer(frozen[0], dtype=np.uint8)
    assert back.x_train.data_ptr() == view.ctypes.data  # shares the buffer's memory
