"""Shared fixtures, and the checks that keep the suite's kinds honest.

A test module declares its kind itself, once, with ``pytestmark`` (``make test-fast`` skips
the slow kinds):

- ``ray``: starts or attaches a Ray runtime (in-process, or a CLI search in a subprocess);
- ``slow``: many seconds of real work without Ray (process races, servers, published nets);
- ``browser``: drives headless Chromium against a real MLflow UI.

This file only checks the declarations: a test that asks for ``ray_session`` without the
``ray`` marker is refused at collection, and every test without it runs with ``RAY_TMPDIR``
pointed at a folder of its own, so a Ray it starts (in-process or in a child process) leaves
a session folder there and fails the test with its name. Under pytest-xdist each worker gets
its own Ray temp folder, so the workers' Rays never share a session folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from search.errors import UserError
from search.tracking import start_light_server, stop_server, wait_healthy

KINDS = ("ray", "slow", "browser")


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and "RAY_TMPDIR" not in os.environ:
        # Short (Ray's unix sockets live under it: 107 bytes at most) and one per worker.
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"rt-{worker}-", dir="/tmp")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    undeclared = [item.nodeid for item in items
                  if "ray_session" in getattr(item, "fixturenames", ())
                  and item.get_closest_marker("ray") is None]
    if undeclared:
        raise pytest.UsageError(
            "these tests use the ray_session fixture but their module does not declare "
            "`pytestmark = pytest.mark.ray`:\n  " + "\n  ".join(undeclared))


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


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray (2 CPUs, loopback, quiet: as a search starts it) for every test that can
    share it; started on first use, stopped at the end of the session (one per xdist worker)."""
    import ray

    from search.ray_runtime import init_ray

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
