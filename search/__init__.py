"""sparse-search's service side: decides WHAT to try, runs the search, records it.

The data flow, with the module that owns each step (docs/architecture.md draws it)::

    spaces/x.yaml --spec--> SearchSpec --space--> proposals (budget screen) --searcher/tuner-->
    trials on Ray (trainables.trial) --results--> run dir CSVs --tracking--> MLflow

The public API is listed in ``__all__`` and imported lazily (``import search`` pulls in no
torch, Ray or MLflow): ``from search import run_search`` imports :mod:`search.driver` then.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that owns it
_PUBLIC = {
    "run_search": "search.driver", "resume_search": "search.driver",
    "SearchOutcome": "search.outcome", "report": "search.driver",
    "preflight": "search.preflight",
    "load_spec": "search.spec", "parse_spec": "search.spec", "SearchSpec": "search.spec",
    "SpecError": "search.spec",
    "SearchSpace": "search.space", "Proposer": "search.space", "dry_run": "search.space",
    "UserError": "search.errors",
    "pareto_ranks": "search.pareto", "front_indices": "search.pareto",
    "hypervolume_2d": "search.pareto",
    "SearchTracker": "search.tracking", "sync_run_dir": "search.tracking",
    "front_from_store": "search.tracking",
    "export_run": "search.export",
    "RunDir": "search.rundir",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
