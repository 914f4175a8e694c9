"""search.run.tuner on a real local Ray (2 CPUs): tiny digits searches, real Optuna journal."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search.errors import UserError
from search.run.driver import resume_search, run_search
from search.run.searcher import ProposerSearcher
from search.run.tuner import make_scheduler, max_epochs
from search.rundir.layout import RunDir
from search.rundir.results import EARLY_STOPPED, ERROR, TERMINATED, pareto_front
from search.space import SearchSpace, dry_run
from search.spec import load_spec
from trainables.accounting import count_module
from trainables.arch import ArchConfig
from trainables.models import build_model

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)


def _scheduler(spec):
    """What _tune builds from a spec: the scheduler gets its section, objectives and max_t."""
    return make_scheduler(spec.search.early_stopping, spec.objectives,
                          max_t=max_epochs(spec.train))


DIGITS = (1, 8, 8)
# Random sampler, seed 0: 11 of the first 15 proposals exceed 1,200 params (see dry_run).
BUDGET_SPEC = """
name: budget
data: {name: digits, val_fraction: 0.2, subset: 300}
constraints: {max_params: 1200}
search: {sampler: random, num_samples: 4, max_concurrent: 2, seed: 0}
train: {epochs: 2, batch_size: 64, optimizer: adamw, lr: 0.02, prune_rounds: {choice: [0, 1]},
        prune_rate: 0.5, rewind_epoch: 1}
space:
  stem: {width: {int: [2, 12]}}
  num_stages: 1
  stages: {width: {int: [4, 32]}, layers: {int: [1, 2]}}
"""
# Seed 0, one trial at a time: a good lr first, then slow learners (lr 0.001) that ASHA can
# stop at its first rung, and one lr of 1e30 whose loss turns NaN (the trial raises).
MIXED_SPEC = """
name: mixed
data: {name: digits, val_fraction: 0.2, subset: 600}
constraints: {max_params: 3000}
search: {sampler: random, num_samples: 6, max_concurrent: 1, seed: 0,
         early_stopping: {scheduler: asha, grace_epochs: 1, reduction_factor: 2}}
train: {epochs: 3, batch_size: 32, optimizer: adamw, lr: {choice: [0.03, 0.001, 1.0e+30]}}
space:
  stem: {width: {int: [4, 12]}}
  num_stages: 1
  stages: {width: {int: [8, 24]}, layers: 1}
"""


@pytest.fixture(scope="module")
def local_ray(ray_session):
    """The session's Ray: started by init_ray, as a search starts it."""
    return ray_session


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def test_local_ray_listens_on_loopback_only(local_ray):
    pids = _descendants(os.getpid())
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    addrs = [line.split()[3] for line in out.splitlines()
             if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids]
    assert addrs, "the local Ray listens nowhere?"
    assert all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in addrs), addrs


def _spec(tmp_path: Path, text: str, **overrides):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return load_spec(path, **overrides)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _study(run_dir: Path, name: str) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def test_budget_search_never_trains_over_budget(local_ray, tmp_path):
    spec = _spec(tmp_path, BUDGET_SPEC)
    out = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)

    assert out.complete
    rows = _rows(out.run_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} == {TERMINATED}
    assert all(int(r["nonzero_params"]) <= 1200 for r in rows)
    # The same seeded proposals, screened without Ray: the search rejected exactly those.
    expected = dry_run(spec, 4, input_shape=DIGITS, num_classes=10).rejected
    assert out.summary["rejected"] == expected > 0
    assert out.summary["trials"] == 4 and out.summary["failed"] == 0
    # What a trial leaves behind loads back into its architecture with the reported size.
    key = rows[0]["trial_key"]
    trial_dir = out.run_dir / "trials" / key
    arch = ArchConfig.load(trial_dir / "arch.yaml")
    model = build_model(arch)
    model.load_state_dict(torch.load(trial_dir / "model.pt", weights_only=True))
    acc = count_module(model, DIGITS)
    assert acc.nonzero_params == int(rows[0]["nonzero_params"])
    assert json.loads((trial_dir / "layers.json").read_text())["nonzero_params"] == acc.nonzero_params
    assert json.loads((trial_dir / "result.json").read_text())["trial_id"] == rows[0]["trial_id"]
    # Every front member is an eligible point of a finished trial; the journal has no trial
    # left RUNNING and one COMPLETE trial per row (the rejected ones are COMPLETE too).
    front = out.summary["front"]
    assert front and all(p["nonzero_params"] <= 1200 for p in front)
    with (out.run_dir / "pareto.csv").open() as f:
        assert [r["trial_key"] for r in csv.DictReader(f)] == [p["trial_key"] for p in front]
    study = _study(out.run_dir, "budget")
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(study.trials) == 4 + expected
    spec_back = load_spec(out.run_dir / "spec.yaml")
    assert spec_back.to_dict() == spec.to_dict()
    # Resuming a finished search trains nothing and reports the same front.
    again = resume_search(out.run_dir, mlflow=False, progress=False)
    assert again.complete and again.summary["front"] == out.summary["front"]
    assert _rows(out.run_dir) == rows


