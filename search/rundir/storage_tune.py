"""The Ray Tune side of a run dir on a URI (:mod:`search.rundir.storage`): push the local copy before
every experiment snapshot.

Tune calls every callback's ``get_state`` while it saves the experiment state, and uploads that
state to the URI only afterwards: pushing here means the URI never holds a snapshot newer than
the results, models and Optuna journal it goes with. Pickled into tuner.pkl: stays importable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback


class PushBeforeSnapshot(Callback):
    """Holds the local run dir only (the mirror is looked up, never pickled)."""

    def __init__(self, local: Path) -> None:
        self.local = Path(local)

    def get_state(self) -> dict[str, Any] | None:
        from search.rundir.storage import push_now

        push_now(self.local)
        return None


def snapshot_callbacks(run: Any) -> list[Callback]:
    """The callbacks ``run`` (a RunDir) needs: one for a run dir on a URI, none otherwise."""
    return [] if run.uri is None else [PushBeforeSnapshot(run.path)]
