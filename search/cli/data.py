"""`sparse-search data ...`: the dataset cache (list, fetch, import, path).

Registered by search/cli/commands.py as ``app.add_typer(data_app, name="data")``. Cheap to import (no
torch or numpy at module level): the commands import :mod:`trainables.data.cache` themselves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from search.errors import UserError

__all__ = ["data_app"]

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The dataset cache: mnist, fashion-mnist, cifar10 and cifar100 by name.",
)


def _check_name(name: str) -> None:
    from trainables.data.cache import DATASETS

    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@data_app.command("path")
def path_cmd() -> None:
    """Print the cache folder ($SPARSE_SEARCH_DATA, else the per-user cache dir)."""
    from trainables.data.cache import cache_dir

    typer.echo(str(cache_dir()))


@data_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Show the cache folder and the datasets it holds (read from file headers)."""
    from trainables.data.cache import cache_dir, cached

    folder, entries = cache_dir(), cached()
    if as_json:
        typer.echo(json.dumps({"cache_dir": str(folder), "datasets": [e.to_dict() for e in entries]}))
        return
    typer.echo(f"cache {folder}")
    if not entries:
        typer.echo("(empty: `sparse-search data fetch NAME` downloads one, "
                   "`sparse-search data import NAME PATH` copies one in)")
        return
    rows = [("name", "train", "test", "size", "file")]
    for e in entries:
        counts = ("?", "?") if e.n_train is None else (str(e.n_train), str(e.n_test))
        rows.append((e.name, *counts, _mb(e.size_bytes), e.file.name + (f"  {e.note}" if e.note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        typer.echo("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:4], widths[1:], strict=True)),
                              r[4]]))


@data_app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(..., help="mnist | fashion-mnist | cifar10 | cifar100"),
    force: bool = typer.Option(False, "--force", help="download again even when cached"),
) -> None:
    """Download a dataset into the cache (md5-checked; $SPARSE_SEARCH_DATA_MIRROR for a mirror)."""
    _check_name(name)
    from trainables.data.cache import cache_file, cached, fetch

    if not force and cache_file(name).is_file():
        entry = next(e for e in cached() if e.name == name)
        typer.echo(f"{name}: already cached at {entry.file} ({entry.n_train} train, "
                   f"{entry.n_test} test, {_mb(entry.size_bytes)}); --force fetches it again")
        return
    start = time.monotonic()
    entry = fetch(name)
    typer.echo(f"{name}: wrote {entry.file} ({entry.n_train} train, {entry.n_test} test, "
               f"{_mb(entry.size_bytes)}) in {time.monotonic() - start:.1f} s")


@data_app.command("import")
def import_cmd(
    name: str = typer.Argument(..., help="mnist | fashion-mnist | cifar10 | cifar100"),
    source: Path = typer.Argument(..., help="a Keras-layout .npz, a torchvision root folder, or "
                                            "an image folder (train/<class>/*, test/<class>/*)"),
) -> None:
    """Copy a dataset you already have into the cache (validated, then written atomically)."""
    _check_name(name)
    from trainables.data.cache import import_dataset

    start = time.monotonic()
    entry = import_dataset(name, source)
    typer.echo(f"{name}: wrote {entry.file} from {source} ({entry.n_train} train, "
               f"{entry.n_test} test, {_mb(entry.size_bytes)}) in {time.monotonic() - start:.1f} s")
    if entry.note:
        typer.echo(f"note: {entry.note}")
