"""Latency as a budget screen: measured, not modelled, before anything trains.

When a spec uses latency (``constraints.max_latency_ms`` set, or ``latency_ms`` an objective),
:class:`search.space.proposer.Proposer` hands every proposal that passed the shape-only screens
(params, MACs, flash, SRAM) and is not a repeat to :meth:`LatencyScreen.screen`: the untrained
network is exported to ONNX and timed with ONNX Runtime at batch 1 on one thread
(:func:`trainables.deploy.latency.measure_latency`: warm-up, median of repeated samples). A proposal
over ``max_latency_ms`` is refused like one over ``max_params`` (told to Optuna with the
constraint ``max_latency_ms``, never trained); one within it carries its figure in its config
(``latency_ms``, and ``latency/cpu``, ``latency/onnxruntime``: what measured it), so
results.csv has a ``latency_ms`` column, MLflow a param, and the child run the CPU and runtime
as tags (:func:`latency_tags`). A spec without latency costs nothing: no screen is made.

**Which machine.** The screen runs in the driver, so the figure is the driver machine's CPU,
not the CPU of the node that later trains the trial: it must be known before training (an
over-budget network is never trained) and it must be the same machine for every proposal of a
search (one budget, one yardstick). Run the driver on the kind of CPU you deploy to, or read
the figure as a relative one.

**Caches.** Each figure is kept twice: in the run directory (``latency/<arch key>.json``, so a
resumed search never times an architecture again, on whatever machine it resumes) and in the
user's cache (:func:`trainables.deploy.latency.default_cache_dir`, keyed by CPU model and runtime
version, shared by every search on this machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.schema import LATENCY_CPU, LATENCY_ORT, METRICS, TAG_LATENCY_CPU, TAG_ONNXRUNTIME

if TYPE_CHECKING:
    from search.space.searchspace import Proposal
    from search.spec.model import SearchSpec
    from trainables.arch import ArchConfig
    from trainables.deploy.latency import Latency

__all__ = [
    "LATENCY_DIR",
    "LATENCY_MS",
    "LatencyScreen",
    "latency_tags",
    "uses_latency",
]

log = logging.getLogger("sparse_search.latency")

LATENCY_MS = "latency_ms"  # the metric (search/schema.py) and the config key carrying it
BUDGET = METRICS[LATENCY_MS].budget  # max_latency_ms
LATENCY_DIR = "latency"  # run-dir folder, next to optuna.journal: one JSON per architecture


def uses_latency(spec: SearchSpec) -> bool:
    """Whether the spec budgets or optimises latency (else nothing is ever timed)."""
    return (getattr(spec.constraints, BUDGET) is not None
            or any(o.metric == LATENCY_MS for o in spec.objectives))


def latency_tags(flat_config: Mapping[str, Any]) -> dict[str, str]:
    """The MLflow tags of a trial whose config carries a latency: which CPU and runtime."""
    if LATENCY_MS not in flat_config:
        return {}
    return {TAG_LATENCY_CPU: str(flat_config.get(LATENCY_CPU, "")),
            TAG_ONNXRUNTIME: str(flat_config.get(LATENCY_ORT, ""))}


class LatencyScreen:
    """Times proposals in the driver (see the module docstring). Plain data: picklable."""

    def __init__(self, limit_ms: float | None, *, run_cache: str | Path | None = None,
                 user_cache: str | Path | None = None) -> None:
        if limit_ms is not None and not limit_ms > 0:
            raise ValueError(f"{limit_ms=} must be > 0 (milliseconds) or None")
        self.limit_ms = limit_ms
        self.run_cache = None if run_cache is None else Path(run_cache)
        self.user_cache = None if user_cache is None else Path(user_cache)  # None: the default
        self.measured = 0  # timed now (neither cache had it)
        self.run_hits = 0  # found in the run dir (a resumed search)
        self.user_hits = 0  # found in the user's cache
        self.over = 0  # proposals refused for latency

    @classmethod
    def for_spec(cls, spec: SearchSpec, storage: str | Path | None) -> LatencyScreen | None:
        """The screen of a spec that uses latency, its run cache beside the journal ``storage``
        (None: a dry run, the user's cache only); None for a spec without latency."""
        if not uses_latency(spec):
            return None
        run_cache = None if storage is None else Path(storage).parent / LATENCY_DIR
        return cls(getattr(spec.constraints, BUDGET), run_cache=run_cache)

    def latency(self, arch: ArchConfig) -> Latency:
        """The architecture's latency: the run dir's figure, else the user cache's, else timed."""
        from trainables.deploy.latency import Latency, measure_latency

        own = None if self.run_cache is None else self.run_cache / f"{arch.key()}.json"
        if own is not None and own.is_file():
            try:
                found = Latency(**{**json.loads(own.read_text()), "cached": True})
                self.run_hits += 1
                return found
            except (ValueError, TypeError):
                log.warning("latency record %s unreadable: timing again", own)
        lat = measure_latency(arch, cache_dir=self.user_cache)
        if lat.cached:
            self.user_hits += 1
        else:
            self.measured += 1
        if own is not None:
            own.parent.mkdir(parents=True, exist_ok=True)
            tmp = own.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: v for k, v in lat.to_dict().items() if k != "cached"},
                                      indent=1))
            tmp.replace(own)  # atomic: a killed driver leaves no half record
        return lat

    def screen(self, proposal: Proposal) -> Proposal:
        """``proposal`` with its latency in its config and, with a budget, its violation."""
        assert proposal.arch is not None
        try:
            lat = self.latency(proposal.arch)
        except Exception as e:  # an export ONNX cannot take: the proposal cannot be timed
            log.warning("latency of %s not measured: %s", proposal.arch.canonical(), e)
            return dataclasses.replace(proposal, feasible=False,
                                       violations={**proposal.violations, "valid": 1.0},
                                       error=f"latency not measured: {type(e).__name__}: {e}")
        config = {**proposal.config, LATENCY_MS: round(lat.median_ms, 4),
                  LATENCY_CPU: lat.cpu, LATENCY_ORT: lat.onnxruntime}
        violations = dict(proposal.violations)
        if self.limit_ms is not None:
            violations[BUDGET] = lat.median_ms - self.limit_ms
        feasible = proposal.feasible and violations.get(BUDGET, 0.0) <= 0
        self.over += not feasible
        return dataclasses.replace(proposal, config=config, violations=violations,
                                   feasible=feasible)

    def constraint_values(self, proposal: Proposal) -> dict[str, float]:
        """Optuna's constraint for the latency budget, relative to it (<= 0 feasible)."""
        v = proposal.violations.get(BUDGET)
        return {} if v is None or self.limit_ms is None else {BUDGET: v / self.limit_ms}

    def counts(self) -> dict[str, int]:
        return {"measured": self.measured, "run_cache_hits": self.run_hits,
                "user_cache_hits": self.user_hits, "over_budget": self.over}
