"""Shared fixtures."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from search.errors import UserError
from search.tracking import start_light_server, stop_server, wait_healthy


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
