"""What a search returns to its caller: a leaf module, so the driver (which reports it) and
the tuner (which builds it) both import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SearchOutcome"]


@dataclass(frozen=True)
class SearchOutcome:
    """What a finished (or interrupted) search returns; ``summary`` is the --json object."""

    run_dir: Path
    complete: bool  # every trial the spec asked for finished (False: interrupted, resume it)
    summary: dict[str, Any]
    front_table: str
    mlflow_note: str | None = None  # where to read the search in MLflow (None: --no-mlflow)
    tracking_error: str | None = None  # MLflow tracking failed (the search went on without it)
