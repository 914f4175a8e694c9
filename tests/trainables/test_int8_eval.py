"""The int8 step of a finished trial, inside REAL Ray Tune runs on digits: the final report's
int8 metrics are those of the int8 ONNX file it wrote (ONNX Runtime), the switch turns it off,
a failing quantization leaves the trial finished with int8_error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ray import tune

from trainables.arch import ArchConfig, StageConfig, StemConfig
from trainables.data import DataConfig, Splits, load_dataset
from trainables.deploy.quantize import (
    CALIBRATION_IMAGES,
    FP32_ONNX_FILE,
    INT8_ONNX_FILE,
    evaluate_onnx,
    onnx_weight_bytes,
    quantize_int8,
    trial_int8,
)
from trainables.models import build_model
from trainables.train import TrainConfig, TrainConfigError
from trainables.trial import MODEL_FILE, seeded_model, train_trial

pytestmark = pytest.mark.ray  # one test runs the trainable under Ray Tune

ARCH = ArchConfig(in_channels=1, input_size=(8, 8), stem=StemConfig(width=8),
                  stages=(StageConfig(width=12, downsample="maxpool"),), pooling="gap")
TRAIN = TrainConfig(epochs=3, batch_size=32, optimizer="adamw", lr=0.01, threads=1)
INT8_KEYS = {"int8_val_accuracy", "int8_test_accuracy", "int8_drop", "int8_accuracy",
             "int8_calibration_images", "int8_seconds"}


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset(DataConfig(name="digits", subset=400))


def test_final_report_carries_the_int8_files_figures_and_the_switch_turns_it_off(
    ray_session: Any, digits: Splits, tmp_path: Path
) -> None:
    space = {**ARCH.to_flat(), **TRAIN.to_flat(), "data/name": "digits",
             "train/int8_eval": tune.grid_search([True, False])}
    results = tune.Tuner(
        tune.with_parameters(train_trial, splits=digits), param_space=space,
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="int8", verbose=0),
    ).fit()
    by_switch = {r.config["train/int8_eval"]: r for r in results}
    assert all(r.error is None for r in results)
    on, off = by_switch[True], by_switch[False]
    m = on.metrics
    assert set(m) >= INT8_KEYS and "int8_error" not in m
    assert m["int8_calibration_images"] == min(CALIBRATION_IMAGES, len(digits.y_train))
    assert m["int8_accuracy"] == m["int8_val_accuracy"]  # the objective is the val figure
    assert m["int8_drop"] == pytest.approx(m["val_accuracy"] - m["int8_val_accuracy"])
    assert m["int8_val_accuracy"] > 0.3  # a trained net survives int8 (chance is 0.1)
    # Earlier reports name the objective (Tune's metric check) but carry no value.
    assert on.metrics_dataframe["int8_accuracy"].isna().tolist() == [True, True, False]
    with on.checkpoint.as_directory() as d:
        int8 = Path(d) / INT8_ONNX_FILE
        assert (Path(d) / FP32_ONNX_FILE).is_file() and int8.is_file()
        args = (digits.mean, digits.std)
        assert evaluate_onnx(int8, digits.x_val, digits.y_val, *args) == m["int8_val_accuracy"]
        assert evaluate_onnx(int8, digits.x_test, digits.y_test, *args) == m["int8_test_accuracy"]
        assert onnx_weight_bytes(int8).weights > 0  # QOperator: int8 weight initializers
        # The trial's file is the one `export --format onnx-int8` makes from its saved weights
        # (the trial quantized its channels_last training copy: same bytes).
        model = build_model(ARCH)
        model.load_state_dict(torch.load(Path(d) / MODEL_FILE, weights_only=True))
        again = quantize_int8(model, digits, tmp_path / "again.onnx", split="val")
        assert again.path.read_bytes() == int8.read_bytes()
        assert again.accuracy_int8 == m["int8_val_accuracy"]
    assert not (INT8_KEYS - {"int8_accuracy"}) & set(off.metrics)
    assert off.metrics.get("int8_accuracy") is None
    with off.checkpoint.as_directory() as d:
        assert not (Path(d) / FP32_ONNX_FILE).exists() and not (Path(d) / INT8_ONNX_FILE).exists()


def test_a_failing_quantization_is_reported_not_raised(digits: Splits, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the ONNX folder should be")
    out = trial_int8(seeded_model(ARCH, digits, TRAIN), digits, blocker, val_accuracy=0.5)
    assert set(out) == {"int8_error", "int8_seconds"}
    assert out["int8_error"].split(":")[0].endswith("Error") and len(out["int8_error"]) > 10


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_int8_eval_must_be_a_bool(bad: Any) -> None:
    with pytest.raises(TrainConfigError, match=rf"train.int8_eval={bad!r} is invalid: expected "
                                               r"true or false"):
        TrainConfig(int8_eval=bad)
