"""`sparse-search` command line (typer).

Exit codes, for every command: 0 success; 1 a search, trial set or job that failed; 2 bad
input (one ``error: ...`` line naming the file, field and value: raise
:class:`search.errors.UserError` or an ``ArchError``/``SpecError``/``DataError``, and
:func:`run_cli` does the rest); 130 interrupted (Ctrl-C or SIGTERM: one line naming the
``resume`` command). Commands stay thin: the work lives in the modules they call.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from search.cli.data import data_app
from search.cli.export import FORMATS as EXPORT_FORMATS  # a light module: no torch at import

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the best small CNN for every parameter budget (Ray Tune + Optuna + MLflow).",
)
app.add_typer(data_app, name="data")


@app.command()
def summarize(
    arch_yaml: Path = typer.Argument(..., help="architecture YAML (an ArchConfig)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Print the per-layer params/MACs table and totals of an architecture (no training)."""
    from trainables.accounting import count
    from trainables.arch import ArchConfig

    acc = count(ArchConfig.load(arch_yaml))
    if as_json:
        typer.echo(json.dumps(acc.to_dict()))
    else:
        typer.echo(acc.table())


@app.command()
def train(
    target: str | None = typer.Argument(None, metavar="ARCH.yaml|RUN_DIR", help="an architecture YAML (with --data), or a search's run directory (with TRIAL_KEY)"),
    trial_key: str | None = typer.Argument(None, metavar="[TRIAL_KEY]", help="with RUN_DIR: the trial to retrain (results.csv's trial_key)"),
    run_id: str | None = typer.Option(None, "--run-id", help="instead of RUN_DIR TRIAL_KEY: a trial's (or final) MLflow run id"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="with --run-id: default $MLFLOW_TRACKING_URI, else ./mlflow.db"),
    data: str | None = typer.Option(None, "--data", help="with ARCH.yaml: digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder"),
    data_path: str | None = typer.Option(None, "--data-path", help="an .npz file, a torchvision root dir or an image-folder root (with RUN_DIR: overrides the run's data.path)"),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="epochs (default: the trial's recorded ones; ARCH.yaml: TrainConfig's, 10)"),
    subset: int | None = typer.Option(None, "--subset", min=2, help="with ARCH.yaml: train+val images drawn from TRAIN (stratified)"),
    image_size: int | None = typer.Option(None, "--image-size", min=2, help="with ARCH.yaml, imagefolder: resize to this side (pixels)"),
    seed: int | None = typer.Option(None, "--seed", min=0, help="seeds init, batch order, augmentation (ARCH.yaml: and the val split); default: the trial's recorded seed, ARCH.yaml: 0"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: the CPUs this process may use)"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line: the final metrics"),
) -> None:
    """Train one architecture outside any search: a line per epoch, then a summary.

    Two forms. `train ARCH.yaml --data NAME [...]` trains an architecture file with the default
    recipe. `train RUN_DIR TRIAL_KEY [--epochs E] [--seed S]` (or `train --run-id ID`) retrains
    a search's trial: its recorded architecture (trials/KEY/arch.yaml) and recipe (its train/
    config), on the search's data splits (the run's spec.yaml); --epochs and --seed replace the
    recorded values.
    """
    from search.errors import UserError
    from trainables.train import TrainConfig, TrainingDiverged, describe
    from trainables.trial import train_arch

    if run_id is not None:
        if target is not None or trial_key is not None:
            raise UserError("--run-id replaces RUN_DIR TRIAL_KEY: give one or the other")
        from search.finalize.record import run_of_mlflow_run
        from search.tracking import resolve_tracking_uri

        target, trial_key = run_of_mlflow_run(run_id, resolve_tracking_uri(tracking_uri))
    if target is None:
        raise UserError("missing ARCH.yaml or RUN_DIR (see `sparse-search train --help`)")
    from search.rundir.storage import is_uri

    if is_uri(target) or target.startswith("file://") or Path(target).is_dir():
        from search.finalize.retrain import open_run, trial_recipe
        from search.spec import load_spec

        given = [f for f, v in (("--data", data), ("--subset", subset), ("--image-size", image_size)) if v is not None]
        if given:
            raise UserError(f"{target} is a run directory: its trials train on its spec.yaml data section "
                            f"({', '.join(given)} apply to an ARCH.yaml only; --data-path may move the data)")
        if trial_key is None:
            raise UserError(f"{target} is a run directory: name the trial to retrain (train RUN_DIR TRIAL_KEY)")
        run = open_run(target)
        data_cfg = load_spec(run.spec).data
        data_cfg = data_cfg if data_path is None else data_cfg.replace(path=data_path)
        arch, cfg = trial_recipe(run, trial_key, epochs=epochs, seed=seed)
        cfg = cfg if threads is None else cfg.replace(threads=threads)
    else:
        from trainables.arch import ArchConfig
        from trainables.data import DataConfig

        if trial_key is not None:
            raise UserError(f"unexpected argument {trial_key}: a TRIAL_KEY follows a run directory, "
                            f"and {target} is not one")
        if data is None:
            raise UserError(f"{target}: an architecture file trains on --data NAME (or give a run directory)")
        seed = 0 if seed is None else seed
        arch = ArchConfig.load(target)
        data_cfg = DataConfig(name=data, path=data_path, subset=subset, image_size=image_size, seed=seed)
        cfg = TrainConfig(seed=seed, threads=threads)
        cfg = cfg if epochs is None else cfg.replace(epochs=epochs)
    from trainables.data import load_dataset

    splits = load_dataset(data_cfg)
    typer.echo(f"arch {arch.canonical()}\ndata {data_cfg.name}: {splits.sizes()}\ntrain {cfg}")
    try:
        result = train_arch(arch, splits, cfg, on_epoch=lambda m, _state: typer.echo(describe(m, cfg)))
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    summary = result.summary()
    typer.echo("summary " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if as_json:
        typer.echo(json.dumps(summary))


@app.command()
def finalize(
    run_dir: str = typer.Argument(..., help="a search's run directory (runs/<name>-<timestamp>) or its URI (s3://...)"),
    top: int | None = typer.Option(None, "--top", help="retrain at most this many front members, the best (search.finalize.pick) (overrides search.finalize.top; default: all)"),
    seeds: int | None = typer.Option(None, "--seeds", help="repeats per member (overrides search.finalize.seeds; default 2)"),
    epochs: int | None = typer.Option(None, "--epochs", help="epochs per phase (overrides search.finalize.epochs; default: the trial's)"),
    time_budget: str | None = typer.Option(None, "--time-budget", help="wall time for this call, e.g. 75m or 2h: members are trained in pick order and none starts whose estimated end (its trial's measured pace) is later (overrides search.finalize.time_budget)"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local Ray)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: the store the search used (run_dir/mlflow.json)"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log the retrainings to MLflow"),
    as_json: bool = typer.Option(False, "--json", help="end stdout with one JSON object: counts and the final front"),
) -> None:
    """Retrain the search's front at full fidelity over several seeds, on Ray (resumable).

    Each member keeps its recorded architecture and recipe (--epochs replaces the epochs, the
    seed changes per repeat) and the search's data splits. Writes run_dir/final/<key>-s<seed>/
    as each retraining ends (a rerun skips those) and run_dir/final-pareto.csv (mean and std
    over seeds per member; on_front marks the final front). Exit 0 done, 1 some retraining (or
    MLflow) failed, 2 bad input, 130 interrupted (rerun to continue).
    """
    from search.finalize.front import front_text
    from search.finalize.retrain import FinalizeInterrupted, finalize_run

    try:
        outcome = finalize_run(run_dir, top=top, seeds=seeds, epochs=epochs,
                               time_budget=time_budget, mlflow=not no_mlflow,
                               tracking_uri=tracking_uri, address=address)
    except (FinalizeInterrupted, KeyboardInterrupt):  # any moment: what finished is kept
        print(str(FinalizeInterrupted(run_dir)), file=sys.stderr)
        raise typer.Exit(130) from None
    typer.echo(front_text(outcome.rows))
    from search.rundir.storage import is_uri

    typer.echo(f"final front: final-pareto.csv in {run_dir}" if is_uri(run_dir) else
               f"final front: {outcome.run_dir / 'final-pareto.csv'}")
    code = 0
    if outcome.left_out:  # a budget is the user's choice, as the search's is: not an error
        print(f"note: the time budget left out {', '.join(outcome.left_out)}: rerun finalize with "
              "a larger --time-budget to train them", file=sys.stderr)
    if outcome.failed:
        print(f"error: {outcome.failed} retraining(s) failed: see final/*/result.json in "
              f"{outcome.run_dir}; rerun finalize to retry them", file=sys.stderr)
        code = 1
    if outcome.tracking_error:
        print(f"error: {outcome.tracking_error}", file=sys.stderr)
        code = 1
    if as_json:
        typer.echo(json.dumps(outcome.summary(), default=str))
    raise typer.Exit(code)


