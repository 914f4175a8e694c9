"""After a search: retrain its front at full fidelity over several seeds (retrain), within a
wall-time budget (budget), recorded in MLflow (record), printed as it trains (progress), and
the final front it writes and reads back (front).

Imported lazily (``import search.finalize`` trains nothing and imports no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "finalize_run": "search.finalize.retrain", "FinalizeOutcome": "search.finalize.retrain",
    "final_front": "search.finalize.front", "read_final_csv": "search.finalize.front",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'search.finalize' has no attribute {name!r}")
