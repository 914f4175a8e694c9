"""Objective int8_accuracy through `sparse-search run` as a user runs it (real Ray, real ONNX
Runtime, real MLflow store): results.csv / pareto.csv carry the int8 columns, the front is the
non-dominated set of int8_val_accuracy vs flash_bytes, the switch turns the step off, bad
switch values exit 2; rungs rank val_accuracy as the int8 objective's proxy."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from search.run.moasha import MultiObjectiveASHA
from search.run.tuner import make_scheduler, max_epochs
from search.schema import INT8_COLUMNS, rung_metric
from search.spec import parse_spec
from trainables.deploy.quantize import FP32_ONNX_FILE, INT8_ONNX_FILE

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
SPEC = """
name: int8run
data: {name: digits, val_fraction: 0.2, subset: 500}
objectives: {int8_accuracy: max, flash_bytes: min}
constraints: {max_params: 3000}
search: {sampler: random, num_samples: 4, max_concurrent: 2, seed: 1}
resources: {cpu: 1, gpu: 0}
train: {epochs: 2, batch_size: 32, optimizer: adamw, lr: 0.01%s}
space:
  stem: {width: {int: [4, 12]}}
  num_stages: 1
  stages: {width: {int: [8, 24]}, layers: 1, downsample: maxpool}
  pooling: gap
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _front_by_hand(rows: list[dict[str, str]]) -> set[str]:
    pts = {r["trial_key"]: (float(r["int8_val_accuracy"]), int(r["flash_bytes"])) for r in rows}
    return {k for k, (a, f) in pts.items()
            if not any(a2 >= a and f2 <= f and (a2, f2) != (a, f) for a2, f2 in pts.values())}