@app.command()
def ui(
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="port on 127.0.0.1"),
    backend_store_uri: str = typer.Option("sqlite:///mlflow.db", "--backend-store-uri", help="the runs store (the searches' --tracking-uri when it is local)"),
    artifact_root: str = typer.Option("./mlruns", "--artifact-root", help="where new experiments keep artifacts"),
    experiment: str | None = typer.Option(None, "--experiment", help="print this experiment's runs list (default: the latest search's)"),
) -> None:
    """Serve the MLflow UI on 127.0.0.1 (1 worker) and print the runs-list URL; Ctrl-C stops it."""
    from search.tracking import serve_ui

    raise typer.Exit(serve_ui(port=port, backend_store_uri=backend_store_uri,
                              artifact_root=artifact_root, experiment=experiment, echo=typer.echo))


@app.command()
def pareto(
    run_dir_arg: str | None = typer.Argument(None, metavar="[RUN_DIR]", help="read the front from this run directory (a path or a storage URI, s3://...) instead of MLflow"),
    experiment: str | None = typer.Option(None, "--experiment", help="MLflow experiment (default: the latest search in any)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else ./mlflow.db"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    final: bool = typer.Option(False, "--final", help="the front as `finalize` retrained it (the parent run's final-pareto.csv artifact)"),
    run_dir: str | None = typer.Option(None, "--run-dir", help="with --final: read RUN_DIR/final-pareto.csv instead of MLflow"),
) -> None:
    """Print the Pareto front of the latest search, read from the MLflow tracking store, or
    the one a run directory recorded (`pareto RUN_DIR`: its pareto.csv; local or a URI)."""
    from search.tracking import format_front, front_from_store, resolve_tracking_uri

    if run_dir_arg is not None and run_dir is not None and run_dir_arg != run_dir:
        from search.errors import UserError

        raise UserError(f"two run directories given ({run_dir_arg} and --run-dir {run_dir}): give one")
    if run_dir_arg is not None and not final:
        from search.rundir.front import read_front, read_objectives
        from search.rundir.progress import front_table

        rows = read_front(run_dir_arg)
        typer.echo(json.dumps({"run_dir": run_dir_arg, "front": rows}) if as_json
                   else front_table(rows, read_objectives(run_dir_arg)))
        return
    run_dir = run_dir or run_dir_arg

    if final or run_dir is not None:
        from search.finalize.front import front_text, read_final_csv, typed_row
        from search.finalize.record import final_from_store

        rows = read_final_csv(run_dir) if run_dir is not None else \
            final_from_store(resolve_tracking_uri(tracking_uri), experiment)
        typer.echo(json.dumps({"final_front": [typed_row(r) for r in rows]}) if as_json
                   else front_text(rows))
        return
    report = front_from_store(resolve_tracking_uri(tracking_uri), experiment)
    typer.echo(json.dumps(report) if as_json else format_front(report))


@app.command()
def export(
    run_id: str = typer.Argument(..., metavar="RUN_ID|RUN_DIR", help="a child (trial) run on the Pareto front, or a run directory (a path or a storage URI) with TRIAL_KEY"),
    trial_key: str | None = typer.Argument(None, metavar="[TRIAL_KEY]", help="with RUN_DIR: the trial (results.csv's trial_key; its trials/KEY/model.pt), or final/MEMBER-sSEED: a finalized member's retrained weights"),
    fmt: str = typer.Option(..., "--format", help=" | ".join(EXPORT_FORMATS)),
    out: Path = typer.Option(..., "-o", "--output", help="file to write"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else ./mlflow.db"),
) -> None:
    """Rebuild a trial's trained model (from MLflow, or from RUN_DIR TRIAL_KEY) and write it as
    state_dict, TorchScript, ONNX or int8 ONNX (onnx-int8: calibrated on the search's data)."""
    if trial_key is not None:
        from search.cli.export import export_trial

        path = export_trial(run_id, trial_key, fmt=fmt, out=out)
        typer.echo(f"wrote {path} ({fmt})")
        return
    from search.cli.export import export_run
    from search.tracking import resolve_tracking_uri

    path = export_run(run_id, fmt=fmt, out=out, tracking_uri=resolve_tracking_uri(tracking_uri))
    typer.echo(f"wrote {path} ({fmt})")


@app.command()
def sync(
    run_dir: str = typer.Argument(..., help="a search's run directory (runs/<name>-<timestamp>) or its URI (s3://...)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: the one the search used (run_dir/mlflow.json)"),
) -> None:
    """Upload what MLflow missed from a run directory and close runs a killed search left RUNNING."""
    from search.tracking import sync_run_dir

    counts = sync_run_dir(run_dir, tracking_uri)
    typer.echo("synced " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command()
def run(
    spec_path: Path = typer.Argument(..., metavar="SPACE.yaml", help="search space YAML (see spaces/)"),
    dry_run_n: int | None = typer.Argument(None, metavar="[N]", min=1, help="with --dry-run: feasible configs to sample (default 20)"),
    num_samples: int | None = typer.Option(None, "--num-samples", min=1, help="trials to train (overrides search.num_samples)"),
    max_params: int | None = typer.Option(None, "--max-params", min=1, help="nonzero-params budget (overrides constraints.max_params)"),
    seed: int | None = typer.Option(None, "--seed", min=0, help="sampler seed (overrides search.seed)"),
    data_path: str | None = typer.Option(None, "--data-path", help="dataset file or folder (overrides data.path)"),
    time_budget: str | None = typer.Option(None, "--time-budget", help="wall time for the search, e.g. 45m or 2h: no trial starts that would not end in it (overrides search.time_budget)"),
    storage: str = typer.Option("runs", "--storage", help="folder or storage URI (s3://BUCKET/PREFIX, gs://..., file://...) that gets the run directory"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local Ray)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not track in MLflow"),
    as_json: bool = typer.Option(False, "--json", help="end stdout with one JSON object: run_dir, counts, front"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only sample N feasible configs and show their sizes (no training)"),
) -> None:
    """Run a search; prints the Pareto front (params vs accuracy) at the end."""
    from search.errors import UserError
    from search.spec import load_spec

    if dry_run_n is not None and not dry_run:
        raise UserError(f"unexpected argument {dry_run_n}: a count is only for --dry-run N")
    spec = load_spec(spec_path, num_samples=num_samples, max_params=max_params, seed=seed,
                     data_path=data_path, time_budget=time_budget)
    if dry_run:
        from search.run.driver import dry_run_report

        dry_run_report(spec, dry_run_n or 20, as_json=as_json, echo=typer.echo)
        return
    from search.run.preflight import absolute_data_path, preflight

    # Checked before Ray is even imported: a missing file answers in seconds, leaving nothing.
    from search.rundir.storage import parse

    spec = absolute_data_path(spec)
    where = parse(storage)  # a malformed URI: exit 2 before anything else
    checked = preflight(spec, address=address, tracking_uri=tracking_uri, mlflow=not no_mlflow,
                        storage=where)
    from search.run.driver import report, run_search

    outcome = run_search(spec, storage_dir=where, address=address, tracking_uri=tracking_uri,
                         mlflow=not no_mlflow, checked=checked)
    raise typer.Exit(report(outcome, as_json=as_json, echo=typer.echo))


@app.command()
def resume(
    run_dir: str = typer.Argument(..., help="a search's run directory (runs/<name>-<timestamp>) or its URI (s3://...)"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local Ray)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: the store the search used (run_dir/mlflow.json)"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not track in MLflow"),
    as_json: bool = typer.Option(False, "--json", help="end stdout with one JSON object: run_dir, counts, front"),
    time_budget: str | None = typer.Option(None, "--time-budget", help="wall time for this resume on top of what the search spent, e.g. 2h or 2h30m: a search that stopped at its time budget goes on (no trial starts that would not end in it)"),
) -> None:
    """Continue an interrupted search (driver killed, Ctrl-C), or one that stopped at its time
    budget (with --time-budget): finished trials are kept."""
    from search.run.driver import report, resume_search

    outcome = resume_search(run_dir, address=address, tracking_uri=tracking_uri,
                            mlflow=not no_mlflow, time_budget=time_budget)
    raise typer.Exit(report(outcome, as_json=as_json, echo=typer.echo))


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., metavar="SPACE.yaml", help="search space YAML"),
    address: str = typer.Option(..., "--address", help="the cluster's job server, e.g. http://HEAD:8265"),
    follow: bool = typer.Option(False, "--follow", help="stream the job's log; exit with its status"),
    num_samples: int | None = typer.Option(None, "--num-samples", min=1, help="trials to train (overrides search.num_samples)"),
    max_params: int | None = typer.Option(None, "--max-params", min=1, help="nonzero-params budget (overrides constraints.max_params)"),
    seed: int | None = typer.Option(None, "--seed", min=0, help="sampler seed (overrides search.seed)"),
    data_path: str | None = typer.Option(None, "--data-path", help="dataset file or folder (overrides data.path)"),
    time_budget: str | None = typer.Option(None, "--time-budget", help="wall time for the search, e.g. 45m or 2h: no trial starts that would not end in it (overrides search.time_budget)"),
    storage: str | None = typer.Option(None, "--storage", help="run directories: a folder on the head or a storage URI every node reaches (s3://BUCKET/PREFIX; default: ./runs here for a local address, else $HOME/sparse-search/runs)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow store the job logs to (default: $MLFLOW_TRACKING_URI, else a local sqlite file)"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not track in MLflow"),
    as_json: bool = typer.Option(False, "--json", help="the job ends its log with the JSON summary"),
    entrypoint_python: str | None = typer.Option(None, "--entrypoint-python", help="cluster python that has sparse-search (default: this one for a local address, else `sparse-search` on PATH)"),
) -> None:
    """Submit the search as a Ray Job (working dir: only the resolved spec)."""
    import os

    from search.run.cluster import submit as submit_job

    if storage is not None:
        from search.rundir.storage import parse

        parse(storage)  # a malformed URI: exit 2 here (the job checks it can reach it)

    job_id, status = submit_job(
        spec_path, address=address,
        overrides={"num_samples": num_samples, "max_params": max_params, "seed": seed,
                   "data_path": data_path, "time_budget": time_budget},
        storage=storage, tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
        mlflow=not no_mlflow, as_json=as_json, entrypoint_python=entrypoint_python,
        follow=follow, echo=typer.echo)
    if status is not None:
        typer.echo(f"job {job_id}: {status}")
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Click's usage errors (unknown command or option, bad value): click's own classes and,
    from typer 0.22 on, those of the click copy typer ships (which click's do not catch)."""
    import click

    types: list[type[BaseException]] = [click.exceptions.ClickException]
    vendored = getattr(typer, "TyperException", None)
    if isinstance(vendored, type) and issubclass(vendored, Exception):
        types.append(vendored)
    return tuple(types)


def run_cli(cli: typer.Typer) -> None:
    """Run the typer app and exit with a code that tells the truth (see the module docstring).

    ``standalone_mode=False`` makes click *return* a ``typer.Exit``'s code instead of exiting:
    that return value is the exit code.
    """
    from search.errors import MachineError, user_error_types
    from search.run.interrupt import sigterm_as_sigint

    sigterm_as_sigint()  # until Ray starts (the search puts it back after ray.init)
    try:
        code = cli(standalone_mode=False)
    except typer.Exit as e:  # raised outside click's main (older typer)
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        from search.run.interrupt import Interrupted

        if isinstance(e, Interrupted):
            print(str(e), file=sys.stderr)
            sys.exit(130)
        if isinstance(e, _usage_error_types()) and hasattr(e, "show"):
            e.show()  # "Usage: ... Error: No such command 'dry-run'." as click prints it
            sys.exit(2)
        if isinstance(e, user_error_types()):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, MachineError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    run_cli(app)