def test_early_stopped_and_failed_trials_are_recorded_never_on_front(local_ray, tmp_path):
    spec = _spec(tmp_path, MIXED_SPEC)
    out = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)

    rows = {r["trial_key"]: r for r in _rows(out.run_dir)}
    assert len(rows) == 6, "the search goes on past a failed trial"
    statuses = [r["status"] for r in rows.values()]
    assert statuses.count(ERROR) == 1 and statuses.count(EARLY_STOPPED) >= 1
    failed = next(r for r in rows.values() if r["status"] == ERROR)
    assert failed["train/lr"] == "1e+30" and "TrainingDiverged" in failed["error"]
    stopped = {k for k, r in rows.items() if r["status"] == EARLY_STOPPED}
    for k in stopped:
        assert float(rows[k]["fidelity"]) < 1 and rows[k]["test_accuracy"] == ""
    front_keys = {p["trial_key"] for p in out.summary["front"]}
    assert front_keys and not front_keys & (stopped | {failed["trial_key"]})
    # Optuna learned the truth: complete only at full fidelity, pruned, failed.
    states = {str(t.number): t.state for t in _study(out.run_dir, "mixed").trials}
    for k, r in rows.items():
        expected = {TERMINATED: TrialState.COMPLETE, EARLY_STOPPED: TrialState.PRUNED,
                    ERROR: TrialState.FAIL}[r["status"]]
        assert states[k] == expected, (k, r["status"])
    assert out.summary["early_stopped"] == len(stopped) and out.summary["failed"] == 1


def test_searcher_pickles_without_storage_and_fails_orphans_on_restore(tmp_path):
    spec = _spec(tmp_path, BUDGET_SPEC)
    space = SearchSpace(spec, input_shape=DIGITS, num_classes=10)
    journal = tmp_path / "optuna.journal"
    searcher = ProposerSearcher(space, journal=journal, study_name="s", num_samples=3)
    first = searcher.suggest("ray-a")
    state_file = tmp_path / "searcher.pkl"
    searcher.save(str(state_file))  # the snapshot a dead driver left: it knows ray-a only
    second = searcher.suggest("ray-b")  # asked after the snapshot: Ray will never know it
    assert first["meta/trial_key"] != second["meta/trial_key"]
    assert all(k.startswith(("arch/", "train/", "meta/")) for k in first)

    unpickled = pickle.loads(pickle.dumps(searcher))  # what tuner.pkl holds
    assert unpickled._proposer is None and unpickled.rejected == searcher.rejected

    # The resumed driver builds its own searcher; Ray restores the snapshot into it.
    revived = ProposerSearcher(space, journal=journal, study_name="s", num_samples=3)
    revived.restore(str(state_file))
    states = {str(t.number): t.state for t in revived.proposer.study.trials}
    assert states[first["meta/trial_key"]] == TrialState.RUNNING  # Ray resumes it
    assert states[second["meta/trial_key"]] == TrialState.FAIL
    # ray-a finishes at full fidelity after the resume: Optuna gets its values.
    revived.on_trial_complete("ray-a", {"val_accuracy": 0.5, "nonzero_params": 100,
                                        "test_accuracy": 0.4})
    done = revived.proposer.study.trials[int(first["meta/trial_key"])]
    assert done.state == TrialState.COMPLETE and done.values == [0.5, 100.0]
    # num_samples counts trials that train: the orphan never did, so two more are handed out.
    assert revived.suggest("ray-c") is not None and revived.suggest("ray-d") is not None
    assert revived.suggest("ray-e") == "FINISHED"


