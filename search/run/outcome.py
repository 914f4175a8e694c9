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
    location: str | None = None  # the run dir as users name it: its URI (search.rundir.storage)
    storage_error: str | None = None  # the run dir's URI missed files (they are in run_dir)

    @property
    def where(self) -> str:
        """The run dir to show and to give back to resume/sync: the URI, else the path."""
        return self.location or str(self.run_dir)
