"""The recipe options of the training loop (bench/recipe.py measures them on CIFAR-10): an EMA
of the weights, flip test-time augmentation, cutout and weight decay on norms and biases, on
real (tiny) data."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainables.arch import ArchConfig, HeadLayer, StageConfig, StemConfig
from trainables.data import DataConfig, Splits, load_dataset
from trainables.models import build_model
from trainables.train import (
    Batcher,
    TrainConfig,
    TrainConfigError,
    _batcher,
    evaluate,
    fit,
    make_ema,
    make_optimizer,
)

ARCH = ArchConfig(
    in_channels=1, input_size=(8, 8), stem=StemConfig(width=8),
    stages=(StageConfig(width=12, downsample="maxpool"),), pooling="flatten",
    head=(HeadLayer(width=32),),
)
FAST = TrainConfig(epochs=3, batch_size=64, lr=0.1, threads=1, seed=1)


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset(DataConfig(name="digits", subset=600))


def _model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCH)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ema": 1.0}, r"train\.ema=1\.0 is invalid: expected a number in \[0, 1\)"),
        ({"ema": -0.1}, r"train\.ema=-0\.1 is invalid"),
        ({"tta": "rotate"}, r"train\.tta='rotate' is invalid: expected one of none, flip"),
        ({"cutout": -1}, r"train\.cutout=-1 is invalid: expected an integer >= 0"),
        ({"decay_norms": "yes"}, r"train\.decay_norms='yes' is invalid: expected true or false"),
    ],
)
def test_recipe_fields_are_validated_with_field_and_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**kwargs)


def test_decay_norms_puts_weight_decay_on_one_dimensional_parameters_too() -> None:
    kernels, vectors = make_optimizer(_model(), FAST.replace(decay_norms=True)).param_groups
    assert kernels["weight_decay"] == vectors["weight_decay"] == FAST.weight_decay
    assert vectors["params"] and all(p.ndim == 1 for p in vectors["params"])


def test_cutout_zeroes_one_square_per_image_clipped_at_the_border() -> None:
    ones = torch.ones(1, 1, 1, 1)
    b = Batcher(scale=ones, shift=ones * 0, crop=0, flip=False, channels_last=False, cutout=4)
    x = torch.rand(256, 2, 10, 10) + 1.0  # no zeros before the cut
    out = b.cut(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0] == 0, out[:, 1] == 0)  # the same square in every channel
    sizes = set()
    for zero in (out[:, 0] == 0):
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert len(rows) and len(cols) and len(rows) <= 4 and len(cols) <= 4
        assert int(zero.sum()) == len(rows) * len(cols)  # a full rectangle: the square, clipped
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        sizes.add(int(zero.sum()))
    assert 16 in sizes and min(sizes) < 16  # whole squares inside, clipped ones at the edges
    assert torch.equal(out[out != 0], x[out != 0])
    off = Batcher(scale=ones, shift=ones * 0, crop=0, flip=False, channels_last=False)
    assert off.cut(x, torch.Generator()) is x


def test_cutout_trains_and_changes_the_run(digits: Splits) -> None:
    base = fit(_model(), digits, FAST)
    cut = fit(_model(), digits, FAST.replace(cutout=3))
    assert cut.history[-1]["train_loss"] != base.history[-1]["train_loss"]
    assert cut.metrics["val_accuracy"] > 0.5


def test_ema_update_is_the_warmed_up_exponential_average() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = make_ema(net, 0.9)
    expected = 0.0  # the copy taken at the first update
    for n, w in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=0):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update_parameters(net)
        if n == 0:
            expected = w
        else:
            d = min(0.9, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * w
        assert float(ema.module.weight.detach()) == pytest.approx(expected)


def test_ema_trains_the_same_weights_and_ends_with_their_average(digits: Splits) -> None:
    base = fit(_model(), digits, FAST)
    model = _model()
    averaged = fit(model, digits, FAST.replace(ema=0.9))
    # the average is never stepped on: the training trajectory is the baseline's exactly
    assert [h["train_loss"] for h in averaged.history] == [h["train_loss"] for h in base.history]
    assert [h["val_loss"] for h in averaged.history] != [h["val_loss"] for h in base.history]
    # the model a phase ends with is the average: its val figure is the one last reported
    b = _batcher(digits, FAST, "digits", torch.device("cpu"))
    val, _ = evaluate(model, digits.x_val, digits.y_val, b, batch_size=1024, device=torch.device("cpu"))
    assert val == averaged.metrics["val_accuracy"] and val > 0.5


def test_ema_resumes_mid_phase_and_across_a_pruning_round(digits: Splits) -> None:
    cfg = FAST.replace(epochs=2, prune_rounds=1, rewind_epoch=1, ema=0.9)
    reports: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []
    full = fit(_model(), digits, cfg,
               on_epoch=lambda m, s: (reports.append(m), states.append(s())))
    for cut in (1, 3):  # inside phase 0, inside the pruning round
        resumed = fit(_model(seed=99), digits, cfg, start_state=states[cut - 1])
        assert [h["val_loss"] for h in resumed.history] == [r["val_loss"] for r in reports[cut:]]
        assert resumed.metrics["test_accuracy"] == full.metrics["test_accuracy"]


def test_flip_tta_averages_an_image_and_its_mirror(digits: Splits) -> None:
    model = _model().eval()
    b = _batcher(digits, FAST, "digits", torch.device("cpu"))
    dev = torch.device("cpu")
    x, y = digits.x_val, digits.y_val
    acc, loss = evaluate(model, x, y, b, batch_size=64, device=dev, tta_flip=True)
    mirror = evaluate(model, x.flip(3), y, b, batch_size=64, device=dev, tta_flip=True)
    assert mirror == pytest.approx((acc, loss))  # symmetric in the image and its mirror
    with torch.no_grad():
        xf = b.normalize(x)
        logits = 0.5 * (model(xf) + model(xf.flip(3)))
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert acc != evaluate(model, x.flip(3), y, b, batch_size=64, device=dev)[0] or \
        loss != evaluate(model, x, y, b, batch_size=64, device=dev)[1]


def test_fit_with_flip_tta_reports_tta_figures(digits: Splits) -> None:
    model = _model()
    result = fit(model, digits, FAST.replace(tta="flip", augment="flip"))
    b = _batcher(digits, FAST, "digits", torch.device("cpu"))
    dev = torch.device("cpu")
    test = evaluate(model, digits.x_test, digits.y_test, b, batch_size=1024, device=dev, tta_flip=True)
    assert result.metrics["test_accuracy"] == test[0] and result.metrics["test_loss"] == test[1]
