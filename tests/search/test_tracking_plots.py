"""search/tracking/plots.py: the front files when the front is empty."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def test_an_empty_front_writes_its_files(tmp_path: Path) -> None:
    # A search stopped before any trial finished: the front files are written, empty.
    from search.tracking.plots import front_table, write_front_files

    objectives = {"val_accuracy": "max", "nonzero_params": "min"}
    empty = pd.DataFrame(columns=["trial_key", "pareto_rank", "val_accuracy", "nonzero_params"])
    table = front_table(empty, set(), objectives=objectives, names={}, run_ids={}, ui_url="",
                        experiment_id=None)
    files = write_front_files(table, tmp_path, objectives=objectives, title="empty")
    assert all(p.is_file() for p in files)
    assert pd.read_csv(files[0]).empty
