"""One search on Ray: check it (preflight), plan its resources, build or restore the Tune run
(tuner, searcher, multi-objective ASHA), run it in the driver, locally or as a Ray Job
(cluster), and say how it ended (outcome).

Imported lazily (``import search.run`` starts no Ray); the names Ray pickles are pinned here
(:mod:`search.pickled`).
"""

from __future__ import annotations

from trainables.lazy import lazy_attributes

_PUBLIC = {
    "run_search": "search.run.driver", "resume_search": "search.run.driver",
    "report": "search.run.driver", "SearchOutcome": "search.run.outcome",
    "MultiObjectiveASHA": "search.run.moasha",
    "ProposerSearcher": "search.run.searcher", "ForgetLostTrials": "search.run.searcher",
    "Background": "search.run.background", "InBackground": "search.run.background",
    "trial_name": "search.run.tuner", "FrontToTracker": "search.run.tuner",
    "submit": "search.run.cluster",
}
__all__ = sorted(_PUBLIC)


__getattr__ = lazy_attributes(__name__, _PUBLIC)
