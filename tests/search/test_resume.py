"""`sparse-search resume` after a real SIGKILL of the driver (its whole process group),
tracked in a real MLflow sqlite store."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

REPO = Path(__file__).resolve().parents[2]
# Six small trials, two at a time, three epochs each (a checkpoint per epoch): killed after two
# finished, some are in flight.
SPEC = """
name: resumable
data: {name: digits, val_fraction: 0.2, subset: 400}
constraints: {max_params: 3000}
search: {sampler: random, num_samples: 6, max_concurrent: 2, seed: 1}
train: {epochs: 3, batch_size: 32, optimizer: adamw, lr: 0.02}
space:
  stem: {width: {int: [4, 12]}}
  num_stages: 1
  stages: {width: {int: [8, 24]}, layers: 1}
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", *args]


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in the session the test started (Ray workers, agents)."""
    deadline = time.monotonic() + 30
    while pids := _session_pids(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes of session {sid} survive: {pids}"
        time.sleep(0.2)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "results.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def test_resume_after_sigkill_finishes_every_trial_exactly_once(tmp_path):
    spec = tmp_path / "resumable.yaml"
    spec.write_text(SPEC)
    storage = tmp_path / "runs"
    log = (tmp_path / "run.log").open("w")
    db = tmp_path / "mlflow.db"
    run = subprocess.Popen(_cli("run", str(spec), "--storage", str(storage), "--tracking-uri",
                                f"sqlite:///{db}"),
                           cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        run_dir = None
        while True:
            assert run.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'run.log').read_text()}"
            assert time.monotonic() < deadline, "two trials did not finish in time"
            dirs = list(storage.glob("resumable-*"))
            run_dir = dirs[0] if dirs else None
            if run_dir is not None and len(_rows(run_dir)) >= 2:
                break
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        _kill_session(run.pid)
    before = {r["trial_key"]: json.loads((run_dir / "trials" / r["trial_key"] / "result.json").read_text())
              for r in _rows(run_dir)}
    assert 2 <= len(before) < 6

    out, err = tmp_path / "resume.out", tmp_path / "resume.err"
    with out.open("w") as o, err.open("w") as e:
        resume = subprocess.Popen(_cli("resume", str(run_dir), "--json"), cwd=REPO, stdout=o,
                                  stderr=e, start_new_session=True)
    try:
        assert resume.wait(timeout=500) == 0, err.read_text()[-3000:]
        # ray.shutdown() stopped the resume's Ray: nothing of its session may linger.
        deadline = time.monotonic() + 30
        while _session_pids(resume.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session_pids(resume.pid)
    finally:
        if resume.poll() is None:
            os.killpg(resume.pid, signal.SIGKILL)
            resume.wait()
        _kill_session(resume.pid)
    stdout = out.read_text()
    summary = json.loads(stdout.strip().splitlines()[-1])
    rows = _rows(run_dir)
    keys = [r["trial_key"] for r in rows]
    assert len(keys) == len(set(keys)) == 6, keys
    assert summary["trials"] == 6 and summary["complete"] and summary["run_dir"] == str(run_dir)
    assert {r["status"] for r in rows} == {"TERMINATED"}
    # Trials recorded before the kill were neither rerun nor recorded again.
    for key, rec in before.items():
        after = json.loads((run_dir / "trials" / key / "result.json").read_text())
        assert (after["trial_id"], after["finished_at"]) == (rec["trial_id"], rec["finished_at"])
    # The journal kept what the sampler learned: every trained trial told once, nothing left
    # RUNNING (asked-but-lost trials of the killed driver were told FAIL).
    storage_ = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    study = optuna.load_study(study_name="resumable", storage=storage_)
    states = {str(t.number): t.state for t in study.trials}
    assert all(states[k] == TrialState.COMPLETE for k in keys)
    # The others are rejected proposals (COMPLETE, infeasible) or lost asks told FAIL.
    assert {s for n, s in states.items() if n not in keys} <= {TrialState.COMPLETE, TrialState.FAIL}
    # MLflow (the store the run used, found in run_dir/mlflow.json): the same parent, finished;
    # a finished child per trial; nothing left RUNNING by the kill.
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("resumable").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sparse_search.role") == "search"]
    assert [p.info.status for p in parents] == ["FINISHED"]
    children = {r.data.tags["sparse_search.trial_key"]: r.info.status for r in runs
                if r.data.tags.get("sparse_search.role") == "trial"}
    assert all(children[k] == "FINISHED" for k in keys), children
    assert "RUNNING" not in children.values()


def test_a_trial_the_searcher_holds_but_ray_lost_is_trained_again_under_another_key(
        ray_session, tmp_path):
    """Ray's list of trials and the searcher's (and the sample counter's) snapshots are
    separate files: a driver SIGKILLed while they were copied to a storage URI left a
    searcher holding a trial as running that Ray never restored. Made here by hand from a
    finished search (a local run dir; the copy order is not what is tested): the resume
    forgets that trial, trains another in its place and ends complete (it waited for the lost
    one and ended "interrupted", exit 130, on every resume)."""
    import pickle
    import shutil

    from search.run.driver import resume_search, run_search
    from search.run.tuner import EXPERIMENT_NAME
    from search.spec import parse_spec

    spec = parse_spec({**yaml.safe_load(SPEC), "search": {
        "sampler": "random", "num_samples": 3, "max_concurrent": 1, "seed": 1}})
    first = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)
    assert first.complete and first.summary["trials"] == 3
    run_dir = first.run_dir
    ray_dir = run_dir / EXPERIMENT_NAME
    (state_path,) = ray_dir.glob("experiment_state-*.json")
    state = json.loads(state_path.read_text())
    lost_row = _rows(run_dir)[-1]
    lost_key, lost_id = lost_row["trial_key"], lost_row["trial_id"]
    # Ray's list: as snapshotted before the last trial was created.
    state["trial_data"] = [t for t in state["trial_data"]
                           if json.loads(t[0])["trial_id"] != lost_id]
    state_path.write_text(json.dumps(state))
    # The searcher's snapshot: taken after, with that trial in flight (and its key handed out).
    (searcher_path,) = ray_dir.glob("searcher-state-*.pkl")
    searcher = pickle.loads(searcher_path.read_bytes())
    searcher["live"] = {lost_id: lost_key}
    searcher_path.write_bytes(pickle.dumps(searcher))
    # ... and nothing of it was recorded.
    shutil.rmtree(run_dir / "trials" / lost_key)
    (run_dir / "outcome.json").unlink()

    again = resume_search(run_dir, mlflow=False, progress=False)
    assert again.complete and again.summary["stopped_by"] == "num_samples"
    keys = [r["trial_key"] for r in _rows(run_dir)]
    assert len(keys) == len(set(keys)) == 3 and lost_key not in keys


def test_a_ray_snapshot_cut_short_by_a_full_disk_resumes_to_the_end(ray_session, tmp_path,
                                                                     capsys):
    """Ray Tune writes experiment_state-*.json in place: a disk that filled while it wrote
    leaves it cut short (seen in test_cli_faults), and Tuner.restore died on a JSONDecodeError.
    The resume starts Tune afresh instead: the trials recorded are kept, the one that was in
    flight trains again under a new key, and the search ends complete."""
    import shutil

    from search.run.driver import resume_search, run_search
    from search.run.tuner import EXPERIMENT_NAME
    from search.spec import parse_spec

    spec = parse_spec({**yaml.safe_load(SPEC), "search": {
        "sampler": "random", "num_samples": 3, "max_concurrent": 1, "seed": 2}})
    first = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)
    run_dir = first.run_dir
    lost_key = _rows(run_dir)[-1]["trial_key"]
    shutil.rmtree(run_dir / "trials" / lost_key)  # in flight: not recorded
    (run_dir / "outcome.json").unlink()
    for name in ("experiment_state-*.json", "searcher-state-*.pkl"):
        (path,) = (run_dir / EXPERIMENT_NAME).glob(name)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short
    capsys.readouterr()

    again = resume_search(run_dir, mlflow=False, progress=False)
    assert again.complete and again.summary["trials"] == 3
    keys = [r["trial_key"] for r in _rows(run_dir)]
    assert len(keys) == len(set(keys)) == 3 and lost_key not in keys
    assert "experiment snapshot in" in capsys.readouterr().err
