"""search/export.py: a front member's model, fetched from a real MLflow server, round-trips
to state_dict, TorchScript and ONNX with the same outputs as the trained model."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from search.cli.export import export_run, rebuild
from search.errors import UserError
from search.tracking import SearchTracker
from trainables.arch import ArchConfig, HeadLayer, StageConfig, StemConfig
from trainables.models import build_model
from trainables.pruning import prune_step

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

ARCH = ArchConfig(
    in_channels=1, input_size=(12, 12),
    stem=StemConfig(width=6),
    stages=(StageConfig(block="residual", conv="separable", width=8),
            StageConfig(block="sparsenet", width=4, layers=3, downsample="maxpool")),
    head=(HeadLayer(16, density=0.5),),
)


def trained_pruned_model() -> torch.nn.Module:
    """A few SGD steps (BN running stats move), then one round of magnitude pruning."""
    torch.manual_seed(0)
    model = build_model(ARCH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    prune_step(model, rate=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def recorded(mlflow_server, tmp_path_factory):
    """A search of two trials in MLflow: 'front' (weights uploaded) and 'dominated' (none)."""
    run_dir = tmp_path_factory.mktemp("export_run")
    model = trained_pruned_model()
    torch.save(model.state_dict(), run_dir / "weights.pt")  # pruned: *_orig and *_mask keys
    tracker = SearchTracker(mlflow_server.url, "export", run_dir=run_dir, spec_dict={},
                            spec_yaml_text="", search_name="export", front_interval_s=0).start()
    rows = []
    for key, acc, params in (("front", 0.9, 500), ("dominated", 0.5, 900)):
        tracker.trial_started(key, ARCH, ARCH.to_flat())
        tracker.trial_finished(key, {"val_accuracy": acc, "nonzero_params": params},
                               model_path=run_dir / "weights.pt")
        rows.append({"trial_key": key, "val_accuracy": acc, "nonzero_params": params})
    tracker.update_front(pd.DataFrame(rows), step=2, final=True)
    tracker.finish()
    return mlflow_server.url, tracker._children, model


def test_rebuild_folds_pruning_masks_into_plain_weights(tmp_path):
    model = trained_pruned_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert any(k.endswith("weight_orig") for k in model.state_dict())
    rebuilt = rebuild(ARCH, tmp_path / "w.pt")
    assert not any(k.endswith(("_orig", "_mask")) for k in rebuilt.state_dict())
    zeros = sum(int((p == 0).sum()) for n, p in rebuilt.named_parameters() if n.endswith("weight"))
    assert zeros > 0  # the pruned weights are baked in as zeros
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "onnx"])
def test_export_matches_the_trained_model(recorded, fmt, tmp_path):
    uri, runs, model = recorded
    out = export_run(runs["front"], fmt=fmt, out=tmp_path / f"model.{fmt}", tracking_uri=uri)
    x = torch.randn(3, 1, 12, 12)  # another batch size than the export's example (2)
    with torch.no_grad():
        expected = model(x)
    if fmt == "state_dict":
        fresh = build_model(ARCH).eval()
        fresh.load_state_dict(torch.load(out, weights_only=True))
        with torch.no_grad():
            got = fresh(x)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated, still supported
            got = torch.jit.load(str(out))(x)
    else:
        proto = onnx.load(str(out))
        onnx.checker.check_model(proto, full_check=True)
        (got_np,) = ReferenceEvaluator(proto).run(None, {"images": x.numpy()})
        got = torch.from_numpy(np.asarray(got_np))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_export_errors_are_user_errors(recorded, tmp_path, monkeypatch, capsys):
    uri, runs, _ = recorded
    with pytest.raises(UserError, match="only Pareto-front members"):
        export_run(runs["dominated"], fmt="onnx", out=tmp_path / "m.onnx", tracking_uri=uri)
    with pytest.raises(UserError, match="not found"):
        export_run("0" * 32, fmt="onnx", out=tmp_path / "m.onnx", tracking_uri=uri)
    from search.cli.commands import main

    monkeypatch.setattr(sys, "argv", ["sparse-search", "export", runs["front"], "--format", "tflite",
                                      "-o", str(tmp_path / "m"), "--tracking-uri", uri])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "--format 'tflite' is invalid" in capsys.readouterr().err
    assert not Path(tmp_path / "m").exists()


DIGITS_ARCH = ArchConfig(in_channels=1, input_size=(8, 8), stem=StemConfig(width=6),
                         stages=(StageConfig(block="residual", width=8),), head=(HeadLayer(16, density=0.5),))
DIGITS = {"name": "digits", "path": None, "val_fraction": 0.2, "subset": None, "test_subset": None,
          "image_size": None, "seed": 0, "download": False, "num_classes": None}


@pytest.fixture(scope="module")
def recorded_digits(mlflow_server, tmp_path_factory):
    """A search on digits (spec_resolved.yaml has its data section), one front member."""
    from trainables.data import DataConfig, load_dataset
    from trainables.train import TrainConfig, fit

    run_dir = tmp_path_factory.mktemp("export_int8")
    torch.manual_seed(0)
    model = build_model(DIGITS_ARCH)
    fit(model, load_dataset(DataConfig(**DIGITS)), TrainConfig(epochs=20, threads=1), device="cpu")
    torch.save(model.state_dict(), run_dir / "weights.pt")
    tracker = SearchTracker(mlflow_server.url, "export-int8", run_dir=run_dir, spec_dict={"data": DIGITS},
                            spec_yaml_text="", search_name="export-int8", front_interval_s=0).start()
    tracker.trial_started("front", DIGITS_ARCH, DIGITS_ARCH.to_flat())
    tracker.trial_finished("front", {"val_accuracy": 0.9, "nonzero_params": 500},
                           model_path=run_dir / "weights.pt")
    tracker.update_front(pd.DataFrame([{"trial_key": "front", "val_accuracy": 0.9, "nonzero_params": 500}]),
                         step=1, final=True)
    tracker.finish()
    return mlflow_server.url, tracker._children["front"]


def test_export_onnx_int8_calibrates_on_the_recorded_dataset(recorded_digits, tmp_path):
    import json

    from trainables.accounting import count
    from trainables.deploy.quantize import onnx_weight_bytes

    uri, run_id = recorded_digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_run(run_id, fmt="onnx-int8", out=tmp_path / "m.int8.onnx", tracking_uri=uri)
    assert out == tmp_path / "m.int8.onnx" and (tmp_path / "m.int8.fp32.onnx").is_file()
    report = json.loads((tmp_path / "m.int8.onnx.json").read_text())
    assert report["split"] == "test" and report["calibration_images"] == 256
    assert report["accuracy_fp32"] > 0.5 and report["accuracy_drop"] < 0.05
    assert onnx_weight_bytes(out).weights == report["weight_bytes"] == count(DIGITS_ARCH).flash_bytes_dense
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QLinearConv" in ops and "QGemm" in ops


def test_export_onnx_int8_without_recorded_data_is_a_user_error(recorded, tmp_path):
    uri, runs, _ = recorded  # its search recorded no data section (spec_dict={})
    with pytest.raises(UserError, match="no data section"):
        export_run(runs["front"], fmt="onnx-int8", out=tmp_path / "m.onnx", tracking_uri=uri)
    from trainables.data import DataConfig

    with pytest.raises(UserError, match="does not match digits"):  # 12x12 arch, 8x8 digits
        export_run(runs["front"], fmt="onnx-int8", out=tmp_path / "m.onnx", tracking_uri=uri,
                   data=DataConfig(name="digits"))


def test_export_help_lists_every_format_it_accepts():
    from typer.testing import CliRunner

    from search.cli.commands import app
    from search.cli.export import FORMATS

    shown = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and " | ".join(FORMATS) in shown.output, shown.output
