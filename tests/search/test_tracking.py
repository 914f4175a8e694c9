"""search/tracking/ against a real `mlflow server` (the session fixture ``mlflow_server``).

The tracker is fed realistic trial results by a loop that calls it the way the tuner does
(start, per-epoch reports, end, front update); results are read back with MlflowClient and
checked against an independent Pareto computation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from search.errors import UserError
from search.tracking import (
    TAG_FAILURE,
    TAG_ON_FRONT,
    TAG_PARENT,
    TAG_RANK,
    TAG_ROLE,
    TAG_TRIAL_KEY,
    SearchTracker,
    check_reachable,
    client_for,
    close_recorded_trials,
    format_front,
    front_from_store,
    read_state,
    resolve_tracking_uri,
    serve_ui,
    sync_run_dir,
)
from trainables.accounting import count
from trainables.arch import ArchConfig, HeadLayer, StageConfig, StemConfig
from trainables.models import build_model

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

HERE = Path(__file__).resolve().parent
SPEC_YAML = "name: tiny\nobjectives: {val_accuracy: max, nonzero_params: min}\nconstraints: {max_params: 5000}\n"
EPOCHS = 3


def make_arch(i: int) -> ArchConfig:
    """The i-th of a family of tiny MNIST-like nets (1x8x8 inputs), all different."""
    return ArchConfig(
        in_channels=1, input_size=(8, 8),
        stem=StemConfig(width=4 + 2 * (i % 4)),
        stages=(StageConfig(block=("plain", "residual")[i % 2], width=4 + 4 * (i // 2)),),
        head=(HeadLayer(16, density=0.5),) if i % 3 == 0 else (),
    )


def final_metrics(i: int, arch: ArchConfig) -> dict[str, float]:
    """Accuracy grows with log(params), with a seeded wobble so some trials are dominated."""
    acc = count(arch)
    wobble = random.Random(i).uniform(-0.08, 0.08)
    val = min(0.99, 0.55 + 0.06 * math.log2(acc.nonzero_params / 100) + wobble)
    return {"epoch": EPOCHS, "val_accuracy": val, "val_loss": 1 - val, "train_loss": 1.1 - val,
            "nonzero_params": acc.nonzero_params, "macs": acc.macs, "fidelity": 1.0,
            "test_accuracy": val - 0.01, "train_seconds": 1.5 + i}


def make_tracker(server_url: str, run_dir: Path, experiment: str, **kw) -> SearchTracker:
    return SearchTracker(
        server_url, experiment, run_dir=run_dir, spec_dict=yaml.safe_load(SPEC_YAML),
        spec_yaml_text=SPEC_YAML, search_name="tiny", max_params_ref=5000, **kw)


def write_results(run_dir: Path, rows: list[dict]) -> None:
    """results.csv as search/results.py writes it: one row per ended trial."""
    pd.DataFrame(rows).to_csv(run_dir / "results.csv", index=False)


def drive(tracker: SearchTracker, run_dir: Path, keys: range, *, fail: set[int] = frozenset(),
          rows: list[dict] | None = None, go_offline_before_end: int | None = None) -> list[dict]:
    """Run trials like the tuner: start, one report per epoch, the run dir files, end, front."""
    rows = [] if rows is None else rows
    for i in keys:
        key, arch = f"t{i:03d}", make_arch(i)
        final = final_metrics(i, arch)
        trial_dir = run_dir / "trials" / key
        trial_dir.mkdir(parents=True, exist_ok=True)
        arch.dump(trial_dir / "arch.yaml")
        config = {**arch.to_flat(), "train/lr": 0.01}
        tracker.trial_started(key, arch, config)
        for epoch in range(1, EPOCHS + 1):
            report = {**final, "epoch": epoch, "val_accuracy": final["val_accuracy"] * epoch / EPOCHS}
            del report["test_accuracy"], report["train_seconds"]
            tracker.trial_result(key, {**report, "pid": 123, "time_this_iter_s": 0.1}, epoch)
        if i == go_offline_before_end:
            tracker.offline = True  # as after a failed call: the rest reaches only the files
        status, error, metrics = "TERMINATED", None, final
        if i in fail:
            status, metrics = "ERROR", {"epoch": 2}
            error = ('Traceback (most recent call last):\n  File "train.py", line 1\n'
                     f"RuntimeError: loss is NaN at epoch 2 (trial {key})\n")
        else:
            torch.save(build_model(arch).state_dict(), trial_dir / "model.pt")
            (trial_dir / "layers.json").write_text(json.dumps(count(arch).to_dict()))
        record = {"trial_key": key, "trial_id": f"id_{key}", "status": status, "error": error,
                  "arch": arch.canonical(), "metrics": metrics, "config": config}
        (trial_dir / "result.json").write_text(json.dumps(record))
        rows.append({**config, **metrics, **{k: v for k, v in record.items()
                                             if k not in ("metrics", "config")}})
        write_results(run_dir, rows)
        if i in fail:
            tracker.trial_finished(key, metrics, status="FAILED", error=error)
        else:
            tracker.trial_finished(key, final, layers=count(arch).to_dict(),
                                   model_path=trial_dir / "model.pt")
        df = pd.DataFrame(rows)
        ranked = tracker.rank(df)
        front = ranked.loc[ranked["pareto_rank"] == 0, "trial_key"].tolist()
        pd.DataFrame({"trial_key": front}).to_csv(run_dir / "pareto.csv", index=False)
        tracker.update_front(df, front, step=len(rows), counters={
            "trials_finished": len(rows), "trials_failed": sum(r["status"] == "ERROR" for r in rows),
            "proposals_rejected": 1})
    return rows


def brute_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """(accuracy, params) per key -> keys no other point dominates (max acc, min params)."""
    return {k for k, (a, p) in points.items()
            if not any(a2 >= a and p2 <= p and (a2, p2) != (a, p) for a2, p2 in points.values())}


def runs_of(client: MlflowClient, experiment: str) -> tuple[list, list]:
    eid = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([eid], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
    children = [r for r in runs if TAG_PARENT in r.data.tags]
    return parents, children


def test_a_search_is_one_parent_with_nested_children_and_a_tagged_front(mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    tracker = make_tracker(mlflow_server.url, run_dir, "recorded", front_interval_s=0).start()
    drive(tracker, run_dir, range(8), fail={5})
    arch_left = make_arch(8)  # started, never ended: the search is stopped under it
    tracker.trial_started("t008", arch_left, arch_left.to_flat())
    tracker.finish("FINISHED")

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("recorded")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parents, children = runs_of(client, "recorded")
    assert len(parents) == 1 and len(children) == 9
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert read_state(run_dir)["parent_run_id"] == parent.info.run_id
    assert parent.data.params["constraints/max_params"] == "5000"
    assert parent.data.tags["sparse_search.version.mlflow"] == "3.17.2"
    assert {c.data.tags[TAG_PARENT] for c in children} == {parent.info.run_id}
    by_key = {c.data.tags[TAG_TRIAL_KEY]: c for c in children}
    assert by_key["t003"].info.run_name == make_arch(3).canonical()
    assert by_key["t003"].data.params["train/lr"] == "0.01"
    assert by_key["t005"].info.status == "FAILED"
    assert by_key["t005"].data.tags[TAG_FAILURE] == "RuntimeError: loss is NaN at epoch 2 (trial t005)"
    assert by_key["t008"].info.status == "KILLED" and TAG_FAILURE in by_key["t008"].data.tags
    assert all(by_key[f"t{i:03d}"].info.status == "FINISHED" for i in (0, 1, 2, 3, 4, 6, 7))

    # one log_batch per report: every epoch's metrics at its step, Ray bookkeeping dropped
    history = client.get_metric_history(by_key["t002"].info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 3]  # 3 epochs + the final metrics
    assert "pid" not in by_key["t002"].data.metrics
    assert by_key["t002"].data.metrics["test_accuracy"] == pytest.approx(
        final_metrics(2, make_arch(2))["test_accuracy"])

    # on_front tags == an independent Pareto computation over the children's own metrics
    finished = {k: (c.data.metrics["val_accuracy"], c.data.metrics["nonzero_params"])
                for k, c in by_key.items() if c.info.status == "FINISHED"}
    expected = brute_front(finished)
    assert 1 <= len(expected) < len(finished)  # the data has dominated trials
    tagged = {k for k, c in by_key.items() if c.data.tags.get(TAG_ON_FRONT) == "true"}
    assert tagged == expected
    assert {k for k, c in by_key.items() if c.data.tags.get(TAG_RANK) == "0"} == expected
    assert all(by_key[k].data.tags[TAG_RANK] != "0" for k in set(finished) - expected)

    # parent metrics: one step per finished trial (failed ones count too: they end the trial)
    hv = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert sorted(m.step for m in hv) == list(range(1, 9))
    values = [m.value for m in sorted(hv, key=lambda m: m.step)]
    assert values == sorted(values) and 0 < values[-1] < 1
    assert parent.data.metrics["front_size"] == len(expected)
    assert parent.data.metrics["trials_failed"] == 1
    assert parent.data.metrics["proposals_rejected"] == 1

    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "spec_resolved.yaml", "pareto.csv", "pareto.png", "pareto.html"} <= artifacts
    local = Path(client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path)))
    assert set(pd.read_csv(local)["trial_key"]) == expected
    page = Path(client.download_artifacts(parent.info.run_id, "pareto.html", str(tmp_path))).read_text()
    for k in expected:
        assert f"#/experiments/{exp.experiment_id}/runs/{by_key[k].info.run_id}" in page
        assert by_key[k].info.run_name in page
    assert "<script src" not in page and "cdn" not in page.lower()
    png = Path(client.download_artifacts(parent.info.run_id, "pareto.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # weights only for front members; arch.yaml and layers.json for every finished trial
    for k, c in by_key.items():
        names = {f.path for f in client.list_artifacts(c.info.run_id)}
        assert ("model.pt" in names) == (k in expected), k
        if k in finished:
            assert {"arch.yaml", "layers.json"} <= names


def test_front_refresh_is_throttled_but_metrics_are_not(mlflow_server, tmp_path):
    tracker = make_tracker(mlflow_server.url, tmp_path / "run", "throttled",
                           front_interval_s=3600).start()
    drive(tracker, tmp_path / "run", range(3))
    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(tracker.parent_run_id)
    assert len(client.get_metric_history(parent.info.run_id, "hypervolume")) == 3
    _, children = runs_of(client, "throttled")
    # the first update pushed at once; the next two wait for the interval (or the end)
    assert sum(TAG_ON_FRONT in c.data.tags for c in children) == 1
    tracker.finish()
    _, children = runs_of(client, "throttled")
    assert all(TAG_ON_FRONT in c.data.tags for c in children)


def test_each_report_is_one_log_batch_call(mlflow_server, tmp_path):
    tracker = make_tracker(mlflow_server.url, tmp_path / "run", "batched").start()
    arch = make_arch(1)
    tracker.trial_started("k", arch, arch.to_flat())
    calls = []
    real = tracker.client.log_batch
    tracker.client.log_batch = lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    metrics = {f"metric_{j}": float(j) for j in range(23)}
    tracker.trial_result("k", metrics, 1)
    assert len(calls) == 1 and len(calls[0]["metrics"]) == 23
    tracker.finish()


def test_mlflow_gone_mid_search_warns_once_and_the_search_goes_on(mlflow_server, tmp_path, caplog):
    tracker = make_tracker(mlflow_server.url, tmp_path / "run", "vanishing").start()
    arch = make_arch(0)
    tracker.trial_started("k0", arch, arch.to_flat())
    tracker.client = client_for(f"http://127.0.0.1:{free_port()}")  # the server is gone
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sparse_search.tracking"):
        tracker.trial_result("k0", {"val_accuracy": 0.5}, 1)
        tracker.trial_finished("k0", {"val_accuracy": 0.5, "nonzero_params": 10})
        tracker.trial_started("k1", arch, arch.to_flat())
        tracker.update_front(pd.DataFrame([{"trial_key": "k0", "val_accuracy": 0.5,
                                            "nonzero_params": 10}]), step=1)
        tracker.finish()
    assert tracker.offline
    warnings = [r for r in caplog.records if r.name == "sparse_search.tracking"]
    assert len(warnings) == 1 and "sparse-search sync" in warnings[0].getMessage()
    assert time.monotonic() - start < 60  # bounded retries, not MLflow's ~2 min default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_user_error_before_anything_runs(monkeypatch, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=re.escape(dead) + ".*not reachable"):
        check_reachable(dead, timeout=2)
    from search.cli.commands import main

    monkeypatch.setattr(sys, "argv", ["sparse-search", "pareto", "--tracking-uri", dead])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: MLflow tracking server {dead} is not reachable")


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(None) == "http://example:5000"
    assert resolve_tracking_uri("http://cli:1") == "http://cli:1"
    with pytest.raises(UserError, match="does not exist"):
        check_reachable(f"sqlite:///{tmp_path}/missing/mlflow.db")


def test_local_sqlite_store_and_pareto_command(monkeypatch, tmp_path, capsys):
    """The default store (./mlflow.db, artifacts in ./mlruns) and `sparse-search pareto`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None)
    tracker = make_tracker(uri, tmp_path / "run", "local", front_interval_s=0).start()
    drive(tracker, tmp_path / "run", range(4))
    tracker.finish()
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlruns").is_dir()

    report = front_from_store(uri, "local")
    client = MlflowClient(uri)
    _, children = runs_of(client, "local")
    on_front = {c.info.run_id for c in children if c.data.tags[TAG_ON_FRONT] == "true"}
    assert {f["run_id"] for f in report["front"]} == on_front
    params = [f["nonzero_params"] for f in report["front"]]
    assert params == sorted(params)
    text = format_front(report)
    assert all(f["arch"] in text for f in report["front"])

    from search.cli.commands import main

    monkeypatch.setattr(sys, "argv", ["sparse-search", "pareto", "--json"])
    with pytest.raises(SystemExit) as exit_:  # main() exits with the command's code (7f94876)
        main()
    assert exit_.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parent_run_id"] == tracker.parent_run_id
    monkeypatch.setattr(sys, "argv", ["sparse-search", "pareto", "--experiment", "nope"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "'nope' does not exist" in capsys.readouterr().err


CRASH_DRIVER = """
import sys, time
sys.path.insert(0, {here!r})
from pathlib import Path
from test_tracking import drive, make_arch, make_tracker
url, run_dir, experiment = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
tracker = make_tracker(url, run_dir, experiment, front_interval_s=0).start()
rows = drive(tracker, run_dir, range(5), fail={{2}}, go_offline_before_end=4)
tracker.offline = False  # MLflow is back: the next trial starts in it...
arch = make_arch(5)
tracker.trial_started("t005", arch, arch.to_flat())
tracker.trial_result("t005", {{"val_accuracy": 0.3, "epoch": 1}}, 1)
print("READY", flush=True)
time.sleep(600)  # ...and the driver is SIGKILLed here, mid-trial
"""


def crash_a_driver(url: str, run_dir: Path, experiment: str) -> None:
    """Run CRASH_DRIVER and SIGKILL it mid-trial: t000-t004 recorded in run_dir (t004's end
    never reached MLflow), t005 RUNNING."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_DRIVER.format(here=str(HERE)), url, str(run_dir), experiment],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_driver_sync_then_resume_leaves_no_running_runs_and_no_duplicates(
        mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    crash_a_driver(mlflow_server.url, run_dir, "crashed")
    client = MlflowClient(mlflow_server.url)
    parents, children = runs_of(client, "crashed")
    assert parents[0].info.status == "RUNNING"
    by_key = {c.data.tags[TAG_TRIAL_KEY]: c for c in children}
    assert by_key["t004"].info.status == "RUNNING"  # its end never reached MLflow
    assert by_key["t005"].info.status == "RUNNING"
    hv_before = len(client.get_metric_history(parents[0].info.run_id, "hypervolume"))

    counts = sync_run_dir(run_dir)
    assert counts == {"trials": 5, "created": 0, "finalized": 1, "closed": 1}
    parents, children = runs_of(client, "crashed")
    assert len(parents) == 1 and len(children) == 6
    assert all(r.info.status != "RUNNING" for r in parents + children)
    assert parents[0].info.status == "KILLED"
    by_key = {c.data.tags[TAG_TRIAL_KEY]: c for c in children}
    assert by_key["t004"].info.status == "FINISHED"  # uploaded from trials/t004/result.json
    assert by_key["t004"].data.metrics["test_accuracy"] == pytest.approx(
        final_metrics(4, make_arch(4))["test_accuracy"])
    assert by_key["t005"].info.status == "KILLED" and TAG_FAILURE in by_key["t005"].data.tags
    assert by_key["t002"].info.status == "FAILED"
    finished = {k: (c.data.metrics["val_accuracy"], c.data.metrics["nonzero_params"])
                for k, c in by_key.items() if c.info.status == "FINISHED"}
    assert {k for k, c in by_key.items() if c.data.tags.get(TAG_ON_FRONT) == "true"} == brute_front(finished)
    hv = client.get_metric_history(parents[0].info.run_id, "hypervolume")
    assert len(hv) == hv_before + 1  # the finished trial the tracker missed

    snapshot = {c.info.run_id: len(client.get_metric_history(c.info.run_id, "val_accuracy"))
                for c in children}
    assert sync_run_dir(run_dir) == {"trials": 5, "created": 0, "finalized": 0, "closed": 0}
    parents, children = runs_of(client, "crashed")
    assert len(parents) == 1 and len(children) == 6
    assert {c.info.run_id: len(client.get_metric_history(c.info.run_id, "val_accuracy"))
            for c in children} == snapshot
    assert len(client.get_metric_history(parents[0].info.run_id, "hypervolume")) == len(hv)

    # resume: the same parent, the same children for the same keys, one new trial
    tracker = make_tracker(mlflow_server.url, run_dir, "crashed").start(resume=True)
    assert tracker.parent_run_id == parents[0].info.run_id
    assert tracker.trial_started("t005", make_arch(5), make_arch(5).to_flat()) == by_key["t005"].info.run_id
    assert client.get_run(by_key["t005"].info.run_id).info.status == "RUNNING"
    tracker.trial_finished("t005", final_metrics(5, make_arch(5)))
    drive(tracker, run_dir, range(6, 7))
    tracker.finish()
    parents, children = runs_of(client, "crashed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    keys = [c.data.tags[TAG_TRIAL_KEY] for c in children]
    assert sorted(keys) == [f"t{i:03d}" for i in range(7)]


def test_resume_without_sync_closes_what_the_killed_driver_recorded(mlflow_server, tmp_path):
    """`resume` (no `sync` first): a trial recorded in results.csv whose MLflow run the dead
    driver left open is not rerun, so the resume must close it from the run dir; were it left,
    the resumed search's finish would mark it KILLED."""
    run_dir = tmp_path / "run"
    crash_a_driver(mlflow_server.url, run_dir, "resumed-unsynced")
    client = MlflowClient(mlflow_server.url)
    tracker = make_tracker(mlflow_server.url, run_dir, "resumed-unsynced").start(resume=True)
    counts = close_recorded_trials(tracker, run_dir, pd.read_csv(run_dir / "results.csv"))
    assert counts == {"created": 0, "finalized": 1, "closed": 0}
    assert close_recorded_trials(tracker, run_dir, pd.read_csv(run_dir / "results.csv")) == {
        "created": 0, "finalized": 0, "closed": 0}
    tracker.finish()
    parents, children = runs_of(client, "resumed-unsynced")
    by_key = {c.data.tags[TAG_TRIAL_KEY]: c for c in children}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(by_key) == [f"t{i:03d}" for i in range(6)]
    assert by_key["t004"].info.status == "FINISHED"
    assert by_key["t004"].data.metrics["test_accuracy"] == pytest.approx(
        final_metrics(4, make_arch(4))["test_accuracy"])
    assert by_key["t002"].info.status == "FAILED"
    assert by_key["t005"].info.status == "KILLED"  # in flight, never recorded: not resumed here


def test_sync_creates_what_mlflow_never_saw(mlflow_server, tmp_path):
    """A search tracked offline from the start: sync builds the parent and children from files."""
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "spec.yaml").write_text(SPEC_YAML)
    tracker = make_tracker(mlflow_server.url, run_dir, "never-seen")
    drive(tracker, run_dir, range(3))  # never started: every call is a no-op
    (run_dir / "mlflow.json").write_text(json.dumps({"tracking_uri": mlflow_server.url,
                                                     "experiment": "never-seen"}))
    assert sync_run_dir(run_dir)["created"] == 3
    parents, children = runs_of(MlflowClient(mlflow_server.url), "never-seen")
    assert len(parents) == 1 and len(children) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    assert sync_run_dir(run_dir)["created"] == 0
    with pytest.raises(UserError, match="not a search run directory"):
        sync_run_dir(tmp_path)


def test_callback_records_a_real_ray_tune_run_and_pickles_without_its_client(
        mlflow_server, tmp_path):
    import ray
    from ray import tune

    from search.tracking import TrackingCallback

    run_dir = tmp_path / "run"
    tracker = make_tracker(mlflow_server.url, run_dir, "ray").start()
    # "done" was recorded before a resume: a rerun of it by Ray must not touch MLflow.
    callback = TrackingCallback(tracker, recorded=["done"])
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.tracker is tracker and clone._recorded == {"done"}  # the live one, by run dir

    def trainable(config: dict) -> None:
        if config["meta/trial_key"] == "bad":
            raise RuntimeError("diverged: loss is NaN")
        for epoch in (1, 2):
            tune.report({"epoch": epoch, "val_accuracy": 0.4 * epoch, "nonzero_params": 300.0})

    arch = make_arch(1)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        tune.Tuner(
            trainable,
            param_space={**arch.to_flat(),
                         "meta/trial_key": tune.grid_search(["good", "bad", "done"])},
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0,
                                      callbacks=[callback]),
        ).fit()
    finally:
        if started_here:
            ray.shutdown()
    tracker.finish()
    _, children = runs_of(MlflowClient(mlflow_server.url), "ray")
    by_key = {c.data.tags[TAG_TRIAL_KEY]: c for c in children}
    assert set(by_key) == {"good", "bad"}
    assert by_key["good"].info.status == "FINISHED"
    assert by_key["good"].info.run_name == arch.canonical()
    assert by_key["good"].data.metrics["val_accuracy"] == pytest.approx(0.8)
    assert by_key["bad"].info.status == "FAILED"
    assert "diverged: loss is NaN" in by_key["bad"].data.tags[TAG_FAILURE]


