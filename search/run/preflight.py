"""Check everything a search needs before anything is created, cheaply (no Ray import for a
local search): the data (present, readable, its shape: no pixels read), the MLflow store and
the per-trial resources against the cluster (:mod:`search.run.resources`). A failed check is a
UserError: exit 2, no run dir, no MLflow run, no Ray runtime, in a few seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.spec import SearchSpec


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` found: everything a search needs, before anything is created."""

    tracking_uri: str | None  # a checked MLflow store, or None (no tracking)
    plan: Any  # search.run.resources.TrialPlan
    attached: bool  # this process attached to ``--address`` (detach when done)


def absolute_data_path(spec: SearchSpec) -> SearchSpec:
    """The spec with a relative data.path resolved against the working directory: spec.yaml
    must still find the data when `resume` runs from another directory."""
    if spec.data.path is not None and not Path(spec.data.path).is_absolute():
        return dataclasses.replace(
            spec, data=spec.data.replace(path=str(Path(spec.data.path).resolve())))
    return spec


def preflight(spec: SearchSpec, *, address: str | None, tracking_uri: str | None,
              mlflow: bool, storage: Any = None) -> Checked:
    """Check the data (present, readable, its shape: no pixels read), the run dirs' storage
    (``storage``: a path, a URI or a parsed :class:`search.rundir.storage.Remote`: the bucket exists
    and answers), the tracking store and the per-trial resources against the cluster, in that
    order, before anything is created.

    A local search reads this machine's CPUs and GPUs without starting Ray; with ``--address``
    this attaches to the cluster (cheap) and reads its nodes.
    """
    from search.run import resources
    from search.run.ray_runtime import cluster_address, init_ray
    from trainables.data import probe_dataset

    if spec.search.initial:  # against the space (a SpecError: exit 2), before anything is made
        from search.space import check_initial

        check_initial(spec)
    probe_dataset(spec.data)
    if storage is not None:
        from search.rundir import storage as st

        st.check_reachable(storage if isinstance(storage, st.Remote) else st.parse(storage))
    uri = checked_tracking_uri(tracking_uri) if mlflow else None
    address = cluster_address(address)
    attached = False
    if address is None:
        cluster = resources.local_cluster()
    else:
        attached = init_ray(address)
        cluster = resources.ray_cluster(address)
    checked = Checked(tracking_uri=uri, plan=None, attached=attached)
    try:
        plan = resources.plan(spec.resources, cluster, max_concurrent=spec.search.max_concurrent,
                              source=spec.source)
    except BaseException:
        detach(checked)
        raise
    return dataclasses.replace(checked, plan=plan)


def detach(checked: Checked) -> None:
    if checked.attached:
        import ray

        ray.shutdown()


def checked_tracking_uri(tracking_uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db; a UserError when that
    store cannot be used (checked before anything trains)."""
    from search.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return uri
