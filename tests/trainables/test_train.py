"""The training loop on real (tiny) data: learning, determinism, resume, pruning rounds, masks."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from trainables import pruning
from trainables.arch import ArchConfig, HeadLayer, StageConfig, StemConfig
from trainables.data import DataConfig, Splits, load_dataset
from trainables.layers import SparseLinear
from trainables.models import build_model
from trainables.train import (
    Batcher,
    TrainConfig,
    TrainConfigError,
    TrainingDiverged,
    accuracy_se,
    fit,
    fold_pruning,
    lr_factor,
    resolve_augment,
)

ARCH = ArchConfig(
    in_channels=1, input_size=(8, 8), stem=StemConfig(width=8),
    stages=(StageConfig(width=12, downsample="maxpool"),), pooling="flatten",
    head=(HeadLayer(width=32, density=0.25),), mask_seed=3,
)
FAST = TrainConfig(epochs=3, batch_size=64, lr=0.1, threads=1, seed=1)


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset(DataConfig(name="digits", subset=600))


def _model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCH)


def _record() -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    reports: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []

    def on_epoch(metrics: dict[str, Any], state: Any) -> None:
        reports.append(metrics)
        states.append(state())

    return reports, states, on_epoch


# ---------------------------------------------------------------------------- config
def test_config_flat_round_trip_and_unknown_keys() -> None:
    cfg = TrainConfig(epochs=4, optimizer="adamw", lr=1e-3, prune_rounds=2, threads=2)
    flat = {**cfg.to_flat(), "arch/stem": True, "data/name": "digits", "other": 1}
    assert TrainConfig.from_flat(flat) == cfg
    with pytest.raises(TrainConfigError, match=r"train/lrr is not a known field"):
        TrainConfig.from_flat({"train/lrr": 0.1})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, r"train\.epochs=0 is invalid: expected an integer >= 1"),
        ({"lr": -1.0}, r"train\.lr=-1\.0 is invalid"),
        ({"lr": float("nan")}, r"train\.lr=nan is invalid"),
        ({"optimizer": "lion"}, r"train\.optimizer='lion' is invalid: expected one of sgd, adamw, adam"),
        ({"augment": "rotate"}, r"train\.augment='rotate'"),
        ({"prune_rate": 1.0}, r"train\.prune_rate=1\.0 is invalid: expected a number in \(0, 1\)"),
        ({"momentum": 0.0}, r"train\.nesterov=True is invalid: expected false when train\.momentum=0"),
        ({"prune_rounds": 1, "epochs": 2, "rewind_epoch": 3}, r"train\.rewind_epoch=3 is invalid"),
        ({"threads": 0}, r"train\.threads=0"),
        ({"amp": "yes"}, r"train\.amp='yes' is invalid: expected true or false"),
    ],
)
def test_config_validation_names_field_and_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_warm_up_to_the_peak_then_follow_their_shape(schedule: str) -> None:
    total = 100
    f = [lr_factor(s, total, schedule=schedule, warmup_fraction=0.2) for s in range(total)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)  # linear warm-up
    assert all(a < b for a, b in itertools.pairwise(f[:20]))
    tail = f[20:]
    if schedule == "constant":
        assert set(tail) == {1.0}
    else:
        assert all(a >= b for a, b in itertools.pairwise(tail)) and tail[-1] < 0.05
    if schedule == "cosine":
        assert tail[40] == pytest.approx(0.5)


def test_auto_augment_per_dataset() -> None:
    assert resolve_augment("auto", "digits") == (False, False)
    assert resolve_augment("auto", "mnist") == (True, False)
    assert resolve_augment("auto", "cifar10") == (True, True)
    assert resolve_augment("auto", "imagefolder") == (True, True)
    assert resolve_augment("flip", "mnist") == (False, True)


# ---------------------------------------------------------------------------- batches
def test_crop_is_a_zero_padded_shifted_window_and_flip_mirrors() -> None:
    x = torch.randint(1, 256, (16, 3, 6, 7), dtype=torch.uint8)  # no zeros: padding is visible
    ones = torch.ones(1, 3, 1, 1)
    b = Batcher(scale=ones, shift=ones * 0, crop=2, flip=True, channels_last=False)
    out = b.augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 6, dx:dx + 7] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or mirrored
        flips += int(mirrored and not plain)
    assert 0 < flips < len(x)  # about half flipped
    assert out.dtype == torch.uint8 and out.shape == x.shape
    normed = b.normalize(x)
    assert normed.dtype == torch.float32 and torch.equal(normed, x.float())


# ---------------------------------------------------------------------------- fit
def test_accuracy_se_is_the_binomial_standard_error() -> None:
    assert accuracy_se(0.976, 6000) == pytest.approx(0.0019759, abs=1e-7)
    assert accuracy_se(0.5, 100) == pytest.approx(0.05)
    assert accuracy_se(1.0, 500) == 0.0 and accuracy_se(0.0, 500) == 0.0
    assert math.isnan(accuracy_se(0.9, 0)) and math.isnan(accuracy_se(math.nan, 10))


def test_fit_learns_and_reports_every_epoch(digits: Splits) -> None:
    reports, _, on_epoch = _record()
    result = fit(_model(), digits, FAST.replace(epochs=4), on_epoch=on_epoch)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    assert [r["done"] for r in reports] == [False, False, False, True]
    assert [r["fidelity"] for r in reports] == [0.25, 0.5, 0.75, 1.0]
    assert "test_accuracy" in reports[-1] and "test_accuracy" not in reports[0]
    assert result.metrics == reports[-1]
    assert result.metrics["val_accuracy"] > 0.8 and result.metrics["test_accuracy"] > 0.8
    n_val = len(digits.y_val)
    assert all(r["val_accuracy_se"] == accuracy_se(r["val_accuracy"], n_val) for r in reports)
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    assert result.metrics["nonzero_params"] < sum(p.numel() for p in _model().parameters())
    assert result.summary()["epochs"] == 4


def test_same_seed_same_run_other_seed_other_run(digits: Splits) -> None:
    a = fit(_model(), digits, FAST)
    b = fit(_model(), digits, FAST)
    c = fit(_model(), digits, FAST.replace(seed=2))
    keys = ("val_accuracy", "val_loss", "train_loss")
    assert [[h[k] for k in keys] for h in a.history] == [[h[k] for k in keys] for h in b.history]
    assert a.history[-1]["train_loss"] != c.history[-1]["train_loss"]


def test_resume_from_any_epoch_continues_the_same_run(digits: Splits) -> None:
    cfg = FAST.replace(epochs=2, prune_rounds=1, rewind_epoch=1)
    reports, states, on_epoch = _record()
    full = fit(_model(), digits, cfg, on_epoch=on_epoch)
    assert [r["prune_round"] for r in reports] == [0, 0, 1, 1]
    for cut in (1, 2):  # mid-phase, and at a phase end (the next call prunes first)
        resumed = fit(_model(seed=99), digits, cfg, start_state=states[cut - 1])
        assert [h["epoch"] for h in resumed.history] == list(range(cut + 1, 5))
        assert [h["val_loss"] for h in resumed.history] == [r["val_loss"] for r in reports[cut:]]
        assert resumed.metrics["test_accuracy"] == full.metrics["test_accuracy"]
        assert resumed.rounds == full.rounds


def test_pruning_rounds_shrink_params_and_masks_stay_exact(digits: Splits) -> None:
    model = _model()
    sparse = next(m for m in model.modules() if isinstance(m, SparseLinear))
    fixed = sparse.mask.clone()
    cfg = FAST.replace(epochs=2, prune_rounds=2, prune_rate=0.3, rewind_epoch=0)
    seen_zero: list[bool] = []

    def on_epoch(metrics: dict[str, Any], _state: Any) -> None:
        w = sparse.weight_orig * sparse.weight_mask if hasattr(sparse, "weight_orig") else sparse.weight
        seen_zero.append(bool((w.detach()[fixed == 0] == 0).all()))

    result = fit(model, digits, cfg, on_epoch=on_epoch)
    assert seen_zero == [True] * 6
    params = [r["nonzero_params"] for r in result.rounds]
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert params[0] > params[1] > params[2]
    assert pruning.nonzero_fraction(model) < 0.6  # ~ 0.7^2 of the prunable weights survive
    # The folded state loads into a fresh model and computes the same function.
    fresh = build_model(ARCH)
    fresh.load_state_dict(fold_pruning(model.state_dict()))
    model.eval()
    fresh.eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(model(x), fresh(x), atol=1e-6)
    assert int((fresh.classifier.weight == 0).sum()) > 0


def test_early_stopping_ends_the_run_and_marks_it_done(digits: Splits) -> None:
    # A learning rate this small cannot improve val accuracy after the first epoch.
    result = fit(_model(), digits, FAST.replace(epochs=10, lr=1e-9, early_stop_patience=2))
    assert result.metrics["epoch"] == 3 and result.metrics["done"]
    assert result.metrics["fidelity"] == pytest.approx(0.3)
    assert "test_accuracy" in result.metrics


def test_divergence_raises_a_clear_error(digits: Splits) -> None:
    arch = ARCH.replace(batch_norm=False, head=())
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=r"training loss became (nan|inf) in epoch 1.*lower train\.lr"):
        fit(build_model(arch), digits, FAST.replace(lr=1e12, warmup_fraction=0.0))


def test_adam_and_cosine_train_too(digits: Splits) -> None:
    result = fit(_model(), digits, FAST.replace(optimizer="adamw", lr=3e-3, schedule="cosine"))
    assert math.isfinite(result.metrics["val_loss"]) and result.metrics["val_accuracy"] > 0.5


def test_weight_decay_skips_one_dimensional_parameters() -> None:
    from trainables.train import make_optimizer

    opt = make_optimizer(_model(), FAST)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == FAST.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
