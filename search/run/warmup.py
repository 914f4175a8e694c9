"""Warm trial workers on every node of a cluster before the first trial.

A trial runs in a Ray actor: a Python worker process on its node that imports torch and the
trainable before its first epoch. Ray prestarts idle workers only on the driver's node, so a
second node's first trial waited for a cold process (bench/cluster.py: 17.4 s on a loaded
2-core box, against ~4.5 s for its later trials). Here each node that can hold a trial runs,
pinned to it, as many short tasks as it has trial slots, at the trial's CPUs (so they run at
once, each in its own worker); each imports the trainable and ends. Their workers go back to
the node's idle pool with torch loaded, within Ray's soft limit of idle workers (one per CPU),
and the trials' actors take them.

Only on a cluster the driver attached to (``--address``, a Ray Job): a local Ray starts its
workers next to the driver anyway. Nodes that cannot hold a trial get none (on an autoscaling
cluster a task no node holds would ask for a node). Best effort: a warm-up that fails or
outlasts :data:`TIMEOUT_S` leaves the trials to start cold, as before.
"""

from __future__ import annotations

import math
import time
from typing import Any

TIMEOUT_S = 120.0  # a cold worker on a loaded node: ~15-20 s here


def _warm() -> str:
    """In a worker: import what a trial imports; the node it ran on."""
    import ray

    import trainables.trial  # noqa: F401  torch, torchvision, the models, the training loop

    return ray.get_runtime_context().get_node_id()


def warm_nodes(cpu: float, custom: dict[str, float] | None = None, *,
               timeout_s: float = TIMEOUT_S) -> str:
    """Warm one worker per trial slot (``cpu`` CPUs and ``custom`` resources per trial) on
    every alive node; one line saying what was warmed, in how long."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    custom = dict(custom or {})
    task = ray.remote(_warm)
    refs: list[Any] = []
    nodes = 0
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        fits = [res.get(k, 0.0) / v for k, v in custom.items() if v > 0]
        slots = min([math.floor(res.get("CPU", 0.0) / cpu + 1e-9) if cpu > 0 else 1,
                     *(math.floor(f + 1e-9) for f in fits)])
        if slots < 1:
            continue
        nodes += 1
        strategy = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        refs += [task.options(num_cpus=cpu, resources=custom, scheduling_strategy=strategy,
                              max_retries=0).remote() for _ in range(slots)]
    if not refs:
        return "workers: none warmed (no node holds a trial yet)"
    start = time.monotonic()
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    failed = 0
    for ref in done:
        try:
            ray.get(ref)
        except Exception:  # best effort: that trial starts cold
            failed += 1
    ok = len(done) - failed
    line = (f"workers: {ok} of {len(refs)} warmed on {nodes} node{'s' * (nodes != 1)} "
            f"in {time.monotonic() - start:.1f} s (torch and the trainable imported)")
    if pending:
        line += f"; {len(pending)} not within {timeout_s:.0f} s: their trials start cold"
    return line
