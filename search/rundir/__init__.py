"""What a search leaves behind, and reads back to report and resume: the run dir's layout
(:class:`RunDir`), where it lives (a folder or a URI: storage), its one owner (owner), the
trial records and their Pareto front (results, pareto, front) and the progress it prints.

Imported lazily; the names Ray pickles are pinned here (:mod:`search.pickled`).
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "RunDir": "search.rundir.layout", "Recorder": "search.rundir.results",
    "ProgressCallback": "search.rundir.progress",
    "pareto_ranks": "search.rundir.pareto", "front_indices": "search.rundir.pareto",
    "hypervolume_2d": "search.rundir.pareto",
    "read_front": "search.rundir.front", "own_run": "search.rundir.owner",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'search.rundir' has no attribute {name!r}")
