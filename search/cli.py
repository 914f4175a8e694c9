"""`sparse-search` command line (typer).

Every command turns bad input into one clear message and exit code 2 (no traceback):
raise :class:`search.errors.UserError` (or an ``ArchError``/``SpecError``) and ``main`` does
the rest. Commands stay thin: the work lives in the modules they call.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from search.errors import run_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the best small CNN for every parameter budget (Ray Tune + Optuna + MLflow).",
)


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


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
