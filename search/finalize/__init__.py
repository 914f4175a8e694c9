"""After a search: retrain its front at full fidelity over several seeds (retrain), within a
wall-time budget (budget), recorded in MLflow (record), printed as it trains (progress), and
the final front it writes and reads back (front).

Imported lazily (``import search.finalize`` trains nothing and imports no torch).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

_PUBLIC = {
    "finalize_run": "search.finalize.retrain", "FinalizeOutcome": "search.finalize.retrain",
    "final_front": "search.finalize.front", "read_final_csv": "search.finalize.front",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
