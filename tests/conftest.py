"""Shared fixtures, and the markers that sort the suite (``make test-fast`` skips the slow kinds).

Markers, set here by module (so a test file need not repeat them):

- ``ray``: starts or attaches a Ray runtime (in-process, or a CLI search in a subprocess);
- ``slow``: many seconds of real work without Ray (process races, servers, published nets);
- ``browser``: drives headless Chromium against a real MLflow UI.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from search.errors import UserError
from search.tracking import start_light_server, stop_server, wait_healthy

RAY_MODULES = {
    "test_old_rundir", "test_multinode", "test_finalize", "test_cli_finalize",
    "test_tuner", "test_resume", "test_cluster", "test_moasha", "test_tracking", "test_export",
    "test_cli_run", "test_cli_newcomer", "test_trial", "test_cli_data",
}
SLOW_MODULES = {"test_tracking_store", "test_published", "test_deploy", "test_cli_train",
                "test_transfer", "test_pruning"}
BROWSER_MODULES = {"test_ui_browser"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        if module in RAY_MODULES or "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if module in BROWSER_MODULES:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray (2 CPUs, loopback, quiet: as a search starts it) for every test that can
    share it; started on first use, stopped at the end of the session."""
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
