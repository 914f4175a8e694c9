"""`sparse-search train`: real training from the command line, JSON summary, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.arch import ArchConfig, StageConfig, StemConfig

pytestmark = pytest.mark.slow  # many seconds of real work without Ray

DIGITS_ARCH = ArchConfig(
    in_channels=1, input_size=(8, 8), stem=StemConfig(width=8),
    stages=(StageConfig(width=12, downsample="maxpool"),), pooling="flatten",
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_train_prints_epochs_and_a_json_summary_last(tmp_path: Path) -> None:
    arch = tmp_path / "digits.yaml"
    DIGITS_ARCH.dump(arch)
    out = _cli("train", str(arch), "--data", "digits", "--epochs", "2", "--subset", "600",
               "--threads", "1", "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch")] == ["1/2", "2/2"]
    summary = json.loads(lines[-1])
    assert set(summary) == {"val_accuracy", "test_accuracy", "nonzero_params", "macs", "epochs",
                            "train_seconds"}
    assert summary["epochs"] == 2 and summary["nonzero_params"] > 0 and summary["macs"] > 0
    assert 0.1 < summary["test_accuracy"] <= 1.0


def test_train_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    arch = tmp_path / "cifar.yaml"
    ArchConfig().dump(arch)  # 3x32x32 input: cannot take 8x8 digits
    out = _cli("train", str(arch), "--data", "digits", "--epochs", "1")
    assert out.returncode == 2
    assert out.stderr.startswith("error: arch in_channels=3") and "Traceback" not in out.stderr
    out = _cli("train", str(arch), "--data", "mnist", "--data-path", str(tmp_path / "none.npz"))
    assert out.returncode == 2 and "none.npz: no such file" in out.stderr
