"""`sparse-search finalize` and `train RUN_DIR KEY` through the console script, on a copy of
the suite's finished search (tests/conftest.py): SIGTERM mid-finalize (exit 130, a rerun
completes), the recorded recipe reproduced, bad inputs (exit 2)."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The suite's finished search (a CLI search with Ray, tests/conftest.py), on its worker.
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("finished_search")]

SCRIPT = str(Path(sys.executable).with_name("sparse-search"))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def run_dir(finished_search, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the suite's finished search (tests/conftest.py), which finalize changes;
    every finalize here is --no-mlflow (the copy still names the shared store)."""
    return finished_search.copy(tmp_path_factory.mktemp("cli_finalize"))


def _first_key(run_dir: Path) -> str:
    with (run_dir / "results.csv").open() as f:
        return next(csv.DictReader(f))["trial_key"]


def test_sigterm_exits_130_and_a_rerun_completes(run_dir: Path, tmp_path: Path) -> None:
    # Started with SIGINT ignored, as `sparse-search finalize ... &` in a script starts it:
    # SIGTERM used to raise that ignored SIGINT and do nothing.
    with (run_dir / "pareto.csv").open() as f:
        members = min(2, len(list(csv.DictReader(f))))  # the front of 4 random trials: 1 or 2
    total = 3 * members
    log = tmp_path / "finalize.log"
    with log.open("w") as f:
        proc = subprocess.Popen([SCRIPT, "finalize", str(run_dir), "--top", "2", "--seeds", "3",
                                 "--epochs", "15", "--no-mlflow"], stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "final").glob("*/result.json")):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "continue with `sparse-search finalize" in log.read_text()
    done = len(list((run_dir / "final").glob("*/result.json")))
    assert 1 <= done < total
    out = _cli("finalize", str(run_dir), "--top", "2", "--seeds", "3", "--epochs", "15",
               "--no-mlflow", "--json")
    assert out.returncode == 0, out.stderr
    assert f"{total - done} to train, {done} already done" in out.stderr
    with (run_dir / "final-pareto.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == members and {r["seeds"] for r in rows} == {"3"}
    assert _cli("pareto", "--final", "--run-dir", str(run_dir)).returncode == 0


def test_train_run_dir_key_reproduces_the_recorded_recipe(run_dir: Path) -> None:
    out = _cli("train", str(run_dir), _first_key(run_dir), "--epochs", "1", "--json")
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("train ")]
    assert "optimizer='adamw'" in line and "lr=0.02" in line and "batch_size=32" in line
    assert "epochs=1" in line and "seed=0" in line
    assert [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("epoch")] == ["1/1"]


def test_bad_inputs_exit_2(run_dir: Path, tmp_path: Path) -> None:
    cases = [
        (("finalize", str(tmp_path / "nowhere")), "no such run directory"),
        (("finalize", str(run_dir), "--seeds", "0"), "--seeds 0 is invalid"),
        (("finalize", str(run_dir), "--time-budget", "soon"),
         "--time-budget 'soon' is invalid: expected a positive duration"),
        (("train", str(run_dir), "99", "--epochs", "1"), "trial '99' is not in"),
        (("train", str(run_dir)), "name the trial to retrain"),
        (("train", str(run_dir), _first_key(run_dir), "--data", "digits"), "is a run directory"),
    ]
    for args, message in cases:
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_a_time_budget_too_small_for_any_member_trains_nothing_and_says_so(run_dir: Path) -> None:
    # 10,000 epochs at the trials' measured pace cannot end in 1 minute: all left out, exit 0
    # (a budget is the user's choice, as the search's is), the note names them.
    out = _cli("finalize", str(run_dir), "--epochs", "10000", "--time-budget", "1m", "--no-mlflow")
    assert out.returncode == 0, out.stderr
    assert "time budget 1 min: 0 retrainings planned" in out.stderr
    assert "past the budget" in out.stderr and "note: the time budget left out" in out.stderr
    assert not list((run_dir / "final").glob("*-s*/result.json")) or all(
        '"epochs": 10000' not in p.read_text() for p in (run_dir / "final").glob("*/result.json"))
