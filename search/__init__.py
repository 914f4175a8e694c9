"""sparse-search's service side: decides WHAT to try, runs the search, records it.

The data flow, one folder per step (docs/architecture.md draws it)::

    spaces/x.yaml --spec/--> SearchSpec --space/--> screened proposals --run/--> trials on Ray
    (trainables.trial) --rundir/--> run dir CSVs and front --tracking/--> MLflow
    (then finalize/ retrains the front; cli/ is the command line over all of them)

Top level keeps only the leaves every folder uses: :mod:`search.errors`, :mod:`search.schema`
and :mod:`search.pickled` (the module paths Ray's pickles name; importing ``search`` installs
the aliases of the old ones).

The public API is listed in ``__all__`` and imported lazily (``import search`` pulls in no
torch, Ray or MLflow): ``from search import run_search`` imports :mod:`search.run.driver` then.
"""

from __future__ import annotations

from search import pickled
from trainables.lazy import lazy_attributes

pickled.install()

# name -> the module that owns it (a folder's face, or the file: search.run.preflight is
# also a module's name)
_PUBLIC = {
    "run_search": "search.run.driver", "resume_search": "search.run.driver",
    "SearchOutcome": "search.run.outcome", "report": "search.run.driver",
    "preflight": "search.run.preflight",
    "load_spec": "search.spec", "parse_spec": "search.spec", "SearchSpec": "search.spec",
    "SpecError": "search.spec",
    "SearchSpace": "search.space", "Proposer": "search.space", "dry_run": "search.space",
    "UserError": "search.errors",
    "pareto_ranks": "search.rundir.pareto", "front_indices": "search.rundir.pareto",
    "hypervolume_2d": "search.rundir.pareto",
    "SearchTracker": "search.tracking", "sync_run_dir": "search.tracking",
    "front_from_store": "search.tracking",
    "export_run": "search.cli.export",
    "RunDir": "search.rundir",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