def test_time_budget_stops_new_trials_and_survives_a_resume(tmp_path):
    spec = _spec(tmp_path, BUDGET_SPEC)
    space = SearchSpace(spec, input_shape=DIGITS, num_classes=10)
    journal = tmp_path / "optuna.journal"
    searcher = ProposerSearcher(space, journal=journal, study_name="t", num_samples=10,
                                time_budget=1.0)
    assert searcher.suggest("ray-a") is not None and not searcher.out_of_time()
    time.sleep(0.6)  # ray-a takes 0.6 s: with ~0.4 s left, a trial like it would overrun
    searcher.on_trial_complete("ray-a", {"val_accuracy": 0.5, "nonzero_params": 100,
                                         "test_accuracy": 0.4})
    assert searcher.durations and searcher.durations[0] >= 0.6
    assert searcher.suggest("ray-b") == "FINISHED" and searcher.stopped_by == "time_budget"
    assert 0.6 <= searcher.spent < 1.0
    # The time spent travels with the snapshot: a resumed search does not get a fresh hour.
    state = tmp_path / "searcher.pkl"
    searcher.save(str(state))
    revived = ProposerSearcher(space, journal=journal, study_name="t", num_samples=10,
                               time_budget=1.0)
    revived.restore(str(state))
    assert revived.spent >= 0.6 and revived.out_of_time()
    assert pickle.loads(pickle.dumps(searcher)).spent >= 0.6
    # Without a budget nothing is ever out of time.
    assert not ProposerSearcher(space, journal=tmp_path / "j2", study_name="u",
                                num_samples=1).out_of_time()
    # The clock runs from the command's start (Ray's start-up, data loading), not from the
    # first trial: a search whose start-up ate its budget starts nothing.
    late = ProposerSearcher(space, journal=tmp_path / "j3", study_name="v", num_samples=10,
                            time_budget=1.0, started_at=time.monotonic() - 1.5)
    assert late.suggest("ray-a") == "FINISHED" and late.spent >= 1.5
    assert pickle.loads(pickle.dumps(late))._started_at is None  # no clock crosses processes
    # With early stopping most trials end after a rung; the next one may train to the end:
    # the budget plans with the trials that did.
    es = ProposerSearcher(space, journal=tmp_path / "j4", study_name="w", num_samples=10,
                          time_budget=100.0)
    for trial_id, seconds, result in [("a", 0.3, {"val_accuracy": 0.5, "nonzero_params": 100,
                                                  "test_accuracy": 0.4}),
                                      ("b", 0.0, {"val_accuracy": 0.2, "nonzero_params": 90}),
                                      ("c", 0.0, {"val_accuracy": 0.2, "nonzero_params": 80})]:
        assert es.suggest(trial_id) is not None
        time.sleep(seconds)
        es.on_trial_complete(trial_id, result)
    assert len(es.durations) == 3 and es.full_durations == [es.durations[0]]
    assert es.typical_trial_s() == es.durations[0] > statistics.median(es.durations)


def test_a_search_ends_complete_at_its_time_budget(local_ray, tmp_path):
    spec = _spec(tmp_path, BUDGET_SPEC, num_samples=200, time_budget="4s")
    out = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)
    assert out.complete and out.summary["stopped_by"] == "time_budget"
    assert 1 <= out.summary["trials"] < 200 and out.summary["wall_s"] > 0
    assert {r["status"] for r in _rows(out.run_dir)} == {TERMINATED}


