"""The module paths Ray's pickles name are a declared API (:mod:`search.pickled`).

A fresh run dir's pickles (``ray/*.pkl``: the tuner with its searcher, scheduler, callbacks,
space and spec; the searcher's and callbacks' states) name only the project globals of
``PICKLED`` below, each at its folder's public path; every one of them, and every project
global the run dirs of earlier versions name (``tests/fixtures/rundir-*``), resolves.
A class that moves, or a new class Ray pickles, fails here first.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("finished_search")]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# Every project global a run dir's pickles may name: the folder faces' public paths.
PICKLED = {
    "search.rundir.RunDir", "search.rundir.Recorder", "search.rundir.ProgressCallback",
    "search.run.Background", "search.run.InBackground", "search.run.ProposerSearcher",
    "search.run.ForgetLostTrials", "search.run.MultiObjectiveASHA", "search.run.FrontToTracker",
    "search.run.trial_name", "search.space.SearchSpace", "search.space.Proposal",
    *(f"search.spec.{c}" for c in (
        "SearchSpec", "SearchSettings", "Objective", "Constraints", "EarlyStopping",
        "FillBudget", "Finalize", "InitialPoint", "Resources", "StemSpace", "StagesSpace",
        "ArchSpace", "Choice", "IntRange", "FloatRange")),
    "search.tracking.TrackingCallback", "trainables.data.DataConfig",
}
# Loads every pickle of a run dir in a fresh process and prints the globals unpickling looked
# up (Python's audit event for pickle.find_class: nested pickles included).
NAMED = """
import json, pickle, sys
from pathlib import Path
seen = set()
def hook(event, args):
    if event == "pickle.find_class":
        seen.add(f"{args[0]}.{args[1]}")
sys.addaudithook(hook)
import search  # the aliases of old paths, as the CLI has them
for p in sorted(Path(sys.argv[1]).glob("ray/*.pkl")):
    pickle.loads(p.read_bytes())
print(json.dumps(sorted(seen)))
"""


def _named(run_dir: Path) -> set[str]:
    done = subprocess.run([sys.executable, "-c", NAMED, str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return {g for g in json.loads(done.stdout) if g.split(".")[0] in ("search", "trainables")}


def _resolves(path: str) -> bool:
    """What unpickling does with a global: import its module, look the name up in it."""
    module, _, name = path.rpartition(".")
    try:
        pickle.Unpickler(io.BytesIO()).find_class(module, name)
    except (ImportError, AttributeError):
        return False
    return True


def test_a_fresh_run_dir_pickles_only_the_declared_public_paths(finished_search):
    named = _named(finished_search.run_dir)
    assert named, "no project global in the run dir's pickles: is the collector broken?"
    assert named <= PICKLED, f"not declared in PICKLED (pin it with search.pickled.public): " \
                             f"{sorted(named - PICKLED)}"


@pytest.mark.parametrize("commit", ["0421630", "cfb4fc4"])
def test_every_declared_path_and_every_path_an_earlier_run_dir_names_resolves(commit):
    old = _named(FIXTURES / f"rundir-{commit}")
    assert old  # they name project globals at their old paths
    assert [p for p in sorted(PICKLED | old) if not _resolves(p)] == []
