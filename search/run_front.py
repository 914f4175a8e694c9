"""`sparse-search pareto RUN_DIR`: the Pareto front a run directory recorded (its pareto.csv),
read from a local folder or a storage URI without MLflow and without copying the rest."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from search.rundir import PARETO_FILE
from search.storage import read_file


def _value(v: str) -> Any:
    """A pareto.csv cell as the value it was: '' -> None, numbers, booleans, text."""
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def read_front(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir``'s pareto.csv (smallest model first, as the search wrote them)."""
    text = read_file(run_dir, PARETO_FILE).decode()
    return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