# TrackingCallback(tracker, recorded=["3"]) as ray.cloudpickle wrote it into tuner.pkl when
# search/tracking.py was one module (commit 3d4e07d): the class by reference,
# search.tracking.TrackingCallback, and only the tracker's constructor arguments.
OLD_CALLBACK_PICKLE = (
    "gAWVkwEAAAAAAACMD3NlYXJjaC50cmFja2luZ5SMEFRyYWNraW5nQ2FsbGJhY2uUk5QpgZR9lCiMBV9hcmdzlH2U"
    "KIwMdHJhY2tpbmdfdXJplIwYc3FsaXRlOi8vLy9vbGQvbWxmbG93LmRilIwKZXhwZXJpbWVudJSMA29sZJSMB3J1"
    "bl9kaXKUjAgvb2xkL3J1bpSMCXNwZWNfZGljdJR9lIwEbmFtZZRoCnOMDnNwZWNfeWFtbF90ZXh0lIwKbmFtZTog"
    "b2xkCpSMC3NlYXJjaF9uYW1llIwTb2xkLTIwMjQwMTAxLTAwMDAwMJSMCm9iamVjdGl2ZXOUfZQojAx2YWxfYWNj"
    "dXJhY3mUjANtYXiUjA5ub256ZXJvX3BhcmFtc5SMA21pbpR1jA5tYXhfcGFyYW1zX3JlZpROjBBmcm9udF9pbnRl"
    "cnZhbF9zlEdAPgAAAAAAAIwGdWlfdXJslIwVaHR0cDovLzEyNy4wLjAuMTo1MDAwlHWMCF90cmFja2VylE6MCV9y"
    "ZWNvcmRlZJQojAEzlJGUdWIu"
)


