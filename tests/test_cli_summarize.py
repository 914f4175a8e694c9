from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from search.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
CNN704K = ROOT / "spaces" / "archs" / "cnn704k.yaml"

# Study 004, "Model 1" (/work/shared/seeds/004_fd3e47303aa58a77.txt): type, params, MACs, output size.
MODEL_1 = [
    ("Convolution", 896, 221184, (16, 16, 32)),
    ("Batch Norm", 128, 0, (16, 16, 32)),
    ("Convolution", 18496, 1179648, (8, 8, 64)),
    ("Batch Norm", 256, 0, (8, 8, 64)),
    ("Convolution", 73856, 1179648, (4, 4, 128)),
    ("Batch Norm", 512, 0, (4, 4, 128)),
    ("Convolution", 147584, 2359296, (4, 4, 128)),
    ("Batch Norm", 512, 0, (4, 4, 128)),
    ("Convolution", 147584, 2359296, (4, 4, 128)),
    ("Batch Norm", 512, 0, (4, 4, 128)),
    ("Convolution", 147584, 2359296, (4, 4, 128)),
    ("Batch Norm", 512, 0, (4, 4, 128)),
    ("Convolution", 147584, 2359296, (4, 4, 128)),
    ("Batch Norm", 512, 0, (4, 4, 128)),
    ("Max Pool", 0, 0, (1, 1, 128)),
    ("flatten", 0, 0, (128,)),
    ("Dense", 16512, 16384, (128,)),
    ("Batch Norm", 512, 0, (128,)),
    ("Dense", 1290, 1280, (10,)),
]


def run(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run the console entry point (``search.cli:main``) in-process; its exit code."""
    monkeypatch.setattr(sys, "argv", ["sparse-search", *args])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_summarize_json_matches_study_004_model_1(monkeypatch, capsys) -> None:
    assert run(monkeypatch, "summarize", str(CNN704K), "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["trainable_params"], d["bn_buffers"], d["macs"]) == (703114, 1728, 12035328)
    assert d["total_params"] == 704842 and d["nonzero_params"] == 703114 and d["frozen_params"] == 0
    rows = [(r["type"], r["params"], r["macs"], tuple(r["output_shape"])) for r in d["layers"]]
    assert rows == MODEL_1
    assert sum(r["params"] for r in d["layers"]) == 704842
    assert sum(r["macs"] for r in d["layers"]) == 12035328


def test_summarize_table(monkeypatch, capsys) -> None:
    assert run(monkeypatch, "summarize", str(CNN704K)) == 0
    out = capsys.readouterr().out
    assert "704,842" in out and "12,035,328" in out
    assert sum(" Convolution " in line for line in out.splitlines()) == 7


def test_summarize_bad_field_exits_2_with_the_field(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CNN704K.read_text().replace("block: plain, conv: standard, width: 64",
                                               "block: plian, conv: standard, width: 64"))
    assert run(monkeypatch, "summarize", str(bad)) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ")
    assert "bad.yaml: stages[0].block='plian' is invalid" in out.err
    assert "Traceback" not in out.err and out.out == ""


def test_summarize_missing_file_exits_2(monkeypatch, capsys, tmp_path: Path) -> None:
    assert run(monkeypatch, "summarize", str(tmp_path / "nope.yaml")) == 2
    assert "cannot read architecture file" in capsys.readouterr().err


def test_summarize_unbuildable_config_exits_2(monkeypatch, capsys, tmp_path: Path) -> None:
    path = tmp_path / "even.yaml"
    path.write_text("stages: [{block: plain, kernel: 4}]\n")
    assert run(monkeypatch, "summarize", str(path)) == 2
    assert "even.yaml: stages[0].kernel=4 is invalid: expected an odd kernel" in capsys.readouterr().err
