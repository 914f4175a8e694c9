"""`sparse-search submit --follow` against a real `ray start --head` cluster on loopback.

The head runs in its own session and is stopped by the test (SIGTERM to its process group,
then SIGKILL to anything left in the session, by PID): no gcs_server, raylet or agent of this
test survives it. Every port is chosen free (other Ray instances on the machine hold the
defaults, e.g. the agent's 52365).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from search.run.cluster import entrypoint, is_local_address

# A Ray head of its own (a cluster: one at a time, tests/conftest.py)
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("clusters")]

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
SPEC = """
name: submitted
data: {name: digits, val_fraction: 0.2, subset: 300}
constraints: {max_params: 2000}
search: {sampler: random, num_samples: 2, max_concurrent: 2, seed: 0}
train: {epochs: 2, batch_size: 64, optimizer: adamw, lr: 0.02}
space:
  stem: {width: {int: [2, 8]}}
  num_stages: 1
  stages: {width: {int: [4, 16]}, layers: 1}
"""
LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return {int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid}


def _listening(pids: set[int]) -> list[str]:
    """Local addresses that processes in ``pids`` listen on (TCP)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    addrs = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            addrs.append(line.split()[3])
    return addrs


@pytest.fixture()
def head() -> Iterator[tuple[str, int, Path]]:
    """A Ray head on 127.0.0.1 (job server included): (dashboard URL, session id, temp dir)."""
    temp = tempfile.mkdtemp(prefix="ssray", dir="/tmp")  # short: Ray's unix sockets live here
    dash = _free_port()
    ports = {f"--{k}": str(_free_port()) for k in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 (closed in finally)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray takes 127.0.0.1 as the node address, so every
    # server binds loopback (--node-ip-address=127.0.0.1 alone is replaced by the outward IP).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--disable-usage-stats", f"--temp-dir={temp}",
         *(f"{k}={v}" for k, v in ports.items())],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without the token): up
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 240 s"
                time.sleep(0.5)
        yield url, proc.pid, Path(temp)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 30
        while pids := _session_pids(proc.pid):  # workers and agents have their own groups
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert time.monotonic() < deadline, f"head processes survive: {pids}"
            time.sleep(0.2)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_follow_runs_the_search_on_a_loopback_cluster(head, tmp_path):
    url, sid, temp = head
    spec = tmp_path / "submitted.yaml"
    spec.write_text(SPEC)
    runs = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "submit", str(spec), "--address", url, "--follow",
         "--no-mlflow", "--json", "--storage", str(runs)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"job \S+: SUCCEEDED", lines[-1])
    summary = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
    assert summary["trials"] == 2 and summary["complete"]
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == runs and (run_dir / "results.csv").is_file()
    # The job's working dir held only the spec (not this repo or its virtualenv).
    unpacked = [p for p in temp.glob("session_*/runtime_resources/working_dir_files/*")
                if p.is_dir()]
    assert unpacked and all(sorted(os.listdir(p)) == ["spec.yaml"] for p in unpacked)
    # Everything the head started listens on loopback only.
    addrs = _listening(_session_pids(sid))
    assert addrs and all(a.startswith(LOOPBACK) for a in addrs), addrs


def test_submit_follow_of_a_failing_job_exits_1(head, tmp_path):
    """Through the installed console script: the job's search cannot find its data (exit 2 on
    the cluster), the job ends FAILED, and `submit --follow` says so and exits 1."""
    url, _sid, _temp = head
    spec = tmp_path / "failing.yaml"
    spec.write_text(SPEC.replace("data: {name: digits, val_fraction: 0.2, subset: 300}",
                                 "data: {name: mnist, path: /nonexistent/mnist.npz}"))
    cli = str(Path(sys.executable).with_name("sparse-search"))
    done = subprocess.run([cli, "submit", str(spec), "--address", url, "--follow", "--no-mlflow",
                           "--storage", str(tmp_path / "runs")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.fullmatch(r"job \S+: FAILED", done.stdout.strip().splitlines()[-1])
    assert "/nonexistent/mnist.npz: no such file" in done.stdout


def test_entrypoint_uses_this_python_locally_and_the_path_remotely():
    local = entrypoint(local=True, python=None, storage="/r", tracking_uri=None, mlflow=False,
                       as_json=True)
    assert local == f"{sys.executable} -m search.cli run spec.yaml --storage /r --no-mlflow --json"
    remote = entrypoint(local=False, python=None, storage=None, tracking_uri="http://m:5000",
                        mlflow=True, as_json=False)
    assert remote.endswith('sparse-search run spec.yaml --storage "$HOME/sparse-search/runs" '
                           "--tracking-uri http://m:5000")
    assert is_local_address("http://127.0.0.1:8265") and is_local_address("localhost:8265")
    assert not is_local_address("http://10.255.0.1:8265")
