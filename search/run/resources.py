"""Per-trial resources against what the cluster has, checked before anything starts.

A trial that no node can ever hold would wait forever (Ray only warns every 60 s), so the
search compares the spec's ``resources`` with the nodes first:

- a local search: this machine (the CPUs this process may use, cgroup quota included, and the
  GPUs CUDA sees), without starting Ray;
- ``--address``: every alive node of the cluster (``ray.nodes()``), after attaching.

``resources: auto`` plans the trial from those nodes: GPU trials at the spec's GPU share (and
up to its CPUs per trial, never more than a GPU node can give each of its trials) where a node
has GPUs; otherwise CPU-only trials that share the CPUs among ``max_concurrent`` trials. The
plan is one line printed at start. On an autoscaling cluster (Ray's cluster launcher leaves
``~/ray_bootstrap_config.yaml`` on the head, as Ray Tune checks; an autoscaler's status in the
GCS does not tell, since every ``ray start --head`` runs a read-only one) a trial no node holds
yet is not refused: nodes may come; the wait is reported in one line instead of Ray's repeated
warning. Under a time budget
no more trials are handed out than can run at once (:meth:`TrialPlan.outstanding`): one that
waited for a slot would start after the budget last checked it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from search.errors import UserError

if TYPE_CHECKING:
    from search.spec import Resources

AUTOSCALER_BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")  # as ray.tune's cluster_info checks


@dataclass(frozen=True)
class Node:
    """What one node offers (Ray's resource names: CPU, GPU, custom ones)."""

    name: str  # node id (short) or "this machine"
    cpu: float
    gpu: float
    custom: Mapping[str, float] = field(default_factory=dict)

    def holds(self, cpu: float, gpu: float, custom: Mapping[str, float]) -> bool:
        return (self.cpu >= cpu and self.gpu >= gpu
                and all(self.custom.get(k, 0.0) >= v for k, v in custom.items()))

    def slots(self, cpu: float, gpu: float, custom: Mapping[str, float]) -> int:
        """How many such trials fit at once."""
        ratios = [self.cpu / cpu if cpu > 0 else math.inf]
        if gpu > 0:
            ratios.append(self.gpu / gpu)
        ratios += [self.custom.get(k, 0.0) / v for k, v in custom.items()]
        return math.floor(min(ratios) + 1e-9)

    def describe(self) -> str:
        extra = "".join(f", {v:g} {k}" for k, v in sorted(self.custom.items()))
        return f"{_count(self.cpu, 'CPU')}, {_count(self.gpu, 'GPU')}{extra}"


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    where: str  # "this machine" or "the cluster at ADDRESS"
    autoscaling: bool = False

    def describe(self) -> str:
        if len(self.nodes) == 1:
            return f"{self.where}: {self.nodes[0].describe()}"
        cpu = sum(n.cpu for n in self.nodes)
        gpu = sum(n.gpu for n in self.nodes)
        per = "; ".join(f"{n.name}: {n.describe()}" for n in self.nodes)
        return (f"{self.where}: {len(self.nodes)} nodes, {_count(cpu, 'CPU')}, "
                f"{_count(gpu, 'GPU')} in all ({per})")


@dataclass(frozen=True)
class TrialPlan:
    """The resources each trial gets, and the line that says so at start."""

    cpu: float
    gpu: float
    custom: Mapping[str, float]
    concurrent: int  # trials that can run at once on the cluster (before max_concurrent)
    line: str
    grows: bool = False  # an autoscaling cluster: ``concurrent`` is what fits now, not at most

    def outstanding(self, max_concurrent: int, *, time_budget: float | None) -> int:
        """How many trials may be handed out and not yet finished: ``max_concurrent``, but
        under a time budget no more than can run at once on a cluster that cannot grow. A
        trial handed out beyond that waits for a slot and starts when one frees, after the
        budget checked it (seen: two 85-min trials of a 165-min budget started at minute 85).
        """
        if time_budget is None or self.grows or self.concurrent < 1:
            return max_concurrent
        return max(1, min(max_concurrent, self.concurrent))

    def bundle(self) -> dict[str, float]:
        """One placement-group bundle in Ray's resource names."""
        return {"CPU": self.cpu, "GPU": self.gpu, **self.custom}


def _count(v: float, unit: str) -> str:
    n = f"{v:g}"
    return f"no {unit}" if v == 0 else f"{n} {unit}{'' if v == 1 else 's'}"


# ---------------------------------------------------------------------- what there is
def local_cluster() -> Cluster:
    """This machine as a local Ray would see it, without starting Ray."""
    return Cluster((Node("this machine", float(local_cpus()), float(local_gpus())),),
                   where="this machine")


def local_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (as Ray)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def local_gpus() -> int:
    """GPUs CUDA can see ($CUDA_VISIBLE_DEVICES respected); 0 without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return 0
    import torch  # already imported by the spec's network checks

    try:
        return int(torch.cuda.device_count())
    except RuntimeError:
        return 0


def ray_cluster(address: str) -> Cluster:
    """The alive nodes of the Ray cluster this process is attached to."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = dict(n.get("Resources", {}))
        custom = {k: float(v) for k, v in res.items()
                  if k not in ("CPU", "GPU", "memory", "object_store_memory")
                  and not k.startswith(("node:", "accelerator_type:"))}
        nodes.append(Node(str(n.get("NodeID", "?"))[:8], float(res.get("CPU", 0.0)),
                          float(res.get("GPU", 0.0)), custom))
    autoscaling = AUTOSCALER_BOOTSTRAP.expanduser().exists()
    return Cluster(tuple(nodes), where=f"the cluster at {address}", autoscaling=autoscaling)


# ---------------------------------------------------------------------- the plan
def plan(res: Resources, cluster: Cluster, *, max_concurrent: int, source: str) -> TrialPlan:
    """Check (or, for ``auto``, choose) what each trial gets; a UserError when no node of a
    cluster that cannot grow could ever hold one trial."""
    custom = dict(res.custom)
    if res.auto:
        return _auto(res, cluster, custom, max_concurrent=max_concurrent, source=source)
    return _fixed(res.cpu, res.gpu, custom, cluster, source=source,
                  label=f"resources: {_asked(res.cpu, res.gpu, custom)} per trial")


def _asked(cpu: float, gpu: float, custom: Mapping[str, float]) -> str:
    extra = "".join(f", {k}: {v:g}" for k, v in sorted(custom.items()))
    return f"{{cpu: {cpu:g}, gpu: {gpu:g}{extra}}}"


def _fixed(cpu: float, gpu: float, custom: Mapping[str, float], cluster: Cluster, *,
           source: str, label: str) -> TrialPlan:
    fits = [n for n in cluster.nodes if n.holds(cpu, gpu, custom)]
    slots = sum(n.slots(cpu, gpu, custom) for n in fits)
    if not fits:
        if cluster.autoscaling:
            line = (f"{label}: no node of {cluster.where} holds one now ({cluster.describe()}); "
                    "trials wait for the autoscaler to add one")
            return TrialPlan(cpu, gpu, dict(custom), 0, line, grows=True)
        raise UserError(
            f"{source}: resources={_asked(cpu, gpu, custom)} per trial is more than any node "
            f"has ({cluster.describe()}), so no trial could ever start: set `resources: auto` "
            "or lower resources.cpu / resources.gpu"
            + (" / resources.custom" if custom else ""))
    where = cluster.where if len(fits) == len(cluster.nodes) else \
        f"{len(fits)} of the {len(cluster.nodes)} nodes of {cluster.where}"
    line = f"{label} ({cluster.describe()}): up to {slots} at once on {where}"
    return TrialPlan(cpu, gpu, dict(custom), slots, line, grows=cluster.autoscaling)


def _auto(res: Resources, cluster: Cluster, custom: dict[str, float], *, max_concurrent: int,
          source: str) -> TrialPlan:
    if res.gpu <= 0:
        raise UserError(f"{source}: resources.gpu={res.gpu:g} is invalid with auto: expected the "
                        "GPU share of one trial where GPUs exist (e.g. 0.25 packs four on a GPU)")
    gpu_nodes = [n for n in cluster.nodes if n.holds(0.0, res.gpu, custom) and n.cpu >= 1]
    if gpu_nodes:
        # Each GPU node runs floor(GPUs / share) trials; each gets at most its part of the CPUs.
        per_node = [max(1, math.floor(n.gpu / res.gpu + 1e-9)) for n in gpu_nodes]
        cpu = max(1.0, min(res.cpu, *(math.floor(n.cpu / k) for n, k in zip(gpu_nodes, per_node,
                                                                          strict=True))))
        label = (f"resources: auto -> {_count(cpu, 'CPU')} + {res.gpu:g} GPU per trial "
                 "(GPUs found)")
        return _fixed(cpu, res.gpu, custom, cluster, source=source, label=label)
    cpu_nodes = [n for n in cluster.nodes if n.holds(1.0, 0.0, custom)]
    if not cpu_nodes:
        return _fixed(1.0, 0.0, custom, cluster, source=source,
                      label="resources: auto -> 1 CPU per trial, no GPU")
    total = sum(n.cpu for n in cpu_nodes)
    # Share the CPUs among the trials that run at once, whole cores each, no more than a node has.
    cpu = float(max(1, min(math.floor(total / max(1, max_concurrent)),
                           max(math.floor(n.cpu) for n in cpu_nodes))))
    label = f"resources: auto -> {_count(cpu, 'CPU')} per trial, no GPU (none found)"
    return _fixed(cpu, 0.0, custom, cluster, source=source, label=label)


def pending_line(plan_: TrialPlan | None) -> str:
    """What replaces Ray's 60-s "No trial is running ..." warning (said once)."""
    asked = _asked(plan_.cpu, plan_.gpu, plan_.custom) if plan_ else "its resources"
    return (f"waiting: no trial has started for a while; each needs {asked} and no node has "
            "that free (an autoscaling cluster adds nodes; otherwise lower `resources`)")
