"""Front members as MLflow 3 logged models, and a front picture per objective pair.

The suite's one finished `sparse-search run` (tests/conftest.py: digits, 3 objectives, a
sqlite store in tmp) feeds every test; logged models are read back with MlflowClient, their
ONNX files run in ONNX Runtime against the saved weights (loaded tensor-only), one is
registered, and `sparse-search sync` into the same store and into a fresh one creates each
member exactly once.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from search.tracking import (
    TAG_ON_FRONT,
    TAG_PARENT,
    TAG_ROLE,
    TAG_TRIAL_KEY,
    SearchTracker,
    objective_pairs,
    pair_file,
)
from search.tracking.models import MODEL_TYPE, TAG_ONNX_SOURCE, onnx_file_names
from trainables.arch import ArchConfig
from trainables.models import build_model

# The suite's finished search (a CLI search with Ray, tests/conftest.py), on its worker.
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("finished_search")]

OBJECTIVES = {"val_accuracy": "max", "nonzero_params": "min", "macs": "min"}  # its spec's
EXPERIMENT = "shared"  # its spec's name
ID_COLUMNS = {"trial_key", "trial_id", "model", "arch", "initial"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def searched(finished_search):
    """(run dir, tracking uri, the folder it ran in) of the suite's finished search
    (tests/conftest.py: digits, objectives val_accuracy, nonzero_params, macs)."""
    return finished_search.run_dir, finished_search.tracking_uri, finished_search.cwd


def _pareto(run_dir: Path) -> dict[str, dict[str, str]]:
    with (run_dir / "pareto.csv").open() as f:
        return {r["trial_key"]: r for r in csv.DictReader(f)}


def _models(client: MlflowClient, experiment: str) -> list:
    eid = client.get_experiment_by_name(experiment).experiment_id
    return list(client.search_logged_models([eid]))


def _children(client: MlflowClient, experiment: str) -> dict[str, str]:
    eid = client.get_experiment_by_name(experiment).experiment_id
    return {r.data.tags[TAG_TRIAL_KEY]: r.info.run_id for r in client.search_runs([eid])
            if r.data.tags.get(TAG_ROLE) == "trial"}


def _nothing_running(client: MlflowClient) -> None:
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id])
        assert {r.info.status for r in runs} <= {"FINISHED", "FAILED", "KILLED"}
    for exp in client.search_experiments():
        for m in client.search_logged_models([exp.experiment_id]):
            assert str(getattr(m.status, "value", m.status)) == "READY", m


def test_every_front_member_is_a_logged_model_with_its_metrics_and_run(searched):
    run_dir, uri, _ = searched
    client = MlflowClient(uri)
    pareto = _pareto(run_dir)
    everyone = _models(client, EXPERIMENT)
    # Trials finish in any order (two at once), so a trial can reach the front while it is
    # young and leave it later: its model stays, tagged on_front=false (models.py keeps it so a
    # registered version never loses its source). The members today are the on_front=true ones.
    models = [m for m in everyone if m.tags[TAG_ON_FRONT] == "true"]
    left = {m.tags[TAG_TRIAL_KEY] for m in everyone if m.tags[TAG_ON_FRONT] == "false"}
    assert sorted(m.tags[TAG_TRIAL_KEY] for m in models) == sorted(pareto)
    # every model is tagged true or false, and one per trial, never two
    assert len(everyone) == len(models) + len(left)
    assert not left & set(pareto)
    children = _children(client, EXPERIMENT)
    for m in models:
        key = m.tags[TAG_TRIAL_KEY]
        row = pareto[key]
        assert m.source_run_id == children[key]
        assert m.model_type == MODEL_TYPE
        assert m.params["arch"] == row["arch"] == ArchConfig.load(
            run_dir / "trials" / key / "arch.yaml").canonical()
        want = {k: float(v) for k, v in row.items() if k not in ID_COLUMNS and v != ""}
        assert {"val_accuracy", "test_accuracy", "nonzero_params", "macs"} <= set(want)
        assert {x.key: x.value for x in m.metrics} == pytest.approx(want, rel=1e-12)
        assert all(x.run_id == children[key] for x in m.metrics)
        # the child run lists it as an output, and its metric history got no extra entries:
        # each model metric is one the run logged (same timestamp, step and value)
        run = client.get_run(children[key])
        assert [o.model_id for o in run.outputs.model_outputs] == [m.model_id]
        for x in m.metrics:
            history = client.get_metric_history(children[key], x.key)
            assert (x.timestamp, x.step, x.value) in {(h.timestamp, h.step, h.value)
                                                      for h in history}, x
    _nothing_running(client)


def test_front_model_onnx_runs_and_matches_the_tensor_only_weights(searched, tmp_path):
    run_dir, uri, _ = searched
    import onnxruntime as ort

    client = MlflowClient(uri)
    fp32_name, int8_name = onnx_file_names()
    for m in _models(client, EXPERIMENT):
        key = m.tags[TAG_TRIAL_KEY]
        names = {a.path for a in client.list_logged_model_artifacts(m.model_id)}
        assert {"MLmodel", fp32_name, "model.pt", "arch.yaml"} <= names
        int8_here = (run_dir / "trials" / key / int8_name).is_file()
        assert (int8_name in names) == int8_here  # int8 exactly when the trial measured it
        # the trial's own fp32 file when it wrote one, else exported from its weights
        own = (run_dir / "trials" / key / fp32_name).is_file()
        assert m.tags[TAG_ONNX_SOURCE] == ("trial" if own else "exported")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=m.artifact_location,
                                                         dst_path=str(tmp_path / key)))
        arch = ArchConfig.load(local / "arch.yaml")
        net = build_model(arch)
        net.load_state_dict(torch.load(local / "model.pt", map_location="cpu", weights_only=True))
        x = torch.randn(3, arch.in_channels, *arch.input_size)
        with torch.no_grad():
            expected = net.eval()(x).numpy()
        sess = ort.InferenceSession(str(local / fp32_name), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == (3, arch.num_classes)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)  # BN folded: rounding
        if int8_here:
            q = ort.InferenceSession(str(local / int8_name), providers=["CPUExecutionProvider"])
            assert q.run(["logits"], {"images": x.numpy()})[0].shape == (3, arch.num_classes)
        # an MLflow model: pyfunc loads its folder and predicts
        pyfunc = mlflow.pyfunc.load_model(str(local))
        out = pyfunc.predict({"images": x.numpy()})
        np.testing.assert_allclose(np.asarray(out["logits"]), got, rtol=1e-6)


def test_a_front_model_registers_in_the_model_registry(searched, monkeypatch):
    _, uri, _ = searched
    client = MlflowClient(uri)
    m = _models(client, EXPERIMENT)[0]
    previous = mlflow.get_tracking_uri()
    # set_tracking_uri also sets $MLFLOW_TRACKING_URI: monkeypatch puts the variable back
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        version = mlflow.register_model(f"models:/{m.model_id}", "shared-front")
    finally:
        mlflow.set_tracking_uri(previous)
    got = client.get_model_version("shared-front", version.version)
    assert got.source == f"models:/{m.model_id}"
    assert got.run_id == m.source_run_id
    linked = json.loads(client.get_logged_model(m.model_id).tags["mlflow.modelVersions"])
    assert {"name": "shared-front", "version": version.version} in linked


def test_the_parent_run_has_a_front_picture_per_objective_pair(searched, tmp_path):
    _, uri, _ = searched
    client = MlflowClient(uri)
    eid = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = next(r for r in client.search_runs([eid])
                  if r.data.tags.get(TAG_ROLE) == "search")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    pairs = objective_pairs(OBJECTIVES)
    assert pairs == [("val_accuracy", "nonzero_params"), ("val_accuracy", "macs"),
                     ("nonzero_params", "macs")]
    wanted = {pair_file(y, x) for y, x in pairs}
    assert wanted == {n for n in names if n.startswith("pareto-")}
    assert {"pareto.png", "pareto.html", "pareto.csv"} <= names
    for name in wanted:
        png = Path(client.download_artifacts(parent.info.run_id, name, str(tmp_path)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_pareto_command_prints_the_objectives_in_the_specs_order(searched):
    _, uri, tmp = searched
    shown = _cli("pareto", "--tracking-uri", uri, cwd=tmp)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "objectives: val_accuracy (max), nonzero_params (min), macs (min)" in shown.stdout
    as_json = json.loads(_cli("pareto", "--json", "--tracking-uri", uri, cwd=tmp).stdout)
    assert as_json["objective_modes"] == OBJECTIVES


def test_sync_again_or_into_a_fresh_store_creates_each_member_once(searched, tmp_path):
    run_dir, uri, tmp = searched
    client = MlflowClient(uri)
    before = sorted((m.tags[TAG_TRIAL_KEY], m.model_id) for m in _models(client, EXPERIMENT))
    done = _cli("sync", str(run_dir), "--tracking-uri", uri, cwd=tmp)  # re-attached tracker
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted((m.tags[TAG_TRIAL_KEY], m.model_id) for m in _models(client, EXPERIMENT)) == before
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"  # a store that never saw the search
    for _ in range(2):
        done = _cli("sync", str(run_dir), "--tracking-uri", fresh, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    other = MlflowClient(fresh)
    models = _models(other, EXPERIMENT)
    # a fresh store learns the front from pareto.csv: today's members only, none that left it
    # during the search (those are only in the store that watched it live)
    assert sorted(m.tags[TAG_TRIAL_KEY] for m in models) == sorted(_pareto(run_dir))
    assert all(m.tags[TAG_ON_FRONT] == "true" for m in models)
    children = _children(other, EXPERIMENT)
    assert all(m.source_run_id == children[m.tags[TAG_TRIAL_KEY]] for m in models)
    _nothing_running(client)
    _nothing_running(other)


def test_a_member_that_leaves_the_front_is_kept_and_tagged_and_not_duplicated(searched, tmp_path):
    """The tracker driven directly on the search's real trials: front {a, b}, then {b}, then a
    re-attached tracker: a's model stays, tagged on_front=false; no second model of anyone."""
    src, _, _ = searched
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    (run_dir / "pareto.csv").unlink()  # the tracker's rows are the metrics now
    for onnx in (run_dir / "trials").glob("*/*.onnx"):  # as with train.int8_eval: false
        onnx.unlink()
    (run_dir / "mlflow.json").unlink(missing_ok=True)
    keys = sorted(p.name for p in (run_dir / "trials").iterdir() if (p / "model.pt").is_file())
    assert len(keys) >= 2
    a, b = keys[:2]
    rows = []
    for key in keys:
        rec = json.loads((run_dir / "trials" / key / "result.json").read_text())
        rows.append({"trial_key": key, **{k: rec["metrics"][k] for k in
                                          ("val_accuracy", "test_accuracy", "nonzero_params",
                                           "macs")}})
    import pandas as pd

    df = pd.DataFrame(rows)
    uri = f"sqlite:///{tmp_path / 'direct.db'}"

    def tracker() -> SearchTracker:
        return SearchTracker(uri, "direct", run_dir=run_dir, spec_dict={"name": "direct"},
                             spec_yaml_text="name: direct\n", search_name="direct",
                             objectives=OBJECTIVES, front_interval_s=0.0, strict=True)

    t = tracker().start()
    for key in keys:
        arch = ArchConfig.load(run_dir / "trials" / key / "arch.yaml")
        t.ensure_child(key, arch, arch.to_flat())
        metrics = {**df.set_index("trial_key").loc[key].to_dict(), "epoch": 2}
        t.trial_finished(key, metrics, model_path=run_dir / "trials" / key / "model.pt",
                         arch=arch)
    client = MlflowClient(uri)
    # a's model as a driver killed mid-upload leaves it: PENDING, no artifacts, no metrics
    pending = client.create_logged_model(t.experiment_id, source_run_id=t.child_run_id(a),
                                         tags={TAG_PARENT: t.parent_run_id, TAG_TRIAL_KEY: a})
    t.update_front(df, [a, b], final=True)
    first = {m.tags[TAG_TRIAL_KEY]: m for m in _models(client, "direct")}
    assert sorted(first) == [a, b]
    assert first[a].model_id == pending.model_id  # completed, not duplicated
    assert first[a].tags[TAG_PARENT] == t.parent_run_id
    want = df.set_index("trial_key").loc[a].to_dict()
    assert {x.key: x.value for x in first[a].metrics} == pytest.approx(want)
    # no ONNX in the run dir: the fp32 one is exported from the weights, int8 left out
    fp32_name, int8_name = onnx_file_names()
    names = {f.path for f in client.list_logged_model_artifacts(first[a].model_id)}
    assert fp32_name in names and int8_name not in names
    assert first[a].tags[TAG_ONNX_SOURCE] == "exported"
    t.update_front(df, [b], final=True)
    t.finish()
    again = tracker().start(resume=True)
    assert again.parent_run_id == t.parent_run_id
    again.update_front(df, [b], final=True)
    again.finish()
    after = {m.tags[TAG_TRIAL_KEY]: m for m in _models(client, "direct")}
    assert {k: m.model_id for k, m in after.items()} == {k: m.model_id for k, m in first.items()}
    assert (after[a].tags[TAG_ON_FRONT], after[b].tags[TAG_ON_FRONT]) == ("false", "true")
    assert all(math.isfinite(x.value) for x in after[a].metrics)
    _nothing_running(client)


