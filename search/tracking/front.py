"""Reading a search's Pareto front back from the store (``sparse-search pareto``).

The tracker tags front members ``on_front=true`` on their child runs; this finds the latest
search's parent run (:func:`~search.tracking.store.latest_search`) and lists them, with links
into the MLflow UI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from search.tracking.models import TAG_OBJECTIVES
from search.tracking.store import (
    TAG_ON_FRONT,
    TAG_PARENT,
    TAG_TRIAL_KEY,
    check_reachable,
    client_for,
    latest_search,
    run_url,
    search_all,
    ui_base,
)

_COLUMNS = ("val_accuracy", "val_accuracy_se", "test_accuracy", "nonzero_params", "macs")


def front_from_store(tracking_uri: str, experiment: str | None = None) -> dict[str, Any]:
    """The Pareto front of the latest search (children tagged on_front), sorted by params."""
    check_reachable(tracking_uri)
    client = client_for(tracking_uri)
    parent = latest_search(client, experiment)
    eid = parent.info.experiment_id
    runs = search_all(client, [eid], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' "
                                     f"and tags.`{TAG_ON_FRONT}` = 'true'")
    base = ui_base(tracking_uri)
    modes = search_objectives(parent.data.tags, parent.data.params)
    objectives = list(modes)
    extra = [m for m in objectives if m not in _COLUMNS]
    front = [{
        "run_id": r.info.run_id,
        "trial_key": r.data.tags.get(TAG_TRIAL_KEY),
        "arch": r.info.run_name,
        **{k: r.data.metrics.get(k) for k in ("val_accuracy", "val_accuracy_se", "test_accuracy",
                                               "nonzero_params", "deploy_params", "macs",
                                               *extra)},
        "status": r.info.status,
        "url": run_url(base, eid, r.info.run_id),
    } for r in runs]
    front.sort(key=lambda f: (f["nonzero_params"] is None, f["nonzero_params"] or 0))
    return {"search": parent.info.run_name, "parent_run_id": parent.info.run_id,
            "experiment_id": eid, "status": parent.info.status, "objectives": objectives,
            "objective_modes": modes,
            "runs_url": run_url(base, eid), "front": front}


def search_objectives(tags: Mapping[str, str], params: Mapping[str, str]) -> dict[str, str]:
    """metric -> max/min of a search's parent run, in the spec's order: the tracker's
    TAG_OBJECTIVES ("metric:mode,..."), else the flattened spec params (objectives/<metric>,
    sorted: a search tracked before the tag)."""
    if tag := tags.get(TAG_OBJECTIVES):
        return dict(item.split(":", 1) for item in tag.split(",") if ":" in item)
    return {k.split("/", 1)[1]: v for k, v in sorted(params.items()) if k.startswith("objectives/")}


def format_front(report: Mapping[str, Any]) -> str:
    """The `sparse-search pareto` table: the standard columns, then any other objective the
    search used (flash_bytes, sram_bytes, ...)."""
    extra = [m for m in report.get("objectives", []) if m not in _COLUMNS]
    if "deploy_params" not in extra and any(
            f.get("deploy_params") not in (None, f.get("nonzero_params")) for f in report["front"]):
        extra.insert(0, "deploy_params")  # a frozen trunk ships more than trains: show both
    modes = report.get("objective_modes") or {}
    used = ", ".join(f"{m} ({modes[m]})" if m in modes else m for m in report.get("objectives", []))
    lines = [f"search {report['search']} ({report['status']}), parent run {report['parent_run_id']}"
             + (f"; objectives: {used}" if used else ""),
             f"{len(report['front'])} on the Pareto front; runs: {report['runs_url']}",
             f"{'val_acc':>8} {'+-se':>6} {'test_acc':>8} {'params':>10} {'macs':>12}  "
             + "".join(f"{m:>12}  " for m in extra) + f"{'run_id':32}  arch"]
    for f in report["front"]:
        se = _num(f.get("val_accuracy_se"), ".4f")
        lines.append(f"{_num(f['val_accuracy'], '.4f'):>8} {se:>6} {_num(f['test_accuracy'], '.4f'):>8} "
                     f"{_num(f['nonzero_params'], ',.0f'):>10} {_num(f['macs'], ',.0f'):>12}  "
                     + "".join(f"{_num(f.get(m), ',.4g'):>12}  " for m in extra)
                     + f"{f['run_id']:32}  {f['arch']}")
    return "\n".join(lines)


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)