def test_a_resume_given_more_time_goes_on_after_the_budget(local_ray, tmp_path):
    # A budget spent before the first trial: Ray's snapshot then holds no trial, which Ray
    # 2.60 cannot restore (IndexError), so every resume below starts Tune afresh until a
    # trial is recorded, and restores it after.
    spec = _spec(tmp_path, BUDGET_SPEC, num_samples=200, time_budget="0.01s")
    first = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)
    assert first.complete and first.summary["stopped_by"] == "time_budget"
    assert first.summary["trials"] == 0
    # A plain resume keeps the budget, which is spent: nothing trains.
    again = resume_search(first.run_dir, mlflow=False, progress=False)
    assert again.complete and again.summary["trials"] == 0
    assert again.summary["wall_s"] >= first.summary["wall_s"]
    # More time: the same search goes on (two trials at least: none has ended to time).
    more = resume_search(first.run_dir, mlflow=False, progress=False, time_budget="10s")
    assert more.complete and more.summary["stopped_by"] == "time_budget"
    trained = more.summary["trials"]
    assert trained >= 1
    # More again, from a snapshot with trials: room for a few trials, sized from what this
    # machine measured (a resume that trains nothing, and the trials so far), not from the
    # last resume's wall time: on a fast machine three times that fitted all 200 samples.
    # The trials trained before are not trained again.
    spent = more.summary["wall_s"]
    start_s = again.summary["wall_s"] - first.summary["wall_s"]  # Ray's start, the data
    trial_s = max(float(r["train_seconds"]) for r in _rows(more.run_dir)) + 1.0
    extra = 2 * start_s + 4 * trial_s
    further = resume_search(first.run_dir, mlflow=False, progress=False, time_budget=extra)
    assert further.complete and further.summary["stopped_by"] == "time_budget"
    rows = _rows(further.run_dir)
    keys = [r["trial_key"] for r in rows]
    assert further.summary["trials"] == len(rows) > trained and len(set(keys)) == len(keys)
    assert {r["status"] for r in rows} == {TERMINATED}
    # ... within the extra time (no trial starts that the median trial says would end later;
    # one may overrun by a little)
    assert spent < further.summary["wall_s"] <= spent + 1.5 * extra
    # The extended budget travels with the search: a later plain resume starts nothing.
    last = resume_search(first.run_dir, mlflow=False, progress=False)
    assert last.complete and last.summary["trials"] == len(rows)
    with pytest.raises(UserError, match=r"--time-budget 'soon' is invalid: expected .*2h30m"):
        resume_search(first.run_dir, mlflow=False, progress=False, time_budget="soon")


def test_pareto_front_only_from_eligible_points():
    objectives = [("val_accuracy", "max"), ("nonzero_params", "min")]
    points = [
        {"val_accuracy": 0.90, "nonzero_params": 100, "macs": 10},
        {"val_accuracy": 0.95, "nonzero_params": 900, "macs": 10},  # over max_params
        {"val_accuracy": 0.92, "nonzero_params": 400, "macs": 99},  # over max_macs
        {"val_accuracy": 0.91, "nonzero_params": 300, "macs": 10},
        {"val_accuracy": 0.89, "nonzero_params": 200, "macs": 10},  # dominated by the first
        {"val_accuracy": math.nan, "nonzero_params": 50, "macs": 10},
    ]
    assert pareto_front(points, objectives=objectives,
                        budgets={"nonzero_params": 500, "macs": 50}) == [0, 3]
    assert pareto_front(points, objectives=objectives, budgets={}) == [0, 3, 2, 1]
    # Every budget of the spec counts (Constraints.limits()), deployment ones included; a point
    # that lacks the budgeted figure is not within it.
    flash = [{**p, "flash_bytes": 1000 * (i + 1)} for i, p in enumerate(points)]
    flash[3].pop("flash_bytes")
    assert pareto_front(flash, objectives=objectives, budgets={"flash_bytes": 2500}) == [0, 1]
    from search.spec import Constraints

    assert Constraints(max_params=500, max_flash_bytes=2500, max_latency_ms=1.5).limits() == {
        "nonzero_params": 500, "flash_bytes": 2500, "latency_ms": 1.5}


