"""A run directory written by an earlier version still resumes.

``tests/fixtures/rundir-0421630`` was written by commit 0421630 (before the design
reshaping: one search.tuner module, one search.tracking module): a 4-trial digits search
(`--no-mlflow`), interrupted with Ctrl-C after 3 trials. Ray pickled the searcher, the
space, the spec and the callbacks into it under the module paths of that version, so this
test fails if a class Ray pickles moves without staying importable at its old path.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "rundir-0421630"
CLI = str(Path(sys.executable).with_name("sparse-search"))


def test_a_run_dir_of_commit_0421630_resumes_to_the_end(tmp_path):
    run_dir = tmp_path / "old-format-20261201-113545"
    shutil.copytree(FIXTURE, run_dir)
    with (run_dir / "results.csv").open() as f:
        before = {r["trial_key"] for r in csv.DictReader(f)}
    assert len(before) == 3
    done = subprocess.run([CLI, "resume", str(run_dir), "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["trials"] == 4 and summary["failed"] == 0
    with (run_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    keys = [r["trial_key"] for r in rows]
    assert len(keys) == 4 and len(set(keys)) == 4 and before < set(keys)  # each recorded once
    assert json.loads((run_dir / "outcome.json").read_text())["complete"] is True
