"""`sparse-search data ...` through typer's CliRunner and through run_cli in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from search.cli.data import data_app
from search.errors import UserError

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

ROOT = Path(__file__).resolve().parents[1]
# The app as search/cli.py registers it, run the way the console script runs it.
_MAIN = ("import typer; from search.cli.data import data_app; from search.cli.commands import run_cli; "
         "app = typer.Typer(add_completion=False); app.add_typer(data_app, name='data'); run_cli(app)")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPARSE_SEARCH_DATA", str(folder))
    monkeypatch.delenv("SPARSE_SEARCH_DATA_MIRROR", raising=False)
    return folder


def _npz(path: Path, n_train: int = 30, n_test: int = 10) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
             y_train=(np.arange(n_train) % 10).astype(np.uint8),
             x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
             y_test=(np.arange(n_test) % 10).astype(np.uint8))
    return path


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _MAIN, "data", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_path_list_import_with_cli_runner(tmp_path: Path, cache: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(data_app, ["path"])
    assert r.exit_code == 0 and r.output.strip() == str(cache)
    r = runner.invoke(data_app, ["list"])
    assert r.exit_code == 0 and r.output.startswith(f"cache {cache}\n(empty")
    r = runner.invoke(data_app, ["import", "fashion-mnist", str(_npz(tmp_path / "f.npz"))])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"fashion-mnist: wrote {cache / 'fashion-mnist.npz'} from {tmp_path / 'f.npz'} "
                               "(30 train, 10 test, ")
    r = runner.invoke(data_app, ["list"])
    lines = r.output.splitlines()
    assert lines[1].split() == ["name", "train", "test", "size", "file"]
    assert lines[2].split()[:3] == ["fashion-mnist", "30", "10"] and lines[2].endswith("fashion-mnist.npz")
    r = runner.invoke(data_app, ["list", "--json"])
    listed = json.loads(r.output)
    assert listed["cache_dir"] == str(cache)
    [entry] = listed["datasets"]
    assert entry["name"] == "fashion-mnist" and entry["n_train"] == 30
    assert entry["size_bytes"] == (cache / "fashion-mnist.npz").stat().st_size
    r = runner.invoke(data_app, ["fetch", "fashion-mnist"])  # already there: no network needed
    assert r.exit_code == 0 and "fashion-mnist: already cached at" in r.output and "--force" in r.output


def test_unknown_name_is_a_user_error(cache: Path) -> None:
    r = CliRunner().invoke(data_app, ["fetch", "svhn"])
    assert isinstance(r.exception, UserError)
    assert str(r.exception) == "unknown dataset 'svhn': expected one of mnist, fashion-mnist, cifar10, cifar100"


def test_run_cli_exit_codes(tmp_path: Path, cache: Path) -> None:
    env = {"SPARSE_SEARCH_DATA": str(cache), "SPARSE_SEARCH_DATA_MIRROR": "http://127.0.0.1:9"}
    ok = _run("import", "mnist", str(_npz(tmp_path / "m.npz")), env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"mnist: wrote {cache / 'mnist.npz'}")
    bad = _run("import", "svhn", str(tmp_path / "m.npz"), env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: unknown dataset 'svhn': expected one of mnist, fashion-mnist, cifar10, cifar100"
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    junk = _run("import", "cifar10", str(tmp_path / "junk.npz"), env=env)
    assert junk.returncode == 2 and junk.stderr.startswith(f"error: {tmp_path / 'junk.npz'}: not a readable .npz file")
    offline = _run("fetch", "cifar100", env=env)  # port 9 on loopback refuses: as offline
    assert offline.returncode == 2
    assert offline.stderr.startswith(f"error: could not fetch cifar100 into the dataset cache {cache} (")
    assert "sparse-search data import cifar100 FILE_OR_FOLDER" in offline.stderr
    assert "Traceback" not in offline.stderr + junk.stderr + bad.stderr


def test_module_imports_neither_torch_nor_numpy() -> None:
    code = "import sys, search.cli.data; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