def test_asha_spans_every_pruning_round(tmp_path):
    spec = _spec(tmp_path, MIXED_SPEC.replace("epochs: 3,", "epochs: {int: [2, 5]}, "
                                              "prune_rounds: {choice: [0, 2]},"))
    assert max_epochs(spec.train) == 15
    asha = _scheduler(spec)
    assert asha._max_t == 15 and asha._time_attr == "epoch" and asha.metric == "val_accuracy"
    mo = _scheduler(_spec(tmp_path, MIXED_SPEC.replace("scheduler: asha", "scheduler: moasha")
                              .replace("epochs: 3,", "epochs: 5, prune_rounds: 2,")))
    assert mo.max_t == 15 and mo.time_attr == "epoch" and mo.rungs == [1, 2, 4, 8]
    assert mo.objectives == (("val_accuracy", "max"), ("nonzero_params", "min"))
    assert _scheduler(_spec(tmp_path, BUDGET_SPEC)) is None


def test_run_dirs_never_collide(tmp_path):
    a = RunDir.create(tmp_path, "x")
    b = RunDir.create(tmp_path, "x")
    assert a.path != b.path and a.path.name.startswith("x-") and b.trials.is_dir()


def test_initial_points_train_first_and_are_marked_everywhere(local_ray, mlflow_server,
                                                              tmp_path):
    from mlflow import MlflowClient

    from search.rundir.progress import front_table
    from search.tracking import TAG_INITIAL

    net = ("{in_channels: 1, input_size: [8, 8], num_classes: 10, stem: {width: 6}, "
           "stages: [{width: 12, layers: 1}]}")
    text = BUDGET_SPEC.replace("num_samples: 4,", "num_samples: 3,").replace(
        "seed: 0}", f"seed: 0, initial: [{{arch: {net}, label: my-net, train/prune_rounds: 0}}]}}")
    spec = _spec(tmp_path, text)
    out = run_search(spec, storage_dir=tmp_path / "runs", tracking_uri=mlflow_server.url,
                     progress=False)
    assert out.complete
    rows = {r["trial_key"]: r for r in _rows(out.run_dir)}
    assert rows["0"]["initial"] == "my-net" and rows["0"]["status"] == TERMINATED
    assert rows["0"]["arch/stem/width"] == "6" and rows["0"]["arch/stages/0/width"] == "12"
    assert [k for k, r in rows.items() if r["initial"]] == ["0"]
    # the front says which point came from search.initial (the table marks it)
    table = front_table([{**r, "nonzero_params": int(r["nonzero_params"]),
                          "val_accuracy": float(r["val_accuracy"]),
                          "test_accuracy": float(r["test_accuracy"])} for r in rows.values()])
    assert re.search(r"\s0\*\s", table) and "search.initial" in table
    with (out.run_dir / "pareto.csv").open() as f:
        front = list(csv.DictReader(f))
    assert all(p["initial"] == ("my-net" if p["trial_key"] == "0" else "") for p in front)
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_INITIAL}` = 'my-net'")
    assert len(runs) == 1 and runs[0].data.tags["sparse_search.trial_key"] == "0"
    assert runs[0].info.status == "FINISHED"


def test_raylet_error_messages_go_to_stderr_not_stdout(capsys):
    import ray._private.worker as ray_worker

    from search.run.ray_runtime import quiet_logging

    quiet_logging()
    quiet_logging()  # idempotent: one wrapper, not two
    assert ray_worker.print_to_stdstream._sparse_search
    # what Ray's listen_error_messages thread passes for a worker that died
    ray_worker.print_to_stdstream({"lines": ["A worker died or was killed while executing a "
                                             "task by an unexpected system error."],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["a trial's print"], "pid": 1234, "ip": "127.0.0.1",
                                   "is_err": False, "task_name": "t", "actor_name": "a"},
                                  ignore_prefix=False)
    out, err = capsys.readouterr()
    assert "A worker died" in err and "A worker died" not in out
    assert "a trial's print" in out  # everything else keeps its stream


def test_a_snapshot_copy_racing_a_temporary_file_is_not_reported():
    import logging

    from search.run.ray_runtime import quiet_logging

    quiet_logging()
    logger = logging.getLogger("ray.tune.execution.experiment_state")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for name in (".bd13-tmp-searcher-state-2026.pkl", "experiment_state-2026.json"):
            try:  # what pyarrow raises when the listed file is gone by the copy
                raise FileNotFoundError(2, f"Failed to open local file '/tmp/ray/s/{name}'")
            except FileNotFoundError:
                logger.error("Saving experiment state to storage at '/runs/x' failed with "
                             "exception: ", exc_info=True)
        logger.error("Saving experiment state to storage at '/runs/x' failed with exception: ")
    finally:
        logger.removeHandler(handler)
    # only the temporary file's race is dropped: a real file missing, or no exception, stays
    assert len(seen) == 2
    assert "experiment_state-2026.json" in str(seen[0].exc_info[1]) and seen[1].exc_info is None


def test_a_search_with_multi_objective_asha_ends_complete(local_ray, tmp_path):
    spec = _spec(tmp_path, MIXED_SPEC.replace("scheduler: asha", "scheduler: moasha"))
    assert _scheduler(spec).__class__.__name__ == "MultiObjectiveASHA"
    out = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)
    assert out.complete
    rows = {r["trial_key"]: r for r in _rows(out.run_dir)}
    assert len(rows) == 6 and [r["status"] for r in rows.values()].count(ERROR) == 1
    stopped = {k for k, r in rows.items() if r["status"] == EARLY_STOPPED}
    front = {p["trial_key"] for p in out.summary["front"]}
    assert front and not front & stopped
    # a trial the rule stopped was beaten at its rung by one no bigger: the smallest size
    # always has a trial that went on
    sizes = {k: int(r["nonzero_params"]) for k, r in rows.items() if r["status"] != ERROR}
    smallest = {k for k, v in sizes.items() if v == min(sizes.values())}
    assert smallest - stopped
    assert "meta/screened_params" not in rows["0"]  # bookkeeping stays out of the tables


LAMARCKIAN_SPEC = """
name: lamarckian
data: {name: digits, val_fraction: 0.2, subset: 300}
constraints: {max_params: 3000}
search: {sampler: lamarckian, num_samples: 6, max_concurrent: 2, seed: 0,
         lamarckian: {warmup: 2, explore: 0.0, child_epochs: 1}}
train: {epochs: 2, batch_size: 64, optimizer: adamw, lr: 0.02}
space:
  stem: {width: {int: [4, 12]}}
  num_stages: 1
  stages: {width: {int: [4, 24]}, layers: {int: [1, 2]}, kernel: {choice: [3, 5]}}
"""


def test_lamarckian_children_train_from_their_parents_weights(local_ray, tmp_path):
    spec = _spec(tmp_path, LAMARCKIAN_SPEC)
    out = run_search(spec, storage_dir=tmp_path / "runs", mlflow=False, progress=False)
    assert out.complete
    rows = {r["trial_key"]: r for r in _rows(out.run_dir)}
    assert len(rows) == 6 and {r["status"] for r in rows.values()} == {TERMINATED}
    children = {k: r for k, r in rows.items() if r["parent"]}
    assert len(children) >= 3  # after the 2 warm-up trials, one at a time as parents finish
    for key, row in children.items():
        # the parent finished before its child was asked, and the child started from its
        # model.pt (read from the experiment's storage): part of the child is the parent's
        assert rows[row["parent"]]["status"] == TERMINATED and int(row["parent"]) < int(key)
        assert 0 < float(row["inherited_fraction"]) <= 1
        assert row["epochs"] == "1" and row["train/epochs"] == "2"  # child_epochs; the recipe
    assert all(r["epochs"] == "2" and not r["inherited_fraction"]
               for k, r in rows.items() if k not in children)
    assert load_spec(out.run_dir / "spec.yaml").to_dict() == spec.to_dict()
