"""What a search leaves behind, and reads back to report and resume: the run dir's layout
(:class:`RunDir`), where it lives (a folder or a URI: storage), its one owner (owner), the
trial records and their Pareto front (results, pareto, front) and the progress it prints.

Imported lazily; the names Ray pickles are pinned here (:mod:`search.pickled`).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

_PUBLIC = {
    "RunDir": "search.rundir.layout", "Recorder": "search.rundir.results",
    "ProgressCallback": "search.rundir.progress",
    "pareto_ranks": "search.rundir.pareto", "front_indices": "search.rundir.pareto",
    "hypervolume_2d": "search.rundir.pareto",
    "read_front": "search.rundir.front", "own_run": "search.rundir.owner",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
