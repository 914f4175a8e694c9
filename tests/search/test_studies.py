"""The study spaces (spaces/studies/*.yaml) and the scripts that go with them.

Every study space loads and dry-runs on its dataset's shape (no data files needed: the shapes
are what load_dataset reports); the seeds the files rely on really propose what their comments
say; bench/make_imagefolder.py writes a folder that loads as the imagefolder dataset with the
exact pixels; bench/search_quality.py's curve maths on hand-computed steps, its pooled
hypervolume, bootstrap interval and runs combined over seeds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from search.space import dry_run
from search.spec import load_spec
from trainables.data import DataConfig, load_dataset

ROOT = Path(__file__).parents[2]
STUDIES = sorted(p for p in (ROOT / "spaces" / "studies").glob("*.yaml")
                 if not p.stem.endswith("-full"))
FULL = sorted((ROOT / "spaces" / "studies").glob("*-full.yaml"))  # the full-data reruns
# (C, H, W) and classes per study: what load_dataset reports for its data.
SHAPES = {
    "random-sparse-heads": ((3, 32, 32), 10),
    "sparsenet-vs-densenet": ((3, 32, 32), 10),
    "lottery-ticket": ((3, 32, 32), 10),  # the CIFAR-10 image-folder stand-in
    "tiny-mnist": ((1, 28, 28), 10),
    "separable-50k": ((3, 32, 32), 10),
}


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the class is created.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def proposals(path: Path, n: int) -> list:
    spec = load_spec(path)
    shape, classes = SHAPES[spec.name]
    return list(dry_run(spec, n, input_shape=shape, num_classes=classes).proposals)


@pytest.mark.parametrize("path", FULL, ids=[p.stem for p in FULL])
def test_full_data_reruns_are_exact_grids_of_two_seeds_on_all_images(path):
    spec = load_spec(path)
    assert spec.data.subset is None and spec.data.test_subset is None and spec.data.path is None
    assert spec.train["epochs"] >= 15 and spec.resources.auto
    assert len(spec.search.initial) == spec.search.num_samples
    base = SHAPES[spec.name.removesuffix("-full")]
    result = dry_run(spec, spec.search.num_samples, input_shape=base[0], num_classes=base[1])
    configs = [p.config for p in result.proposals]
    assert len(configs) == spec.search.num_samples and not result.exhausted
    seeds = [c["train/seed"] for c in configs]
    archs = [p.arch.key() for p in result.proposals]
    for arch in set(archs):  # every network twice, once per seed
        assert sorted(s for s, a in zip(seeds, archs, strict=True) if a == arch) == [0, 1]
    readme = (ROOT / "spaces" / "studies" / "README.md").read_text()
    assert f"spaces/studies/{path.name}" in readme


def test_one_file_per_study_and_the_readme_lists_each():
    assert {p.stem for p in STUDIES} == set(SHAPES)
    readme = (ROOT / "spaces" / "studies" / "README.md").read_text()
    for p in STUDIES:
        assert f"spaces/studies/{p.name}" in readme


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_loads_and_dry_runs_within_budget(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    shape, classes = SHAPES[spec.name]
    result = dry_run(spec, 2, input_shape=shape, num_classes=classes)
    assert len(result.proposals) == 2
    for p in result.proposals:
        assert p.feasible and p.arch.input_size == shape[1:] and p.arch.in_channels == shape[0]
        assert p.screened_params <= spec.constraints.max_params


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_cpu_defaults_and_datasets_by_name(path):
    spec = load_spec(path)
    # CPU-affordable defaults: no GPU asked for, a data subset or a small exported folder.
    assert spec.resources.gpu == 0
    if spec.data.name == "imagefolder":
        assert spec.data.path == "/tmp/cifar10-folder" and spec.data.image_size == 32
    else:
        # Named, not located: the dataset cache (or --data-path); no development-machine path.
        assert spec.data.path is None
        assert spec.data.subset is not None and spec.data.subset <= 12000


def test_sparsenet_vs_densenet_seed_proposes_both_wirings_at_one_shape():
    props = proposals(ROOT / "spaces/studies/sparsenet-vs-densenet.yaml", 2)
    blocks = {p.arch.stages[0].block for p in props}
    assert blocks == {"densenet", "sparsenet"}
    shapes = {tuple((s.width, s.layers, s.downsample) for s in p.arch.stages) for p in props}
    assert len(shapes) == 1  # same depth and growth rate: only the wiring differs
    dense, sparse = sorted(props, key=lambda p: p.arch.stages[0].block)
    assert sparse.screened_params < dense.screened_params


def test_random_sparse_heads_seed_covers_both_heads_dense_and_sparse():
    props = proposals(ROOT / "spaces/studies/random-sparse-heads.yaml", 8)
    pairs = {(tuple(h.width for h in p.arch.head), p.arch.head[0].sparse) for p in props}
    assert pairs == {((512, 128), False), ((512, 128), True),
                     ((2048, 512, 128, 32), False), ((2048, 512, 128, 32), True)}
    # The study's trunk: the last 8x8x128 map is max-pooled to 4x4, flatten feeds 2,048
    # features; the dense Run 1 net is the study's 1,403,498 params + 448 BatchNorm params.
    flatten = [r for r in props[0].accounting.layers if r.type == "flatten"]
    assert [r.output_shape for r in flatten] == [(2048,)]
    dense = [p for p in props if not p.arch.head[0].sparse and len(p.arch.head) == 2]
    assert {p.screened_params for p in dense} == {1_403_946}


def test_lottery_ticket_seed_covers_simple_cnn_both_trunks_and_a_trained_stage():
    props = proposals(ROOT / "spaces/studies/lottery-ticket.yaml", 8)
    kinds = {(p.arch.backbone.name, p.arch.backbone.trainable) if p.arch.backbone else ("none",)
             for p in props}
    assert {("none",), ("resnet18", "none"), ("densenet121", "none"),
            ("resnet18", "layer3"), ("densenet121", "denseblock3")} <= kinds
    assert {p.train.prune_rounds for p in props} == {0, 2}


def test_tiny_mnist_screen_keeps_flatten_blowups_out():
    spec = load_spec(ROOT / "spaces/studies/tiny-mnist.yaml")
    assert spec.constraints.max_params == 3500
    result = dry_run(spec, 6, input_shape=(1, 28, 28), num_classes=10)
    assert result.rejected > 0  # the space holds over-budget shapes; none comes out
    assert all(p.screened_params <= 3500 for p in result.proposals)


# ---------------------------------------------------------------------- make_imagefolder.py
def fake_cifar(path: Path, n_train: int = 40, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 6, 5, 3), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.uint8).reshape(-1, 1) % 10,
        "x_test": rng.integers(0, 256, (n_test, 6, 5, 3), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }
    np.savez(path, **arrays)
    return arrays


def test_make_imagefolder_writes_exact_pixels_that_load(tmp_path):
    mod = load_script("make_imagefolder")
    arrays = fake_cifar(tmp_path / "c.npz")
    out = tmp_path / "folder"
    counts = mod.export(tmp_path / "c.npz", out, train_per_class=3, test_per_class=2,
                        classes=("cat", "airplane", "ship"))
    assert counts == {"train": 9, "test": 6}
    assert sorted(p.name for p in (out / "train").iterdir()) == ["airplane", "cat", "ship"]
    splits = load_dataset(DataConfig(name="imagefolder", path=str(out), image_size=5,
                                      val_fraction=0.34))
    assert splits.class_names == ("airplane", "cat", "ship")
    assert splits.sizes() == {"train": 6, "val": 3, "test": 6}
    # PNG is lossless: every test image is one of the npz's images of its class.
    # (6x5 images resized to 5x5 would change pixels: compare at the stored size instead.)
    from PIL import Image

    for f in (out / "test" / "ship").iterdir():
        i = int(f.stem)
        assert arrays["y_test"][i] == 8  # CIFAR-10's "ship"
        assert np.array_equal(np.asarray(Image.open(f)), arrays["x_test"][i])
    assert isinstance(splits.x_test, torch.Tensor) and splits.x_test.dtype == torch.uint8


def test_make_imagefolder_refuses_the_repo_a_full_folder_and_bad_classes(tmp_path, capsys):
    mod = load_script("make_imagefolder")
    fake_cifar(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="inside the repository"):
        mod.export(tmp_path / "c.npz", ROOT / "data" / "x", train_per_class=1, test_per_class=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        mod.export(tmp_path / "c.npz", tmp_path / "full", train_per_class=1, test_per_class=1)
    with pytest.raises(ValueError, match="classes=cat,kangaroo"):
        mod.export(tmp_path / "c.npz", tmp_path / "o", train_per_class=1, test_per_class=1,
                   classes=("cat", "kangaroo"))
    with pytest.raises(ValueError, match="has 4 images of 'airplane'"):
        mod.export(tmp_path / "c.npz", tmp_path / "o2", train_per_class=5, test_per_class=1)
    assert mod.main([str(tmp_path / "o3"), "--data", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (ROOT / "data" / "x").exists()


# ---------------------------------------------------------------------- search_quality.py
def test_search_quality_curves_on_hand_computed_steps():
    sq = load_script("search_quality")
    P = sq.TrialPoint
    ref = 100.0  # log10 scale top: y = log10(params) / 2
    # Finished at 1 s (over budget: adds nothing), 2 s (error 0.5, 10 params: y 0.5 -> area
    # 0.5 * 0.5 = 0.25), 3 s (failed: NaN), 4 s (error 0.2, 10 params: dominates -> 0.8 * 0.5).
    points = [P(4.0, 0.2, 10.0), P(1.0, 0.1, 1000.0), P(3.0, math.nan, math.nan),
              P(2.0, 0.5, 10.0)]
    curve = sq.hv_curve(points, max_params=ref)
    assert [s for s, _ in curve] == [1.0, 2.0, 3.0, 4.0]
    assert [round(h, 12) for _, h in curve] == [0.0, 0.25, 0.25, 0.4]
    assert sq.hv_at(curve, 0.5) == 0.0 and sq.hv_at(curve, 3.5) == 0.25
    other = [(1.5, 0.1), (5.0, 0.3)]
    mean = sq.mean_curve([curve, other])
    assert [s for s, _ in mean] == [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
    assert [round(h, 12) for _, h in mean] == [0.0, 0.05, 0.175, 0.175, 0.25, 0.35]
    assert sq.time_to_reach(mean, 0.25) == 4.0
    assert sq.time_to_reach(mean, 0.36) is None
    # Pooled: two searches' fronts together. The second's point (error 0.4, 1 param: y 0)
    # adds the strip under the first's y 0.5: 0.6 * 0.5 = 0.3 more; after the wall it is out.
    runs = [sq.RunResult("m", 0, 5.0, tuple(points), rejected=0),
            sq.RunResult("m", 1, 5.0, (P(2.5, 0.4, 1.0),), rejected=0)]
    assert math.isclose(sq.pooled_hv(runs, max_params=ref, wall=5.0), 0.4 + 0.3)
    assert math.isclose(sq.pooled_hv(runs, max_params=ref, wall=2.0), 0.25)
    # The ratio's bootstrap interval: equal seeds leave nothing open; spread seeds bracket it.
    assert sq.ratio_ci95([2.0, 2.0], [1.0, 1.0]) == (2.0, 2.0)
    lo, hi = sq.ratio_ci95([1.0, 1.2, 1.4], [1.0, 1.1, 1.2])
    assert 1.0 / 1.2 <= lo < 1.2 / 1.1 < hi <= 1.4 / 1.0


def test_search_quality_combines_runs_of_other_seeds_and_refuses_overlaps(tmp_path, capsys):
    sq = load_script("search_quality")
    size = {"space": "s.yaml", "wall": 45, "subset": 3000, "epochs": 1}

    def run(name: str, first: int, ours: list[float], tpe: list[float], **kw) -> Path:
        doc = {**size, **kw, "seeds": len(ours), "first_seed": first, "methods": {
            sq.OURS: {"hv_per_seed": ours}, "optuna-tpe": {"hv_per_seed": tpe}}}
        (tmp_path / name).write_text(json.dumps(doc))
        return tmp_path / name

    a, b = run("a.json", 0, [0.3, 0.3], [0.2, 0.2]), run("b.json", 2, [0.3], [0.5])
    assert sq.main(["--combine", str(a), str(b)]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["seeds"] == [0, 1, 2] and out["best_peer"] == "optuna-tpe"
    assert math.isclose(out["hv_ratio_vs_best_peer"], 0.3 / 0.3)
    assert sq.main(["--combine", str(a), str(a)]) == 2  # the same seeds twice
    assert "overlap" in capsys.readouterr().err
    c = run("c.json", 5, [0.3], [0.2], wall=120)  # another benchmark size
    assert sq.main(["--combine", str(a), str(c)]) == 2
    assert "['wall'] differ" in capsys.readouterr().err


def test_search_quality_peers_search_the_same_space_without_our_strategy(tmp_path):
    """Fairness: every method gets the same space, data, size and time; the peers' samplers
    draw the fill fraction over the same range, without sparse-search's size bands and
    weight inheritance."""
    sq = load_script("search_quality")
    size = {"wall": 30, "subset": 900, "test_subset": 300, "epochs": 1, "batch_size": 32}
    specs = {m: sq.bench_spec(ROOT / "spaces/studies/tiny-mnist.yaml", data=tmp_path / "d.npz",
                              seed=1, concurrent=2, cpus=2.0, method=m, **size)
             for m in sq.METHODS}
    ours = specs[sq.OURS]
    assert ours.search.fill_budget.bands == 8 and ours.search.time_budget == 30
    assert ours.search.sampler == "lamarckian" and ours.search.lamarckian is not None
    for m in sq.PEERS:
        peer = specs[m]
        assert peer.search.fill_budget.bands == 1, m
        assert peer.search.sampler == "tpe" and peer.search.lamarckian is None, m
        assert peer.search.fill_budget.fraction == ours.search.fill_budget.fraction
        assert (peer.data, peer.train, peer.resources, peer.constraints, peer.search.seed,
                peer.search.time_budget) == (ours.data, ours.train, ours.resources,
                                             ours.constraints, 1, 30)
    with pytest.raises(ValueError, match="optuna-tpe"):
        sq.peer_sampler("grid", 0)


# ---------------------------------------------------------------------- rank_fidelity.py
def test_rank_fidelity_taus_are_taken_within_size_bands():
    rf = load_script("rank_fidelity")
    edges = rf.log_edges(10, 1000, 2)
    assert [round(e, 9) for e in edges] == [10, 100, 1000]
    assert [rf.band_of(p, edges) for p in (10, 99, 100, 999, 1000)] == [0, 0, 1, 1, 1]
    # Band 0 ranks perfectly (tau 1, 3 pairs), band 1 inversely (tau -1, 1 pair), and a
    # one-member band adds nothing: (3 * 1 + 1 * -1) / 4 = 0.5. Overall the size decides.
    signal = [1, 2, 3, 20, 10, 7]
    reference = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
    band = [0, 0, 0, 1, 1, 2]
    mean, per_band = rf.within_bands(signal, reference, band)
    assert per_band == {0: 1.0, 1: -1.0} and mean == 0.5
    assert math.isnan(rf.kendall([1.0], [2.0])) and math.isnan(rf.kendall([1, 1], [1, 2]))