def test_a_tuner_pkl_callback_of_the_one_module_tracking_still_loads_and_pickles_the_same():
    """Old run dirs resume: the callback's pickled class path, search.tracking.TrackingCallback,
    loads in a fresh interpreter (the class is built on first use), and today's callback pickles
    to the very same bytes."""
    import base64
    import pickletools

    import ray.cloudpickle

    from search.tracking import SearchTracker, TrackingCallback

    old = base64.b64decode(OLD_CALLBACK_PICKLE)
    tracker = SearchTracker("sqlite:////old/mlflow.db", "old", run_dir="/old/run",
                            spec_dict={"name": "old"}, spec_yaml_text="name: old\n",
                            search_name="old-20240101-000000")
    new = ray.cloudpickle.dumps(TrackingCallback(tracker, recorded=["3"]))
    assert new == old
    names = [arg for op, arg, _ in pickletools.genops(new) if op.name == "SHORT_BINUNICODE"]
    assert names[:2] == ["search.tracking", "TrackingCallback"]  # by reference, not by value
    loader = (
        "import base64, pickle, sys\n"
        f"cb = pickle.loads(base64.b64decode({OLD_CALLBACK_PICKLE!r}))\n"
        "cls = type(cb)\n"
        "print(cls.__module__, cls.__qualname__, cb._args['run_dir'], sorted(cb._recorded),\n"
        "      cb._tracker, cls is sys.modules['search.tracking'].TrackingCallback)\n"
    )
    out = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.split() == ["search.tracking", "TrackingCallback", "/old/run", "['3']",
                                  "None", "True"]


