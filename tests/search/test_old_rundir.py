"""Run directories written by earlier versions still resume.

Ray pickled the searcher, the space, the spec, the scheduler and the callbacks into each
under the module paths of its version, so this test fails if a class Ray pickles moves
without its old path resolving (``search.pickled``'s alias table):

- ``tests/fixtures/rundir-0421630``, written by commit 0421630 (before the design reshaping:
  one search.tuner module, one search.tracking module): a 4-trial digits search
  (``--no-mlflow``), interrupted with Ctrl-C after 3 trials;
- ``tests/fixtures/rundir-cfb4fc4``, written by commit cfb4fc4 (the flat ``search/`` of 45
  modules, before the folders by job): an 8-trial digits search with TPE and multi-objective
  ASHA (``--no-mlflow``), interrupted with Ctrl-C after 2 trials.
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

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLI = str(Path(sys.executable).with_name("sparse-search"))


@pytest.mark.parametrize(("commit", "name", "done_before", "trials"), [
    ("0421630", "old-format-20261201-113545", 3, 4),
    ("cfb4fc4", "today-format-20261206-135101", 2, 8),
])
def test_a_run_dir_of_an_earlier_commit_resumes_to_the_end(tmp_path, commit, name, done_before,
                                                          trials):
    run_dir = tmp_path / name
    shutil.copytree(FIXTURES / f"rundir-{commit}", run_dir)
    with (run_dir / "results.csv").open() as f:
        before = {r["trial_key"] for r in csv.DictReader(f)}
    assert len(before) == done_before
    done = subprocess.run([CLI, "resume", str(run_dir), "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["trials"] == trials and summary["failed"] == 0
    with (run_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    keys = [r["trial_key"] for r in rows]
    assert len(keys) == len(set(keys)) == trials and before < set(keys)  # each recorded once
    assert json.loads((run_dir / "outcome.json").read_text())["complete"] is True
