"""The trainable inside REAL Ray Tune runs on digits: metrics, checkpoints, failures, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ray import tune

from trainables.arch import ArchConfig, ArchError, StageConfig, StemConfig
from trainables.data import DataConfig, Splits, load_dataset
from trainables.models import build_model
from trainables.train import TrainConfig
from trainables.trial import (
    ARCH_FILE,
    MODEL_FILE,
    STATE_FILE,
    check_compatible,
    train_arch,
    train_trial,
)

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

# No BatchNorm: a huge learning rate then reliably overflows the loss (the failing trial).
ARCH = ArchConfig(
    in_channels=1, input_size=(8, 8), stem=StemConfig(width=8), batch_norm=False,
    stages=(StageConfig(width=12, downsample="maxpool"),), pooling="flatten",
)
TRAIN = TrainConfig(epochs=2, batch_size=64, lr=0.05, warmup_fraction=0.0)
PER_EPOCH = {"val_accuracy", "val_loss", "train_loss", "nonzero_params", "macs", "epoch",
             "fidelity", "prune_round", "done"}


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset(DataConfig(name="digits", subset=400))


@pytest.fixture(scope="module")
def local_ray(ray_session: Any) -> Any:
    """The session's Ray (tests/conftest.py)."""
    return ray_session


def _space(**train: Any) -> dict[str, Any]:
    return {**ARCH.to_flat(), **TRAIN.to_flat(), "data/name": "digits", **train}


def test_tuner_runs_trials_reports_metrics_checkpoints_and_failures(
    local_ray: Any, digits: Splits, tmp_path: Path
) -> None:
    # Trials 0 and 2 are identical: on a reused actor they must still give identical results.
    space = _space(**{"train/lr": tune.grid_search([0.05, 1e12, 0.05])})
    tuner = tune.Tuner(
        tune.with_parameters(train_trial, splits=digits),
        param_space=space,
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="trial", verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 3
    ok = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    assert len(ok) == 2 and len(failed) == 1
    assert "training loss became" in str(failed[0].error) and "lower train.lr" in str(failed[0].error)
    for r in ok:
        df = r.metrics_dataframe
        assert set(df.columns) >= PER_EPOCH
        assert df["epoch"].tolist() == [1, 2] and df["done"].tolist() == [False, True]
        assert df["fidelity"].tolist() == [0.5, 1.0]
        assert {"test_accuracy", "train_seconds"} <= set(r.metrics)
        assert r.metrics["val_accuracy"] > 0.2  # learned: chance is 0.1
        with r.checkpoint.as_directory() as d:
            arch = ArchConfig.load(Path(d) / ARCH_FILE)
            assert arch == ARCH
            model = build_model(arch)
            model.load_state_dict(torch.load(Path(d) / MODEL_FILE, weights_only=True))
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
            assert state["progress"]["epoch"] == 2
    assert ok[0].metrics["val_loss"] == ok[1].metrics["val_loss"]


def test_a_crashed_trial_resumes_from_its_last_checkpoint(
    local_ray: Any, digits: Splits, tmp_path: Path
) -> None:
    def crash_once(config: dict[str, Any], splits: Splits) -> None:
        import trainables.trial as trial

        if tune.get_checkpoint() is not None:
            trial.train_trial(config, splits)
            return
        real = trial.report
        reported: list[int] = []

        def report(metrics: dict[str, Any], *, checkpoint: Any = None) -> None:
            real(metrics, checkpoint=checkpoint)
            reported.append(metrics["epoch"])
            if len(reported) == 2:
                raise RuntimeError("injected crash after epoch 2")

        trial.report = report
        try:
            trial.train_trial(config, splits)
        finally:
            trial.report = real

    class Epochs(tune.Callback):
        """Every result the driver receives, in order: what the trial really reported.

        (Not ``metrics_dataframe``: Ray Tune rebuilds progress.csv on a trial's restore from
        the storage copy of the last experiment snapshot, so rows reported after that
        snapshot vanish from it: epochs [3, 4] when the snapshot came before epoch 1.)"""

        def __init__(self) -> None:
            self.seen: list[int] = []

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            self.seen.append(result["epoch"])

    cfg = TRAIN.replace(epochs=4)
    epochs = Epochs()
    tuner = tune.Tuner(
        tune.with_parameters(crash_once, splits=digits),
        param_space=_space(**cfg.to_flat()),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="crash", verbose=0,
                                  callbacks=[epochs],
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    result = tuner.fit()[0]
    assert result.error is None
    # Resumed at epoch 3 (a restart from scratch would report 1, 2, 1, 2, 3, 4).
    assert epochs.seen == [1, 2, 3, 4]
    # ... and continued the same run: identical to training straight through (1 thread both).
    straight = train_arch(ARCH, digits, cfg.replace(threads=1))
    assert result.metrics["val_loss"] == straight.metrics["val_loss"]
    assert result.metrics["test_accuracy"] == straight.metrics["test_accuracy"]


def test_arch_must_match_the_data(digits: Splits) -> None:
    with pytest.raises(ArchError, match=r"in_channels=3, input_size=\[32, 32\] does not match digits "
                                        r"images of 1x8x8"):
        check_compatible(ArchConfig(), digits)
    with pytest.raises(ArchError, match=r"num_classes=5 does not match digits: expected num_classes: 10"):
        check_compatible(ARCH.replace(num_classes=5), digits)
