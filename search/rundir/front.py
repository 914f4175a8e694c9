"""`sparse-search pareto RUN_DIR`: the Pareto front a run directory recorded (its pareto.csv),
read from a local folder or a storage URI without MLflow and without copying the rest."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from search.rundir.layout import PARETO_FILE, SPEC_FILE
from search.rundir.storage import read_file


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


def read_objectives(run_dir: str | Path) -> list[str]:
    """The metrics the search optimised, from its spec.yaml (the front table shows them)."""
    import yaml

    from search.errors import UserError
    from search.schema import DEFAULT_OBJECTIVES

    try:
        spec = yaml.safe_load(read_file(run_dir, SPEC_FILE).decode()) or {}
    except (UserError, yaml.YAMLError, UnicodeDecodeError):  # no readable spec: the defaults
        spec = {}
    objectives = spec.get("objectives") if isinstance(spec, dict) else None
    return list(objectives) if isinstance(objectives, dict) else [m for m, _ in DEFAULT_OBJECTIVES]
