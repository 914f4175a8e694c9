"""`sparse-search run / resume / submit` as a user runs them: real processes, real Ray, MLflow."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("finished_search")]

REPO = Path(__file__).resolve().parents[1]
SPEC = """
name: clirun
data: {name: digits, val_fraction: 0.2, subset: 300}
constraints: {max_params: 1200}
search: {sampler: random, num_samples: 3, max_concurrent: 2, seed: 0}
train: {epochs: 2, batch_size: 64, optimizer: adamw, lr: 0.02}
space:
  stem: {width: {int: [2, 12]}}
  num_stages: 1
  stages: {width: {int: [4, 32]}, layers: {int: [1, 2]}}
"""


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _spec(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "clirun.yaml"
    path.write_text(text)
    return path


def test_run_json_front_table_and_mlflow(finished_search, tmp_path):
    done = finished_search  # `sparse-search run spec.yaml --json` (tests/conftest.py)
    db = finished_search.cwd / "mlflow.db"
    assert "Traceback" not in done.stderr
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])  # the LAST stdout line is the JSON object
    assert set(summary) >= {"run_dir", "trials", "failed", "rejected", "front"}
    assert summary["trials"] == 4 and summary["failed"] == 0 and summary["rejected"] > 0
    assert any(ln.startswith("Pareto front (") for ln in lines)
    run_dir = Path(summary["run_dir"])
    with (run_dir / "results.csv").open() as f:
        rows = {r["trial_key"]: r for r in csv.DictReader(f)}
    for p in summary["front"]:
        assert set(p) >= {"trial_id", "trial_key", "nonzero_params", "val_accuracy",
                          "test_accuracy", "arch"}
        row = rows[p["trial_key"]]
        assert (row["trial_id"], int(row["nonzero_params"])) == (p["trial_id"], p["nonzero_params"])
        # +- its standard error on the validation split, in the JSON, results.csv and the table
        assert 0 <= p["val_accuracy_se"] < 0.5
        assert float(row["val_accuracy_se"]) == p["val_accuracy_se"]
        assert f"{p['val_accuracy']:.4f} {p['val_accuracy_se']:>6.4f}" in done.stdout
        assert p["arch"] in done.stdout  # listed in the table too
    # MLflow: one finished parent, one finished child per trial, keyed like results.csv.
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(finished_search.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sparse_search.role") == "search"]
    children = [r for r in runs if r.data.tags.get("sparse_search.role") == "trial"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(c.data.tags["sparse_search.trial_key"] for c in children) == sorted(rows)
    assert {c.info.status for c in children} == {"FINISHED"}
    front_tags = {c.data.tags["sparse_search.trial_key"] for c in children
                  if c.data.tags.get("on_front") == "true"}
    assert front_tags == {p["trial_key"] for p in summary["front"]}
    logged = client.download_artifacts(parents[0].info.run_id, "pareto.csv", str(tmp_path))
    with open(logged) as f:
        se = {r["trial_key"]: float(r["val_accuracy_se"]) for r in csv.DictReader(f)}
    assert se == {p["trial_key"]: p["val_accuracy_se"] for p in summary["front"]}
    shown = _cli("pareto", "--tracking-uri", f"sqlite:///{db}", "--experiment",
                 finished_search.experiment, cwd=tmp_path)  # from the store
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert all(f"{p['val_accuracy']:.4f} {p['val_accuracy_se']:>6.4f}" in shown.stdout
               for p in summary["front"])


def test_dry_run_samples_without_training(tmp_path):
    spec = _spec(tmp_path)
    done = _cli("run", str(spec), "--dry-run", "4", "--json", "--storage",
                str(tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["feasible"] == 4 and report["rejected"] > 0
    assert all(p["nonzero_params"] <= 1200 for p in report["proposals"])
    assert not (tmp_path / "runs").exists()


def test_user_errors_exit_2_without_traceback(tmp_path, monkeypatch, capsys):
    from search.cli.commands import main

    bad = _spec(tmp_path, SPEC.replace("num_samples: 3", "num_samples: -3"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "ok").mkdir()
    good = str(_spec(tmp_path / "ok"))
    cases = {
        "search.num_samples": ("run", str(bad), "--no-mlflow"),
        "only for --dry-run": ("run", good, "7"),
        "no such run directory": ("resume", str(tmp_path / "missing")),
        "is not reachable": ("run", good, "--tracking-uri", dead, "--storage",
                             str(tmp_path / "runs")),
        "no Ray job server answers": ("submit", good, "--address", dead, "--no-mlflow"),
    }
    for expected, args in cases.items():
        monkeypatch.setattr(sys, "argv", ["sparse-search", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (args, err)
        assert err.startswith("error: ") and expected in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # a dead tracking server stops the run first


@pytest.mark.parametrize(("args", "expected"), [
    (["dry-run", "x.yaml"], "No such command 'dry-run'. Did you mean 'run'?"),
    (["run", "--bogus", "x.yaml"], "No such option: --bogus"),
    (["run", "x.yaml", "--max-params", "many"], "Invalid value for '--max-params'"),
])
def test_usage_errors_exit_2_without_traceback(monkeypatch, capsys, args, expected):
    # typer >= 0.22 raises the usage errors of its own click copy, not click's
    from search.cli.commands import main

    monkeypatch.setattr(sys, "argv", ["sparse-search", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert expected in err and "Usage: " in err and "Traceback" not in err