def test_ui_serves_and_prints_the_runs_list(mlflow_server, tmp_path):
    import sigint  # here, not at the top: this module is imported by the killed drivers' script

    tracker = make_tracker(mlflow_server.url, tmp_path / "run", "ui-latest").start()
    tracker.finish()
    with pytest.raises(UserError, match="is not free"):
        serve_ui(port=int(mlflow_server.url.rsplit(":", 1)[1]),
                 backend_store_uri=mlflow_server.backend_store_uri, artifact_root=str(tmp_path))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "ui", "--port", str(port), "--backend-store-uri",
         mlflow_server.backend_store_uri, "--artifact-root", str(mlflow_server.artifact_root)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        preexec_fn=sigint.interactive)  # Ctrl-C must reach it, whatever this process ignores
    try:
        line = proc.stdout.readline()
        eid = MlflowClient(mlflow_server.url).get_experiment_by_name("ui-latest").experiment_id
        assert line.strip() == (f"MLflow UI: http://127.0.0.1:{port}/#/experiments/{eid}/runs"
                                "?workflowType=machine_learning")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        with socket.socket() as s:
            # the server went with it: nothing listens there. SO_REUSEADDR, because the health
            # check's connection may linger in TIME_WAIT on that port (Linux still refuses the
            # bind while a socket listens on it)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
