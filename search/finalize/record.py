"""MLflow record of a finalize (:mod:`search.finalize`): one run per (member, seed), nested
under the search's parent run (tag ``mlflow.parentRunId``), tagged ``sparse_search.role=final``,
``sparse_search.trial_key`` and ``sparse_search.final_id`` (``<member>-s<seed>``, what makes a
rerun find the run instead of making a second one), with the recipe as params, the per-epoch
metrics and the final metrics; and ``final-pareto.csv`` as an artifact of the parent.

A run is created and ended in one go once its retraining finished, so a killed finalize
never leaves one RUNNING. A tracking failure turns the tracker off (``failure`` says why; the
command exits 1); the results stay in the run dir and a rerun logs what MLflow missed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from search.tracking import (
    TAG_PARENT,
    TAG_ROLE,
    TAG_TRIAL_KEY,
    client_for,
    log_metrics,
    log_params,
    numeric,
    read_state,
    search_all,
)

ROLE_FINAL = "final"
TAG_FINAL_ID = "sparse_search.final_id"
TAG_SEED = "sparse_search.seed"
TAG_PRUNE_ROUND = "sparse_search.prune_round"


class FinalTracker:
    """Logs a finalize's retrainings under the search's parent run (see the module docstring)."""

    def __init__(self, client: Any, experiment_id: str, parent_run_id: str, uri: str) -> None:
        self.client, self.experiment_id, self.parent_run_id = client, experiment_id, parent_run_id
        self.tracking_uri = uri
        self.failure: str | None = None
        runs = search_all(client, [experiment_id], f"tags.`{TAG_PARENT}` = '{parent_run_id}' "
                                                    f"and tags.`{TAG_ROLE}` = '{ROLE_FINAL}'")
        self.runs = {r.data.tags.get(TAG_FINAL_ID): r for r in runs}

    @classmethod
    def for_run(cls, run_dir: Path, tracking_uri: str | None) -> FinalTracker | None:
        """The tracker of a tracked run dir (run_dir/mlflow.json names its parent run), or None
        for an untracked one."""
        state = read_state(run_dir)
        uri = tracking_uri or state.get("tracking_uri")
        parent, eid = state.get("parent_run_id"), state.get("experiment_id")
        if uri is None or parent is None or eid is None:
            return None
        from search.tracking import check_reachable

        check_reachable(uri)  # a dead server is a UserError before anything trains
        return cls(client_for(uri), eid, parent, uri)

    def _fail(self, where: str, e: Exception) -> None:
        if self.failure is None:
            self.failure = (f"MLflow tracking at {self.tracking_uri} failed in {where} "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:300]})")
            print(f"warning: {self.failure}; the results stay in the run dir: rerun finalize "
                  "to log them", file=sys.stderr, flush=True)

    def log(self, job_id: str, rec: dict[str, Any], member: Any) -> str | None:
        """The (member, seed)'s run, created, filled and FINISHED unless it already is."""
        if self.failure is not None:
            return None
        run = self.runs.get(job_id)
        if run is not None and run.info.status == "FINISHED":
            return run.info.run_id
        try:
            return self._log(job_id, rec, member, run)
        except Exception as e:  # (tracking never costs a result)
            self._fail("log", e)
            return None

    def _log(self, job_id: str, rec: dict[str, Any], member: Any, run: Any) -> str:
        c = self.client
        if run is None:  # (a run left unfinished by a kill mid-logging is filled again)
            tags = {TAG_PARENT: self.parent_run_id, TAG_ROLE: ROLE_FINAL,
                    TAG_TRIAL_KEY: member.trial_key, TAG_FINAL_ID: job_id,
                    TAG_SEED: str(rec["seed"]), TAG_PRUNE_ROUND: str(member.prune_round),
                    "mlflow.source.name": "sparse-search"}
            run = c.create_run(self.experiment_id, run_name=f"final {job_id} {rec['arch']}"[:250],
                               tags=tags)
        run_id = run.info.run_id
        log_params(c, run_id, {**member.arch.to_flat(), **rec["train"]})
        for m in rec.get("history", []):
            log_metrics(c, run_id, numeric(m), int(m.get("epoch", 0)))
        final = numeric(rec["metrics"])
        log_metrics(c, run_id, final, int(final.get("epoch", 0)))
        c.log_text(run_id, member.arch.to_yaml(), "arch.yaml")
        c.set_terminated(run_id, "FINISHED")
        self.runs[job_id] = c.get_run(run_id)
        return run_id

    def log_front(self, path: Path) -> None:
        """final-pareto.csv as an artifact of the parent run."""
        if self.failure is not None:
            return
        try:
            self.client.log_artifact(self.parent_run_id, str(path))
        except Exception as e:
            self._fail("log_front", e)


def final_from_store(tracking_uri: str, experiment: str | None = None) -> list[dict[str, str]]:
    """The latest search's final front: its parent run's final-pareto.csv artifact."""
    import csv
    import tempfile

    from search.errors import UserError
    from search.tracking import TAG_RUN_DIR, check_reachable, latest_search

    check_reachable(tracking_uri)
    client = client_for(tracking_uri)
    parent = latest_search(client, experiment)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    if "final-pareto.csv" not in names:
        run_dir = parent.data.tags.get(TAG_RUN_DIR, "RUN_DIR")
        raise UserError(f"search {parent.info.run_name} has no final front yet: run "
                        f"`sparse-search finalize {run_dir}`")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent.info.run_id, "final-pareto.csv", tmp)
        with open(path, newline="") as f:
            return list(csv.DictReader(f))


def run_of_mlflow_run(run_id: str, tracking_uri: str) -> tuple[str, str]:
    """(run dir, trial key) of a trial's (or a final) MLflow run: its trial_key tag and its
    parent's run_dir tag."""
    from search.errors import UserError
    from search.tracking import TAG_RUN_DIR, check_reachable

    check_reachable(tracking_uri)
    client = client_for(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # (MLflow raises its own kinds for an unknown id)
        raise UserError(f"--run-id {run_id}: no such run in {tracking_uri}") from None
    key, parent_id = run.data.tags.get(TAG_TRIAL_KEY), run.data.tags.get(TAG_PARENT)
    if key is None or parent_id is None:
        raise UserError(f"--run-id {run_id}: not a sparse-search trial run (no "
                        f"{TAG_TRIAL_KEY} / {TAG_PARENT} tag)")
    run_dir = client.get_run(parent_id).data.tags.get(TAG_RUN_DIR)
    if not run_dir or not Path(run_dir).is_dir():
        raise UserError(f"--run-id {run_id}: its search's run directory {run_dir!r} is not "
                        "here: give RUN_DIR TRIAL_KEY of a copy")
    return run_dir, key
