"""Shared fixtures, and the checks that keep the suite's kinds honest.

A test module declares its kind itself, once, with ``pytestmark`` (``make test-fast`` skips
the slow kinds):

- ``ray``: starts or attaches a Ray runtime (in-process, or a CLI search in a subprocess);
- ``slow``: many seconds of real work without Ray (process races, servers, published nets);
- ``browser``: drives headless Chromium against a real MLflow UI.

This file only checks the declarations: a test that asks for ``ray_session`` without the
``ray`` marker is refused at collection, and every test without it runs with ``RAY_TMPDIR``
pointed at a folder of its own, so a Ray it starts (in-process or in a child process) leaves
a session folder there and fails the test with its name; a test that leaves ``os.environ``
changed fails too, naming the keys. Under pytest-xdist each worker gets
its own Ray temp folder, so the workers' Rays never share a session folder.

Under pytest-xdist (``make test``: two workers, ``--dist loadgroup``) the tests of a module
run on one worker; the modules that start Ray clusters of several nodes declare
``pytest.mark.xdist_group("clusters")``, so no two clusters run at once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from search.errors import UserError
from search.tracking import start_light_server, stop_server, wait_healthy

KINDS = ("ray", "slow", "browser")
# The one finished search that read-only tests share (fixture ``finished_search``): digits,
# three objectives, a budget that refuses some proposals, four trials, tracked in sqlite.
FINISHED_SPEC = """
name: shared
data: {name: digits, val_fraction: 0.2, subset: 300}
objectives: {val_accuracy: max, nonzero_params: min, macs: min}
constraints: {max_params: 1200}
search: {sampler: random, num_samples: 4, max_concurrent: 2, seed: 1}
train: {epochs: 2, batch_size: 32, optimizer: adamw, lr: 0.02}
space:
  stem: {width: {int: [2, 12]}}
  num_stages: 1
  stages: {width: {int: [4, 32]}, layers: {int: [1, 2]}}
"""


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and "RAY_TMPDIR" not in os.environ:
        # Short (Ray's unix sockets live under it: 107 bytes at most) and one per worker.
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"rt-{worker}-", dir="/tmp")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (its own hook)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    undeclared = [item.nodeid for item in items
                  if "ray_session" in getattr(item, "fixturenames", ())
                  and item.get_closest_marker("ray") is None]
    if undeclared:
        raise pytest.UsageError(
            "these tests use the ray_session fixture but their module does not declare "
            "`pytestmark = pytest.mark.ray`:\n  " + "\n  ".join(undeclared))
    # pytest-xdist (--dist loadgroup, `make test`): a module's tests stay on one worker, so a
    # module-scoped fixture (a finished search, a server) is built once; a module that
    # declares a group of its own (``xdist_group``) shares a worker with that group's others.
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


@pytest.fixture(autouse=True)
def _ray_only_where_declared(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test not marked ``ray`` must not start one: any Ray it (or a child) starts lands in
    a fresh RAY_TMPDIR, and a session folder there fails the test."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        started = sorted(p.name for p in Path(tmp, "ray").glob("session_*"))
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            pytest.fail(f"{request.node.nodeid} started Ray ({started[0]}) but its module does "
                        "not declare `pytestmark = pytest.mark.ray`", pytrace=False)


# Variables the product's commands read (a CLI a later test starts inherits them). Libraries
# add their own on first import (torch's KMP_*, Ray's PYTHONBREAKPOINT, MLflow's quiet
# switches): set once per process, not by a test, so an added variable outside this list passes.
READ_BY_CHILDREN = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
                    "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RAY_ADDRESS", "SPARSE_SEARCH_",
                    "AWS_")


@pytest.fixture(autouse=True)
def _environment_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that changes or removes a variable of ``os.environ``, or adds one the product's
    commands read, fails naming them: every later test on the worker, and every child it
    starts, would inherit it (``mlflow.set_tracking_uri`` sets $MLFLOW_TRACKING_URI, and a CLI
    started later then tracked into another store: CI's corrupt-store failure)."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k != "PYTEST_CURRENT_TEST"
                     and not k.startswith("_")  # libraries' own (_MLFLOW_TELEMETRY_*)
                     and (k in before or k.startswith(READ_BY_CHILDREN)))
    if changed:
        for k in changed:  # the next test starts clean either way
            if k in before:
                os.environ[k] = before[k]
            else:
                os.environ.pop(k, None)
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        pytest.fail(f"{request.node.nodeid} left the environment changed ({shown}): restore it "
                    "(monkeypatch.setenv / delenv)", pytrace=False)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray (2 CPUs, loopback, quiet: as a search starts it) for every test that can
    share it; started on first use, stopped at the end of the session (one per xdist worker)."""
    import ray

    from search.run.ray_runtime import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:<port>
    backend_store_uri: str  # sqlite:///<tmp>/mlflow.db
    artifact_root: Path
    log: Path  # the server's stdout + stderr


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` on a free loopback port, sqlite in tmp, light mode (1 worker).

    Started in its own process group and stopped with os.killpg, so its uvicorn worker goes too.
    """
    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = MlflowServer(
        url=f"http://127.0.0.1:{port}",
        backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifact_root=root / "mlruns",
        log=root / "server.log",
    )
    with server.log.open("w") as log:
        proc = start_light_server(port=port, backend_store_uri=server.backend_store_uri,
                                  artifact_root=server.artifact_root, stdout=log, cwd=root)
    try:
        # ~6 s idle; much longer on a loaded 2-core box
        try:
            wait_healthy(server.url, proc, timeout=180)
        except UserError as e:
            pytest.fail(f"{e}:\n{server.log.read_text()}")
        yield server
    finally:
        stop_server(proc)


@dataclass(frozen=True)
class FinishedSearch:
    """A search that ended complete, as `sparse-search run --json` left it."""

    run_dir: Path
    tracking_uri: str  # sqlite:///<cwd>/mlflow.db
    cwd: Path  # where it ran: spec.yaml, mlflow.db, mlruns/
    stdout: str  # the front table, then the --json summary as the last line
    stderr: str
    experiment: str = "shared"  # FINISHED_SPEC's name: the MLflow experiment

    def copy(self, dest: Path) -> Path:
        """A copy of the run dir to change (its mlflow.json still names the shared store:
        give commands that would track into it --no-mlflow or a store of their own)."""
        return Path(shutil.copytree(self.run_dir, dest / self.run_dir.name))


@pytest.fixture(scope="session")
def finished_search(tmp_path_factory: pytest.TempPathFactory) -> FinishedSearch:
    """One real `sparse-search run` through the console script (Ray, MLflow sqlite), shared
    by the tests that only read a finished search; a test that changes a run dir works on
    :meth:`FinishedSearch.copy`. Modules that use it declare
    ``pytest.mark.xdist_group("finished_search")``, so under xdist it is made once."""
    cwd = tmp_path_factory.mktemp("finished_search")
    (cwd / "spec.yaml").write_text(FINISHED_SPEC)
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    script = str(Path(sys.executable).with_name("sparse-search"))
    done = subprocess.run([script, "run", "spec.yaml", "--json", "--storage", str(cwd / "runs"),
                           "--tracking-uri", uri], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["complete"], summary
    return FinishedSearch(Path(summary["run_dir"]), uri, cwd, done.stdout, done.stderr)