def test_objective_pairs_put_the_maximised_metric_up_and_keep_the_specs_order(tmp_path):
    import pandas as pd

    from search.tracking import render_png

    mixed = {"flash_bytes": "min", "int8_accuracy": "max", "sram_bytes": "min"}
    assert objective_pairs(mixed) == [("int8_accuracy", "flash_bytes"),
                                      ("flash_bytes", "sram_bytes"),
                                      ("int8_accuracy", "sram_bytes")]
    assert objective_pairs({"val_accuracy": "max", "int8_accuracy": "max"}) == [
        ("val_accuracy", "int8_accuracy")]
    assert pair_file("int8_accuracy", "flash_bytes") == "pareto-int8_accuracy-vs-flash_bytes.png"
    table = pd.DataFrame({"val_accuracy": [0.5, 0.7, 0.6], "int8_accuracy": [0.6, 0.4, 0.5],
                          "on_front": [True, True, False], "pareto_rank": [0, 0, 1],
                          "arch": ["a", "b", "c"], "trial_key": ["0", "1", "2"]})
    out = tmp_path / "p.png"  # a max-max pair: linear x, a "pre" staircase; must not fail
    render_png(table, out, objectives={"val_accuracy": "max", "int8_accuracy": "max"},
               title="t", axes=("val_accuracy", "int8_accuracy"))
    assert out.read_bytes()[:4] == b"\x89PNG"
