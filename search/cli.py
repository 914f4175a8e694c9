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

from search.cli_data import data_app

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
    arch_yaml: Path = typer.Argument(..., help="architecture YAML (an ArchConfig)"),
    data: str = typer.Option(..., "--data", help="digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder"),
    data_path: str | None = typer.Option(None, "--data-path", help="an .npz file, a torchvision root dir or an image-folder root"),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="epochs (default: TrainConfig's, 10)"),
    subset: int | None = typer.Option(None, "--subset", min=2, help="train+val images drawn from TRAIN (stratified)"),
    image_size: int | None = typer.Option(None, "--image-size", min=2, help="imagefolder: resize to this side (pixels)"),
    seed: int = typer.Option(0, "--seed", min=0, help="seeds init, batch order, augmentation and the val split"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: the CPUs this process may use)"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line: the final metrics"),
) -> None:
    """Train one architecture outside any search: a line per epoch, then a summary."""
    from search.errors import UserError
    from trainables.arch import ArchConfig
    from trainables.data import DataConfig, load_dataset
    from trainables.train import TrainConfig, TrainingDiverged, describe
    from trainables.trial import train_arch

    arch = ArchConfig.load(arch_yaml)
    splits = load_dataset(DataConfig(name=data, path=data_path, subset=subset, image_size=image_size, seed=seed))
    cfg = TrainConfig(seed=seed, threads=threads)
    cfg = cfg if epochs is None else cfg.replace(epochs=epochs)
    typer.echo(f"arch {arch.canonical()}\ndata {data}: {splits.sizes()}\ntrain {cfg}")
    try:
        result = train_arch(arch, splits, cfg, on_epoch=lambda m, _state: typer.echo(describe(m, cfg)))
    except TrainingDiverged as e:
        raise UserError(str(e)) from None
    summary = result.summary()
    typer.echo("summary " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if as_json:
        typer.echo(json.dumps(summary))


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
    experiment: str | None = typer.Option(None, "--experiment", help="MLflow experiment (default: the latest search in any)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else ./mlflow.db"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Print the Pareto front of the latest search, read from the MLflow tracking store."""
    from search.tracking import format_front, front_from_store, resolve_tracking_uri

    report = front_from_store(resolve_tracking_uri(tracking_uri), experiment)
    typer.echo(json.dumps(report) if as_json else format_front(report))


@app.command()
def export(
    run_id: str = typer.Argument(..., help="a child (trial) run on the Pareto front"),
    fmt: str = typer.Option(..., "--format", help="state_dict | torchscript | onnx"),
    out: Path = typer.Option(..., "-o", "--output", help="file to write"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else ./mlflow.db"),
) -> None:
    """Rebuild a trial's trained model from MLflow and write it as state_dict, TorchScript or ONNX."""
    from search.export import export_run
    from search.tracking import resolve_tracking_uri

    path = export_run(run_id, fmt=fmt, out=out, tracking_uri=resolve_tracking_uri(tracking_uri))
    typer.echo(f"wrote {path} ({fmt})")


@app.command()
def sync(
    run_dir: Path = typer.Argument(..., help="a search's run directory (runs/<name>-<timestamp>)"),
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
    storage: Path = typer.Option(Path("runs"), "--storage", help="folder that gets the run directory"),
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
        from search.driver import dry_run_report

        dry_run_report(spec, dry_run_n or 20, as_json=as_json, echo=typer.echo)
        return
    from search.preflight import absolute_data_path, preflight

    # Checked before Ray is even imported: a missing file answers in seconds, leaving nothing.
    spec = absolute_data_path(spec)
    checked = preflight(spec, address=address, tracking_uri=tracking_uri, mlflow=not no_mlflow)
    from search.driver import report, run_search

    outcome = run_search(spec, storage_dir=storage, address=address, tracking_uri=tracking_uri,
                         mlflow=not no_mlflow, checked=checked)
    raise typer.Exit(report(outcome, as_json=as_json, echo=typer.echo))


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="a search's run directory (runs/<name>-<timestamp>)"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else a local Ray)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="default: the store the search used (run_dir/mlflow.json)"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not track in MLflow"),
    as_json: bool = typer.Option(False, "--json", help="end stdout with one JSON object: run_dir, counts, front"),
) -> None:
    """Continue an interrupted search (driver killed, Ctrl-C): finished trials are kept."""
    from search.driver import report, resume_search

    outcome = resume_search(run_dir, address=address, tracking_uri=tracking_uri,
                            mlflow=not no_mlflow)
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
    storage: str | None = typer.Option(None, "--storage", help="run directories on the head (default: ./runs here for a local address, else $HOME/sparse-search/runs)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow store the job logs to (default: $MLFLOW_TRACKING_URI, else a local sqlite file)"),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not track in MLflow"),
    as_json: bool = typer.Option(False, "--json", help="the job ends its log with the JSON summary"),
    entrypoint_python: str | None = typer.Option(None, "--entrypoint-python", help="cluster python that has sparse-search (default: this one for a local address, else `sparse-search` on PATH)"),
) -> None:
    """Submit the search as a Ray Job (working dir: only the resolved spec)."""
    import os

    from search.cluster import submit as submit_job

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
    from search.errors import user_error_types
    from search.interrupt import sigterm_as_sigint

    sigterm_as_sigint()  # until Ray starts (the search puts it back after ray.init)
    try:
        code = cli(standalone_mode=False)
    except typer.Exit as e:  # raised outside click's main (older typer)
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        from search.interrupt import Interrupted

        if isinstance(e, Interrupted):
            print(str(e), file=sys.stderr)
            sys.exit(130)
        if isinstance(e, _usage_error_types()) and hasattr(e, "show"):
            e.show()  # "Usage: ... Error: No such command 'dry-run'." as click prints it
            sys.exit(2)
        if isinstance(e, user_error_types()):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
