"""The MLflow UI, rendered by headless Chromium, shows a recorded search.

Needs Debian's chromium (`apt-get update && apt-get install -y chromium`; `make test` installs
it when run as root). Without it this test fails rather than skips: the UI is part of the product.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from search.tracking import UI_QUERY, SearchTracker, run_url
from trainables.arch import ArchConfig, StageConfig, StemConfig

pytestmark = pytest.mark.browser  # headless Chromium against a real MLflow UI

CHROMIUM = Path("/usr/bin/chromium")


def render(url: str, out: Path) -> str:
    """The DOM after the page's scripts ran (15 s of virtual time); a screenshot beside it."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={out.parent / (out.name + '-profile')}",
             "--virtual-time-budget=15000", "--window-size=1400,900"]
    dom = subprocess.run([str(CHROMIUM), *flags, f"--screenshot={out}.png", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    assert out.with_suffix(".png").stat().st_size > 10_000  # a real page, not a blank one
    out.with_suffix(".html").write_text(dom)
    return dom


def test_runs_list_run_page_and_artifacts_render(mlflow_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with "
                    "`apt-get update && apt-get install -y chromium` (Debian)")
    tracker = SearchTracker(
        mlflow_server.url, "browser", run_dir=tmp_path / "run", spec_dict={"name": "browser"},
        spec_yaml_text="name: browser\n", search_name="browser-search", front_interval_s=0,
    ).start()
    names, rows = [], []
    for i, width in enumerate((4, 8, 16)):
        arch = ArchConfig(in_channels=1, input_size=(8, 8), stem=StemConfig(width=width),
                          stages=(StageConfig(width=width),))
        key = f"b{i}"
        tracker.trial_started(key, arch, arch.to_flat())
        final = {"val_accuracy": 0.6 + 0.1 * i, "nonzero_params": 100 * width}
        tracker.trial_finished(key, final)
        rows.append({"trial_key": key, **final})
        names.append(arch.canonical())
    tracker.update_front(pd.DataFrame(rows), step=3, final=True)
    tracker.finish()
    eid, pid = tracker.experiment_id, tracker.parent_run_id

    runs = render(run_url(mlflow_server.url, eid), tmp_path / "runs")
    assert "browser-search" in runs  # the parent; its children fold under it
    assert "Model training" in runs and "Runs" in runs

    parent = render(run_url(mlflow_server.url, eid, pid), tmp_path / "parent")
    assert "Child runs" in parent
    assert all(name in parent for name in names)

    artifacts = render(f"{mlflow_server.url}/#/experiments/{eid}/runs/{pid}/artifacts{UI_QUERY}",
                       tmp_path / "artifacts")
    for name in ("pareto.png", "pareto.html", "pareto.csv", "spec.yaml"):
        assert name in artifacts
