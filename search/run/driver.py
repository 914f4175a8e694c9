"""Drive a search, locally (default) or on a Ray cluster (``address``), and resume it.

One search, end to end::

    spec ──> run dir (spec.yaml) ──> dataset loaded ONCE in the driver, while Ray starts
         ──> Tuner(train_trial + dataset via the object store, ProposerSearcher in a
             ConcurrencyLimiter, ASHA or FIFO, cpu/gpu per trial, reused actors)
         ──> Recorder (trials/<key>/, CSVs) ─> progress line ─> MLflow (background thread)
         ──> the Pareto front (table on stdout, summary dict returned)

Before anything is created, :mod:`search.run.preflight` checks the data, the MLflow store and
the resources. Exit codes come from :func:`report` (0, 1, 130); Tune itself is built in
:mod:`search.run.tuner`, Ray started in :mod:`search.run.ray_runtime`. ``outcome.json`` in the run
dir records how the driver ended (``sync`` reads it).

On a multi-node cluster, ``storage_dir`` must be a folder every node sees at the same path
(NFS or similar) or a URI (``s3://``, ``gs://``: :mod:`search.rundir.storage`): trial checkpoints
are written there by the workers.

Resume (``resume_search``) after any kind of death of the driver, SIGKILL included: Ray's
experiment snapshot restores the trials (finished ones are not rerun, unfinished ones continue
from their last checkpoint; errored ones stay errored: they already used their
``max_failures`` retries), the Optuna journal restores what the sampler learned, and the
Recorder's files on disk say which trials finished. A trial that finished after Ray's last
snapshot reruns its last epochs but is recorded (and told to Optuna) once. See
:mod:`search.run.searcher` for how asked-but-unrecorded Optuna trials of the dead driver are closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.errors import MachineError, UserError, describe_os_error, machine_cause
from search.run.interrupt import Interrupted
from search.run.outcome import SearchOutcome
from search.run.preflight import Checked, absolute_data_path, detach, preflight
from search.run.ray_runtime import cluster_address, init_ray
from search.rundir.layout import RunDir, write_atomic
from search.rundir.owner import own_run
from search.rundir.storage import attach

if TYPE_CHECKING:
    from search.spec import SearchSpec

log = logging.getLogger("sparse_search.driver")




def run_search(
    spec: SearchSpec,
    *,
    storage_dir: Any = "runs",
    address: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
    progress: bool = True,
    progress_interval_s: float = 30.0,
    checked: Checked | None = None,
) -> SearchOutcome:
    """Run ``spec`` in a new run dir under ``storage_dir`` (a path, a URI or a parsed
    :class:`search.rundir.storage.Remote`); returns when every trial ended.

    Everything is checked first (:func:`preflight`: data, tracking store, resources): a failed
    check raises a UserError and leaves no run dir, MLflow run or Ray runtime behind.
    """
    spec = absolute_data_path(spec)
    if checked is None:
        checked = preflight(spec, address=address, tracking_uri=tracking_uri, mlflow=mlflow,
                            storage=storage_dir)
    run = mirror = ownership = None
    try:
        run = RunDir.create(storage_dir, spec.name)
        ownership = own_run(run)  # one owner per run dir (search.rundir.owner)
        mirror = attach(run)
        write_atomic(run.spec, spec.to_yaml())
    except BaseException as e:
        if mirror is not None:
            mirror.close()
        if ownership is not None:
            ownership.release()
        detach(checked)
        cause = machine_cause(e)
        if cause is not None and run is not None:  # the disk filled since the preflight
            shutil.rmtree(run.path, ignore_errors=True)  # nothing is left behind at start
            raise UserError(f"{run.location}: cannot write the run dir "
                            f"({describe_os_error(cause)})") from None
        raise
    with ownership:
        return _search(spec, run, resuming=False, checked=checked, address=address,
                       progress=progress, progress_interval_s=progress_interval_s,
                       mirror=mirror)


def resume_search(
    run_dir: str | Path,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
    progress: bool = True,
    progress_interval_s: float = 30.0,
    time_budget: str | float | None = None,
) -> SearchOutcome:
    """Continue an interrupted search in ``run_dir`` (its spec.yaml, journal and experiment);
    a URI is downloaded into a fresh local copy first (Ray reads its experiment from the URI).

    MLflow: ``tracking_uri``, else the store the run used (run_dir/mlflow.json); a run that
    was not tracked stays untracked unless a URI is given. ``time_budget`` (seconds, or 45m,
    2h30m): wall time for this resume on top of what the search spent, so a search that
    stopped at its budget goes on (UserError when it is not a duration).
    """
    from search.spec import load_spec
    from search.spec.parse import time_budget_option
    from search.tracking import read_state

    extend_s = time_budget_option(time_budget)
    run = RunDir.open(run_dir)  # (a local one is only checked; a URI downloaded)
    # Before anything is read or changed: a second resume, or the run itself still alive,
    # exits 2 here (search.rundir.owner). A URI: its local copy, and the lease there.
    with own_run(run):
        spec = load_spec(run.spec)
        if tracking_uri is None:
            tracking_uri = read_state(run.path).get("tracking_uri")
            mlflow = mlflow and tracking_uri is not None
        checked = preflight(spec, address=address, tracking_uri=tracking_uri, mlflow=mlflow)
        return _search(spec, run, resuming=True, checked=checked, address=address,
                       progress=progress, progress_interval_s=progress_interval_s,
                       mirror=attach(run), extend_s=extend_s)


def _search(spec: SearchSpec, run: RunDir, *, resuming: bool, checked: Checked,
            address: str | None, progress: bool, progress_interval_s: float,
            mirror: Any = None, extend_s: float | None = None) -> SearchOutcome:
    """:func:`_search_in`, then ``mirror`` (a :class:`search.rundir.storage.Mirror`) closed whatever
    happened: a run dir on a URI gets its last files; the outcome names the URI."""
    try:
        outcome = _search_in(spec, run, resuming=resuming, checked=checked, address=address,
                             progress=progress, progress_interval_s=progress_interval_s,
                             extend_s=extend_s)
    finally:
        storage_error = mirror.close() if mirror is not None else None
    return dataclasses.replace(outcome, location=run.location, storage_error=storage_error,
                               summary={**outcome.summary, "run_dir": run.location})


def _search_in(spec: SearchSpec, run: RunDir, *, resuming: bool, checked: Checked,
               address: str | None, progress: bool, progress_interval_s: float,
               extend_s: float | None = None) -> SearchOutcome:
    """Train the search in ``run`` with what :func:`preflight` checked; ``extend_s``: a
    resume's extra wall time (search.run.searcher).

    Run from the run dir. Every path is absolute by now, and the directory the driver started
    in may vanish: a Ray Job's working_dir copy, in a session folder that another node on the
    same host cleans up (nodes started as Ray's docs start them share it). MLflow's store
    resolves its default artifact root against the cwd when it opens, and Ray Tune's
    experiment analysis calls ``os.getcwd()`` at the end: both failed on a vanished cwd.
    """
    try:
        previous: str | None = os.getcwd()
    except FileNotFoundError:  # already gone: nothing to go back to
        previous = None
    os.chdir(run.path)
    try:
        return _train(spec, run, resuming=resuming, checked=checked, address=address,
                      progress=progress, progress_interval_s=progress_interval_s,
                      extend_s=extend_s)
    finally:
        if previous is not None:
            with contextlib.suppress(OSError):
                os.chdir(previous)


def _train(spec: SearchSpec, run: RunDir, *, resuming: bool, checked: Checked,
           address: str | None, progress: bool, progress_interval_s: float,
           extend_s: float | None) -> SearchOutcome:
    """:func:`_search_in`'s work, from the run dir."""
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    from search.run.interrupt import sigterm_as_sigint
    from search.rundir.layout import write_outcome

    started_at = time.monotonic()  # the time budget counts Ray's start and the data loading

    from search.run import ray_compat
    from search.run.background import Background
    from trainables.data import load_dataset

    ray_compat.check()  # a Ray / Optuna without the private hooks used: one clear error
    print(checked.plan.line, file=sys.stderr, flush=True)
    # Ray's start-up is mostly other processes: meanwhile this one loads the dataset, and the
    # background thread imports MLflow and opens (or migrates) its store: seconds, which may
    # run on while the first trials train; calls queued meanwhile wait.
    background = Background()
    uri = checked.tracking_uri
    tracker = _tracker(spec, run, uri) if uri is not None else None
    if tracker is not None:
        background.submit(tracker.start, resume=resuming)
    started = checked.attached
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparse-search-data") as pool:
            splits = pool.submit(load_dataset, spec.data)
            started = init_ray(address) or started
            # ray.init replaces the SIGTERM handler with one that exits at once: put back ours
            # (SIGTERM stops Tune like Ctrl-C: trials saved, the run resumable).
            sigterm_as_sigint()
            if cluster_address(address) is not None:
                # A cluster: every node's trial workers import torch now, while the data
                # loads, not in each node's first trial (search/run/warmup.py).
                from search.run.warmup import warm_nodes

                print(warm_nodes(checked.plan.cpu, dict(checked.plan.custom)), file=sys.stderr,
                      flush=True)
            splits.exception()  # wait for it (an unreadable dataset raises its DataError below)
        from search.run.tuner import fit

        outcome = fit(spec, run, splits.result(), resuming=resuming, tracker=tracker,
                      background=background, progress=progress, started_at=started_at,
                      progress_interval_s=progress_interval_s, plan=checked.plan,
                      extend_s=extend_s)
    except KeyboardInterrupt:
        # A second Ctrl-C (Tune stops cleanly on the first), or one during start-up.
        resumable = run.has_experiment()
        write_outcome(run.path, complete=False, stopped_by="interrupted")
        if tracker is not None:
            background.drain()
            tracker.finish("KILLED", reason=str(Interrupted(run.location, resumable=resumable)))
        raise Interrupted(run.location, resumable=resumable) from None
    except BaseException as e:
        cause = machine_cause(e)
        # Best effort on a machine that failed (the disk full, the storage read-only): the
        # outcome and MLflow's end may not be writable either; a resume closes what is open.
        with contextlib.suppress(OSError):
            write_outcome(run.path, complete=False, stopped_by=f"error: {type(e).__name__}")
        unclosed = ""
        if tracker is not None:
            try:
                background.drain()
                tracker.finish("FAILED", reason=f"{type(e).__name__}: {e}")
                failed = bool(getattr(tracker, "failure", None) or tracker.offline)
            except Exception:
                if cause is None:
                    raise
                failed = True
            if failed and cause is not None:
                unclosed = " (MLflow could not record the end either: the resume closes its runs)"
        if cause is not None:
            raise MachineError(
                f"{cause.filename or run.location}: {describe_os_error(cause, path=False)}: the "
                f"search stopped (its records are consistent){unclosed}; once that is fixed, "
                f"continue with `sparse-search resume {run.location}`") from None
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    write_outcome(run.path, complete=outcome.complete,
                  stopped_by=outcome.summary.get("stopped_by") if outcome.complete else
                  "interrupted")
    if tracker is not None:
        tracker.finish("FINISHED" if outcome.complete else "KILLED",
                       reason=None if outcome.complete else
                       f"interrupted: continue with `sparse-search resume {run.location}`")
        failure = getattr(tracker, "failure", None) or (
            f"MLflow tracking at {tracker.tracking_uri} went offline" if tracker.offline else None)
        local = not tracker.tracking_uri.startswith(("http://", "https://"))
        note = f"mlflow: {tracker.runs_url or tracker.tracking_uri}"
        if local:
            note += f" (start the UI with `sparse-search ui --backend-store-uri {tracker.tracking_uri}`)"
        outcome = dataclasses.replace(outcome, mlflow_note=None if failure else note,
                                      tracking_error=failure)
    return outcome


def _tracker(spec: SearchSpec, run: RunDir, tracking_uri: str) -> Any:
    """A SearchTracker for this run, not started yet."""
    from search.tracking import SearchTracker

    return SearchTracker(
        tracking_uri, spec.name, run_dir=run.path, location=run.location,
        spec_dict=spec.to_dict(),
        spec_yaml_text=run.spec.read_text(), search_name=run.path.name,
        objectives={o.metric: o.mode for o in spec.objectives},
        max_params_ref=spec.constraints.max_params,
    )


# ---------------------------------------------------------------------- CLI output
def report(outcome: SearchOutcome, *, as_json: bool, echo: Any = print) -> int:
    """Print the front (and the --json line last); the exit code: 0 a complete search, 130
    interrupted (resumable), 1 every trial failed or MLflow tracking failed (the results are
    in the run dir; ``sync`` uploads them)."""
    import json
    import sys

    echo(outcome.front_table)
    echo(f"run dir: {outcome.where}")
    if outcome.mlflow_note:
        echo(outcome.mlflow_note)
    code = 0
    s = outcome.summary
    if not outcome.complete:
        print(f"interrupted: continue with `sparse-search resume {outcome.where}`",
              file=sys.stderr)
        code = 130
    elif s.get("failed") and s.get("failed") == s.get("trials"):
        print(f"error: every trial failed ({s['failed']}): see the error column of "
              f"{outcome.where.partition('?')[0]}/results.csv", file=sys.stderr)
        code = 1
    if outcome.tracking_error:
        print(f"error: {outcome.tracking_error}; the results are in {outcome.where}: upload "
              f"them with `sparse-search sync {outcome.where}`", file=sys.stderr)
        code = code or 1
    if outcome.storage_error:
        print(f"error: {outcome.storage_error}", file=sys.stderr)
        code = code or 1
    if as_json:
        echo(json.dumps(outcome.summary))
    return code


def dry_run_report(spec: SearchSpec, n: int, *, as_json: bool, echo: Any = print) -> None:
    """Sample ``n`` feasible configs (nothing trained): histogram text, or one JSON line."""
    import json

    from search.space import dry_run
    from trainables.data import fixed_shape, probe_dataset

    # Fixed-shape datasets need no data at all; others are probed (no pixels read).
    shape = fixed_shape(spec.data) or probe_dataset(spec.data)
    result = dry_run(spec, n, input_shape=shape[0], num_classes=shape[1])
    if not as_json:
        echo(result.text())
        return
    echo(json.dumps({
        "feasible": len(result.proposals), "rejected": result.rejected,
        "asked": result.asked, "exhausted": result.exhausted,
        "feasible_fraction": result.feasible_fraction, "ms_per_screen": result.ms_per_screen,
        "proposals": [{"nonzero_params": p.screened_params, "deploy_params": p.deploy_params,
                       "macs": p.accounting.macs if p.accounting else None,
                       "arch": str(p.arch)} for p in result.proposals],
    }))

