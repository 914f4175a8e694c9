"""Starting and stopping a light ``mlflow server`` (``sparse-search ui``, the test fixture).

One worker and no job runner (2 processes, not 15), in its own process group, stopped whole;
on Linux it gets SIGTERM when the process that started it dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search.errors import UserError
from search.tracking.store import UI_QUERY, client_for, latest_search, run_url


def wait_healthy(url: str, proc: subprocess.Popen, *, timeout: float) -> None:
    """Poll ``url``/health until it answers; UserError when the server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with code {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise UserError(f"mlflow server did not answer at {url} within {timeout:.0f} s")


def stop_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when its parent dies, even by SIGKILL.

    `mlflow server` stops its uvicorn worker on SIGTERM, so no server outlives a killed CLI.
    """
    import contextlib
    import ctypes
    import signal

    # Not Linux (no prctl): serve_ui's finally still stops the server on Ctrl-C.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def serve_ui(*, port: int, backend_store_uri: str, artifact_root: str,
             experiment: str | None = None, echo: Callable[[str], Any] = print) -> int:
    """Run `mlflow server` on 127.0.0.1 in the foreground (light: 1 worker, no job runner).

    Prints the runs list of the latest search once the server answers; Ctrl-C stops it.
    """
    import socket

    with socket.socket() as s:
        # SO_REUSEADDR as uvicorn binds: connections of a server just stopped linger in
        # TIME_WAIT on the port for ~60 s and would fail a plain bind; Linux still refuses
        # this bind while any socket listens there, which is what the check is for.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"--port {port} is not free on 127.0.0.1 ({e.strerror}): pick another") from None
    url = f"http://127.0.0.1:{port}"
    try:
        parent = latest_search(client_for(backend_store_uri), experiment)
        where = run_url(url, parent.info.experiment_id)
    except UserError:
        where = f"{url}/#/experiments{UI_QUERY}"
    # Its log goes to stderr, stdout keeps the URL.
    proc = start_light_server(port=port, backend_store_uri=backend_store_uri,
                              artifact_root=artifact_root, stdout=sys.stderr)
    try:
        wait_healthy(url, proc, timeout=180)
        echo(f"MLflow UI: {where}\n(serving {backend_store_uri}, artifacts {artifact_root}; "
             "Ctrl-C stops it)")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)


def start_light_server(*, port: int, backend_store_uri: str, artifact_root: str | Path,
                       stdout: Any, cwd: str | Path | None = None) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port in light mode, in its own process group.

    The defaults start 4 workers and a job runner (15 processes, ~3 GB): this is 2 processes,
    ~0.5 GB. The group is stopped whole by :func:`stop_server`, and by SIGTERM when the
    starting process dies (:func:`stop_with_parent`).
    """
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend_store_uri,
           "--default-artifact-root", str(artifact_root)]
    return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, cwd=cwd,
                            start_new_session=True, preexec_fn=stop_with_parent)


def stop_server(proc: subprocess.Popen, *, timeout: float = 20) -> None:
    """SIGTERM the server's process group (uvicorn worker included), SIGKILL after ``timeout``."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