def test_run_with_objective_int8_accuracy(tmp_path: Path) -> None:
    spec = tmp_path / "int8run.yaml"
    spec.write_text(SPEC % "")
    db = tmp_path / "mlflow.db"
    done = _cli("run", str(spec), "--json", "--storage", str(tmp_path / "runs"),
                "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(json.loads(done.stdout.strip().splitlines()[-1])["run_dir"])
    rows = _rows(run_dir / "results.csv")
    assert set(INT8_COLUMNS) | {"int8_error"} <= set(rows[0])
    ok = [r for r in rows if r["status"] == "TERMINATED"]
    assert len(ok) == 4
    for r in ok:
        assert r["int8_error"] == ""
        acc, drop = float(r["int8_val_accuracy"]), float(r["int8_drop"])
        assert 0 < acc <= 1 and 0 < float(r["int8_test_accuracy"]) <= 1
        assert drop == pytest.approx(float(r["val_accuracy"]) - acc)
        trial = run_dir / "trials" / r["trial_key"]
        assert (trial / FP32_ONNX_FILE).is_file() and (trial / INT8_ONNX_FILE).is_file()
    pareto = _rows(run_dir / "pareto.csv")
    assert set(INT8_COLUMNS) <= set(pareto[0])
    assert {p["trial_key"] for p in pareto} == _front_by_hand(ok)
    # The printed front and the --json one show what the search optimised.
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    head = next(ln for ln in done.stdout.splitlines() if ln.lstrip().startswith("nonzero_params"))
    assert head.split()[4:7] == ["int8_val", "int8_test", "flash_B"]
    by_key = {r["trial_key"]: r for r in ok}
    for p in summary["front"]:
        assert p["int8_val_accuracy"] == pytest.approx(float(by_key[p["trial_key"]]["int8_val_accuracy"]))
        assert p["flash_bytes"] == int(by_key[p["trial_key"]]["flash_bytes"])
    # MLflow: each trial's child run has the int8 metrics; nothing left RUNNING.
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("int8run").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    children = {r.data.tags["sparse_search.trial_key"]: r for r in runs
                if r.data.tags.get("sparse_search.role") == "trial"}
    for r in ok:
        logged = children[r["trial_key"]].data.metrics
        assert logged["int8_val_accuracy"] == pytest.approx(float(r["int8_val_accuracy"]))
        assert logged["int8_test_accuracy"] == pytest.approx(float(r["int8_test_accuracy"]))
    _finalize_then_export(run_dir, tmp_path)


def _finalize_then_export(run_dir: Path, tmp_path: Path) -> None:
    """The finalized members are quantized as the trials were, and what final-pareto.csv says of
    one is what its exported int8 file scores and weighs (ONNX Runtime, the file's initializers)."""
    from trainables.data import DataConfig, load_dataset
    from trainables.deploy.quantize import evaluate_onnx, onnx_weight_bytes

    done = _cli("finalize", str(run_dir), "--top", "1", "--seeds", "1", "--epochs", "3",
                "--no-mlflow", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = _rows(run_dir / "final-pareto.csv")
    assert "int8_test" in done.stdout and "flash_B" in done.stdout  # the printed final front
    (retrained,) = (run_dir / "final").iterdir()  # final/<member>-s<seed>
    assert retrained.name.startswith(f"{row['trial_key']}-s")
    assert (retrained / INT8_ONNX_FILE).is_file() and (retrained / FP32_ONNX_FILE).is_file()
    job = f"final/{retrained.name}"
    out = tmp_path / "member-int8.onnx"
    done = _cli("export", str(run_dir), job, "--format", "onnx-int8", "-o", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    splits = load_dataset(DataConfig(name="digits", val_fraction=0.2, subset=500))
    measured = evaluate_onnx(out, splits.x_test, splits.y_test, splits.mean, splits.std)
    assert measured == float(row["int8_test_accuracy"]) == float(row["int8_test_accuracy_mean"])
    assert onnx_weight_bytes(out).weights == int(row["flash_bytes"])
    assert json.loads(Path(f"{out}.json").read_text())["accuracy_int8"] == measured


def test_switch_off_fills_no_int8_column_and_writes_no_onnx(tmp_path: Path) -> None:
    spec = tmp_path / "off.yaml"
    text = (SPEC % ", int8_eval: false").replace("int8_accuracy: max", "val_accuracy: max")
    spec.write_text(text.replace("num_samples: 4", "num_samples: 2"))
    done = _cli("run", str(spec), "--json", "--no-mlflow", "--storage", str(tmp_path / "runs"),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = Path(json.loads(done.stdout.strip().splitlines()[-1])["run_dir"])
    rows = _rows(run_dir / "results.csv")
    assert [r["status"] for r in rows] == ["TERMINATED"] * 2
    assert all(r[c] == "" for r in rows for c in (*INT8_COLUMNS, "int8_error"))
    assert not list(run_dir.glob("trials/*/*.onnx"))


@pytest.mark.parametrize(("train", "objective", "message"), [
    (", int8_eval: 3", "val_accuracy", "train.int8_eval=3 is invalid: expected true or false"),
    (", int8_eval: false", "int8_accuracy", "train.int8_eval=False is invalid: expected true (or "
                                            "left out) with objectives.int8_accuracy"),
])
def test_a_bad_switch_exits_2_naming_file_and_field(tmp_path: Path, train: str, objective: str,
                                                     message: str) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text((SPEC % train).replace("int8_accuracy: max", f"{objective}: max"))
    done = _cli("run", str(spec), "--dry-run", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert f"{spec}: {message}" in done.stderr and "Traceback" not in done.stderr


def test_rungs_rank_val_accuracy_for_the_int8_objective() -> None:
    assert rung_metric("int8_accuracy") == "val_accuracy" and rung_metric("macs") == "macs"
    sched = MultiObjectiveASHA(objectives=[("int8_accuracy", "max"), ("flash_bytes", "min")],
                               max_t=9, grace_period=1)
    epoch = {"epoch": 1, "val_accuracy": 0.5, "flash_bytes": 900, "int8_accuracy": None}
    assert sched._values(epoch, {}) == (0.5, 900.0)  # an epoch report has no int8 value yet
    d = {"name": "s", "data": {"name": "digits"}, "space": {"num_stages": 1},
         "objectives": {"int8_accuracy": "max", "flash_bytes": "min"},
         "search": {"early_stopping": {"scheduler": "asha", "grace_epochs": 1}}}
    assert make_scheduler((s := parse_spec(d)).search.early_stopping, s.objectives,
                          max_t=max_epochs(s.train)).metric == "val_accuracy"


@pytest.mark.parametrize(("objectives", "constraints", "train", "on"), [
    ("{val_accuracy: max, nonzero_params: min}", "{max_params: 3000}", "", False),
    ("{val_accuracy: max, nonzero_params: min}", "{max_params: 3000}", ", int8_eval: true", True),
    ("{val_accuracy: max, nonzero_params: min}", "{max_sram_bytes: 9000}", "", True),
    ("{val_accuracy: max, latency_ms: min}", "{max_params: 3000}", "", True),
    ("{int8_accuracy: max, flash_bytes: min}", "{max_params: 3000}", ", int8_eval: false", None),
])
def test_int8_step_left_out_is_on_for_deployment_searches_only(tmp_path: Path, objectives: str,
                                                               constraints: str, train: str,
                                                               on: bool | None) -> None:
    """Left out, train.int8_eval follows the spec: a search that budgets or optimises flash,
    SRAM, latency or int8 accuracy pays the int8 step a trial, a params-only one does not."""
    import yaml

    from search.spec import SpecError

    text = (SPEC % train).replace("{int8_accuracy: max, flash_bytes: min}", objectives).replace(
        "constraints: {max_params: 3000}", f"constraints: {constraints}")
    if on is None:
        with pytest.raises(SpecError, match="int8_eval"):
            parse_spec(yaml.safe_load(text))
        return
    spec = parse_spec(yaml.safe_load(text))
    assert spec.int8_eval() is on
    from search.spec import load_spec

    for name in ("quickstart", "mnist"):  # the shipped params-only spaces stay fast
        assert load_spec(REPO / "spaces" / f"{name}.yaml").int8_eval() is False
    assert load_spec(REPO / "spaces" / "mcu-cifar10.yaml").int8_eval() is True
