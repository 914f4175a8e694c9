"""The paths Ray's pickles name: declared, pinned, and the old ones resolved.

Ray Tune pickles the searcher, the scheduler, the callbacks, the space and the spec into a
run dir (``ray/tuner.pkl``, the experiment snapshots) by module path, so a module path of a
pickled class is an on-disk format: a run dir written by an earlier version must resume.

- :func:`public` pins a pickled class (or function) to its folder's public path
  (``search.run.MultiObjectiveASHA``, not ``search.run.moasha.MultiObjectiveASHA``), as
  numpy's ``set_module`` does: a later move inside the folder changes no pickle.
- :data:`ALIASES` is the one table of module paths earlier versions pickled (commit 0421630's
  and cfb4fc4's flat ``search/``) and where they live now; :func:`install` (``import search``
  runs it) makes each importable under its old name, as an alias of the new module.

``tests/search/test_pickled.py`` lists the project globals a fresh ``tuner.pkl`` names against
an allowlist; ``tests/search/test_old_rundir.py`` resumes run dirs of both earlier versions.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

T = TypeVar("T", bound=Callable)

# old module path -> the module it is now (the flat search/ of 45 modules, until cfb4fc4)
ALIASES = {
    "search.spec_model": "search.spec.model", "search.spec_parse": "search.spec.parse",
    "search.spec_reader": "search.spec.reader", "search.spec_arch": "search.spec.arch",
    "search.dims": "search.spec.dims",
    "search.searchspace": "search.space.searchspace", "search.suggest": "search.space.suggest",
    "search.initial": "search.space.searchspace", "search.screen": "search.space.screen",
    "search.latency_screen": "search.space.latency", "search.proposer": "search.space.proposer",
    "search.bands": "search.space.bands", "search.dry_run": "search.space.preview",
    "search.driver": "search.run.driver", "search.preflight": "search.run.preflight",
    "search.resources": "search.run.resources", "search.tuner": "search.run.tuner",
    "search.searcher": "search.run.searcher", "search.moasha": "search.run.moasha",
    "search.ray_runtime": "search.run.ray_runtime", "search.ray_compat": "search.run.ray_compat",
    "search.background": "search.run.background", "search.interrupt": "search.run.interrupt",
    "search.outcome": "search.run.outcome", "search.cluster": "search.run.cluster",
    "search.storage": "search.rundir.storage", "search.storage_tune": "search.rundir.storage_tune",
    "search.results": "search.rundir.results", "search.pareto": "search.rundir.pareto",
    "search.progress": "search.rundir.progress", "search.run_front": "search.rundir.front",
    "search.owner": "search.rundir.owner",
    "search.finalize_budget": "search.finalize.budget", "search.finalize_mlflow": "search.finalize.record",
    "search.finalize_progress": "search.finalize.progress",
    "search.final_front": "search.finalize.front",
    "search.cli_data": "search.cli.data", "search.export": "search.cli.export",
    # search.rundir, search.spec, search.space, search.finalize and search.cli were modules and
    # are folders now: their faces export what was pickled under them (RunDir, SearchSpec, ...)
}


def public(module: str) -> Callable[[T], T]:
    """Pin a class or function to ``module``, its folder's public face (which must export it
    under the same name): pickles name that path whatever file defines it."""
    def pin(obj: T) -> T:
        obj.__module__ = module
        return obj
    return pin


class _Aliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path of :data:`ALIASES` as the module it is now (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(ALIASES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its own name


def install() -> None:
    """Resolve the old paths from now on in this process (once; ``import search`` calls it)."""
    if not any(isinstance(f, _Aliases) for f in sys.meta_path):
        sys.meta_path.append(_Aliases())
