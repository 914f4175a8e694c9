"""``sparse-search submit``: the same search as a Ray Job on a running cluster.

The job's working_dir is a fresh temp folder holding ONLY the resolved spec (CLI overrides
applied, a relative ``data.path`` made absolute): never this repository or its virtualenv,
which would be zipped and uploaded on every submit. The cluster must have sparse-search
installed; the entrypoint runs it with

- this very interpreter (``<sys.executable> -m search.cli run spec.yaml ...``) when the
  address is this machine: a job's shell PATH usually finds the system Python, not the venv;
- ``sparse-search run spec.yaml ...`` from the cluster's PATH otherwise;
- or ``--entrypoint-python /path/to/python`` (a cluster interpreter that has sparse-search).

Results land where the job can keep them: ``--storage`` (default ``./runs`` made absolute for
a local address, ``$HOME/sparse-search/runs`` on a remote head), and MLflow at
``--tracking-uri`` / ``$MLFLOW_TRACKING_URI`` (default: ``./mlflow.db`` made absolute locally,
``$HOME/sparse-search/mlflow.db`` remotely). Ray 2.60 clusters require a token: the client
sends ``$RAY_AUTH_TOKEN`` or ``~/.ray/auth_token`` (written by ``ray start``). A head
started seconds ago may answer "No available agent" until its job agent registers: submit
retries that for up to ``AGENT_WAIT_S`` seconds, says so once, then fails with one line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from search.errors import UserError
from search.rundir.layout import SPEC_FILE

REMOTE_HOME = "$HOME/sparse-search"  # expanded by the job's shell on the head node
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 1.0
# A fresh head's job server answers before its job agent has registered; until then every
# submit gets HTTP 500 "No available agent to submit job" (after the server's own 10 s wait).
NO_AGENT = "No available agent"
AGENT_WAIT_S = 90.0  # how long submit retries that, in seconds (a loaded head takes ~30)
AGENT_RETRY_S = 2.0


def is_local_address(address: str) -> bool:
    """The job server runs on this machine (loopback, or this host's own name/address)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    try:
        own = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        own = set()
    return host in own


def entrypoint(*, local: bool, python: str | None, storage: str | None,
               tracking_uri: str | None, mlflow: bool, as_json: bool) -> str:
    """The shell command the job runs (in its working dir, next to spec.yaml)."""
    if python is None and local:
        python = sys.executable
    cmd = (f"{shlex.quote(python)} -m search.cli" if python else "sparse-search")
    cmd += f" run {SPEC_FILE}"
    prefix = ""
    if storage is not None:
        cmd += f" --storage {shlex.quote(storage)}"
    elif local:
        cmd += f" --storage {shlex.quote(str(Path('runs').resolve()))}"
    else:
        cmd += f' --storage "{REMOTE_HOME}/runs"'
        prefix = f'mkdir -p "{REMOTE_HOME}" && '
    if not mlflow:
        cmd += " --no-mlflow"
    elif tracking_uri is not None:
        cmd += f" --tracking-uri {shlex.quote(tracking_uri)}"
    else:
        cmd += f' --tracking-uri "sqlite:///{REMOTE_HOME}/mlflow.db"'
        prefix = f'mkdir -p "{REMOTE_HOME}" && '
    if as_json:
        cmd += " --json"
    return prefix + cmd


def auth_headers() -> dict[str, str]:
    """The cluster token as an HTTP header: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (what ``ray start`` writes). Sent explicitly: Ray's client only adds it
    when token mode was on before Ray was first imported in this process."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit(
    spec_path: str | Path,
    *,
    address: str,
    overrides: dict[str, Any],
    storage: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
    as_json: bool = False,
    entrypoint_python: str | None = None,
    follow: bool = False,
    echo: Callable[[str], None] = print,
    agent_wait_s: float = AGENT_WAIT_S,
) -> tuple[str, str | None]:
    """Submit the search; returns (job id, final status if ``follow`` else None)."""
    from search.run.ray_runtime import QUIET_ENV
    from search.spec import load_spec
    from search.tracking import resolve_tracking_uri

    spec = load_spec(spec_path, **overrides)  # a bad spec fails here, not on the cluster
    if spec.search.initial:
        from search.space import check_initial

        check_initial(spec)  # so do initial points outside the space
    if spec.data.path is not None and not Path(spec.data.path).is_absolute():
        spec = dataclasses.replace(
            spec, data=spec.data.replace(path=str(Path(spec.data.path).resolve())))
    local = is_local_address(address)
    if mlflow and tracking_uri is None and local:
        tracking_uri = resolve_tracking_uri(None)  # absolute: the job runs in a temp folder
    env = {k: v for k, v in QUIET_ENV.items() if k != "PYTHONWARNINGS"}
    env.update({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_PYTHON_REFRESH": "quiet"})
    if tracking_uri is not None and mlflow:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = entrypoint(local=local, python=entrypoint_python, storage=storage,
                     tracking_uri=tracking_uri, mlflow=mlflow, as_json=as_json)
    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package ..." lines

    try:
        client = JobSubmissionClient(address, headers=auth_headers())
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--address {address}: no Ray job server answers there ({e})") from None
    with tempfile.TemporaryDirectory(prefix="sparse-search-job-") as tmp:
        (Path(tmp) / SPEC_FILE).write_text(spec.to_yaml())
        job_id = submit_when_ready(client, address=address, echo=echo, wait_s=agent_wait_s,
                                   entrypoint=cmd,
                                   runtime_env={"working_dir": tmp, "env_vars": env},
                                   metadata={"sparse_search.spec": spec.name})
    echo(f"submitted job {job_id} to {address}: {cmd}")
    if not follow:
        echo(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return job_id, None
    return job_id, follow_job(client, job_id, echo=echo)


def submit_when_ready(client: Any, *, address: str, echo: Callable[[str], None],
                      wait_s: float = AGENT_WAIT_S, **job: Any) -> str:
    """``client.submit_job(**job)``, retried while the head answers "No available agent" (a
    head just started), for at most ``wait_s`` seconds; then a UserError that says so."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:  # the SDK's "Request failed with status code 500: ..."
            if NO_AGENT not in str(e):
                raise
            if time.monotonic() + AGENT_RETRY_S > deadline:
                raise UserError(
                    f"--address {address}: the head's job agent did not come up in {wait_s:g} s"
                    f" (the job server still answers {NO_AGENT!r}); is the head node healthy?"
                    " see `ray status` and dashboard_agent.log in its session's logs/") from None
            if not told:
                echo(f"the head at {address} has no job agent yet ({NO_AGENT!r}): retrying "
                     f"for up to {wait_s:g} s")
                told = True
            time.sleep(AGENT_RETRY_S)


def follow_job(client: Any, job_id: str, *, echo: Callable[[str], None] = print,
               poll_s: float = POLL_S) -> str:
    """Print the job's log as it grows until the job ends; its final status."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        # Whole lines only while the job runs (a progress line may be half written).
        end = len(logs) if status in TERMINAL else logs.rfind("\n") + 1
        if end > shown:
            echo(logs[shown:end].rstrip("\n"))
            shown = end
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
