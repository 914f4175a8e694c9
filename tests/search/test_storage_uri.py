"""Run directories on a storage URI (search/storage.py) against a real S3-protocol server on
loopback: moto's standalone server, started here in its own session and stopped by its PID
(as Ray's own tests do, ``ray._common.test_utils.simulate_s3_bucket``), reached through
``s3://BUCKET/PREFIX?endpoint_override=http://127.0.0.1:PORT&region=...``.

One search is SIGKILLed mid-way and resumed from the URI alone (a fresh local cache); then
``pareto`` and ``export`` read it with no local run dir. Bad storage arguments exit 2.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import session_pids

pytestmark = pytest.mark.ray  # the search tests start Ray (tests/conftest.py's kinds)

REPO = Path(__file__).resolve().parents[2]
BUCKET = "sparse-search-test"
REGION = "us-east-1"
# Four small trials, two at a time, three epochs each (a checkpoint per epoch): killed once two
# are recorded on the URI, the others are in flight. Lamarckian after two: the later trials are
# children that read their parent's weights from the bucket (from a resumed driver too).
SPEC = """
name: ons3
data: {name: digits, val_fraction: 0.2, subset: 300}
constraints: {max_params: 3000}
search: {sampler: lamarckian, num_samples: 4, max_concurrent: 2, seed: 3,
         lamarckian: {warmup: 2, explore: 0.0, child_epochs: 2}}
train: {epochs: 3, batch_size: 32, optimizer: adamw, lr: 0.02}
space:
  stem: {width: {int: [4, 12]}}
  num_stages: 1
  stages: {width: {int: [8, 24]}, layers: 1}
"""


@dataclass(frozen=True)
class S3:
    endpoint: str  # http://127.0.0.1:<port>
    env: dict[str, str]  # credentials and region for every process that talks to it

    def uri(self, path: str, bucket: str = BUCKET) -> str:
        return f"s3://{bucket}/{path}?endpoint_override={self.endpoint}&region={REGION}"

    def fs(self) -> Any:  # pyarrow.fs.S3FileSystem
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(endpoint_override=self.endpoint, region=REGION, scheme="http",
                            access_key="testing", secret_key="testing")

    def files(self, prefix: str) -> dict[str, int]:
        """Every object under BUCKET/prefix: relative path -> size."""
        from pyarrow.fs import FileSelector, FileType

        base = f"{BUCKET}/{prefix}".rstrip("/")
        infos = self.fs().get_file_info(FileSelector(base, recursive=True, allow_not_found=True))
        return {i.path[len(base) + 1:]: i.size for i in infos if i.type == FileType.File}

    def read(self, path: str) -> bytes:
        with self.fs().open_input_stream(f"{BUCKET}/{path}") as f:
            return f.readall()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_session(proc.pid)


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in a session this test started (Ray workers, agents)."""
    deadline = time.monotonic() + 30
    while pids := session_pids(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes of session {sid} survive: {pids}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """moto's S3 server on a free loopback port with one bucket; stopped by PID at the end."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "moto's server exited"
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto's server did not answer in 60 s"
                time.sleep(0.2)
        from pyarrow.fs import S3FileSystem

        S3FileSystem(endpoint_override=endpoint, region=REGION, scheme="http",
                     access_key="testing", secret_key="testing",
                     allow_bucket_creation=True).create_dir(BUCKET)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
        yield S3(endpoint, env)
    finally:
        _stop(server)
        log.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.cli", *args]


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_uri_parts_and_the_mirror_sends_what_changed(s3: S3, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from search.rundir import storage
    from search.rundir.layout import RunDir, write_atomic

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(k, s3.env[k])  # this process talks to the server too

    assert storage.parse(f"file://{tmp_path}/runs") == tmp_path / "runs"
    assert not storage.is_uri(f"file://{tmp_path}") and storage.is_uri(s3.uri("runs"))
    root = storage.parse(s3.uri("mirror"))
    run_uri = root.child("r-1")
    assert run_uri.uri == s3.uri("mirror/r-1") and run_uri.path == f"{BUCKET}/mirror/r-1"
    local = tmp_path / "r-1"
    (local / "trials" / "0").mkdir(parents=True)
    run = RunDir(local, uri=run_uri.uri)
    mirror = storage.attach(run)
    try:
        (local / "trials" / "0" / "model.pt").write_bytes(b"w" * 10)  # not via write_atomic
        write_atomic(local / "trials" / "0" / "result.json", "{}")  # pushes the folder
        assert s3.files("mirror/r-1") == {"trials/0/model.pt": 10, "trials/0/result.json": 2}
        assert mirror.push() == 0  # nothing changed
        write_atomic(local / "results.csv", "a\n1\n")
        assert s3.files("mirror/r-1")["results.csv"] == 4
        # Another command downloading over a local copy in use refuses (it would delete it).
        with pytest.raises(storage.UserError, match="working in it"):
            storage.download(run_uri, local)
        assert (local / "results.csv").is_file()
    finally:
        assert mirror.close() is None
    copy = tmp_path / "copy"
    assert storage.download(run_uri, copy) == 3 and (copy / "results.csv").read_text() == "a\n1\n"
    assert storage.read_file(run_uri.uri, "trials/0/model.pt") == b"w" * 10


def test_bad_storage_exits_2_naming_it_and_leaves_nothing(s3: S3, tmp_path: Path) -> None:
    spec = tmp_path / "ons3.yaml"
    spec.write_text(SPEC)
    cache = tmp_path / "cache"
    env = {**s3.env, "SPARSE_SEARCH_RUNS_CACHE": str(cache)}
    before = s3.files("")
    for storage, named in (("nosuch://x/runs", "nosuch://x/runs"),
                           ("s3://", "no bucket named"),
                           (s3.uri("runs", bucket="no-such-bucket"), "'no-such-bucket'")):
        res = _run(["run", str(spec), "--no-mlflow", "--storage", storage], env, tmp_path)
        assert res.returncode == 2, (storage, res.stderr[-2000:])
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], res.stderr
        assert "Traceback" not in res.stderr
    # A run dir URI that is not one: resume says so (exit 2).
    res = _run(["resume", s3.uri("runs/nothing-here")], env, tmp_path)
    assert res.returncode == 2 and "no such run directory" in res.stderr, res.stderr[-2000:]
    assert s3.files("") == before  # nothing written to the bucket
    assert not cache.exists() and not (tmp_path / "runs").exists()


def test_run_on_s3_sigkilled_resumes_from_the_uri_alone(s3: S3, tmp_path: Path) -> None:
    prefix = f"runs-{tmp_path.name}"  # its own: the bucket outlives one test
    spec = tmp_path / "ons3.yaml"
    spec.write_text(SPEC)
    db = tmp_path / "mlflow.db"
    cache1, cache2, cache3 = (tmp_path / f"cache{i}" for i in (1, 2, 3))
    log = (tmp_path / "run.log").open("w")
    run = subprocess.Popen(_cli("run", str(spec), "--storage", s3.uri(prefix), "--tracking-uri",
                                f"sqlite:///{db}"),
                           env={**s3.env, "SPARSE_SEARCH_RUNS_CACHE": str(cache1)}, cwd=tmp_path,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert run.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'run.log').read_text()}"
            assert time.monotonic() < deadline, "two trials did not reach the bucket in time"
            names = {p.split("/")[0] for p in s3.files(prefix)}
            if len(names) == 1:
                name = names.pop()
                if "results.csv" in (files := s3.files(f"{prefix}/{name}")) and \
                        len(_rows(s3.read(f"{prefix}/{name}/results.csv").decode())) >= 2:
                    break
            time.sleep(0.2)
    finally:
        _stop(run)
        log.close()
    before = {r["trial_key"]: json.loads(s3.read(f"{prefix}/{name}/trials/{r['trial_key']}/result.json"))
              for r in _rows(s3.read(f"{prefix}/{name}/results.csv").decode())}
    assert 2 <= len(before) < 4
    assert "outcome.json" not in files  # the driver died: no outcome
    uri = s3.uri(f"{prefix}/{name}")

    # Resume from the URI alone: the first driver's local copy is gone, a fresh cache is used.
    import shutil

    shutil.rmtree(cache1)
    res = _run(["resume", uri, "--json"], {**s3.env, "SPARSE_SEARCH_RUNS_CACHE": str(cache2)},
               tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == uri and summary["complete"] and summary["trials"] == 4
    assert f"run dir: {uri}" in res.stdout

    files = s3.files(f"{prefix}/{name}")
    rows = _rows(s3.read(f"{prefix}/{name}/results.csv").decode())
    keys = [r["trial_key"] for r in rows]
    assert len(keys) == len(set(keys)) == 4, keys
    assert {r["status"] for r in rows} == {"TERMINATED"}
    children = [r for r in rows if r["parent"]]  # their parents' model.pt came from the bucket
    assert children and all(r["parent"] in keys and float(r["inherited_fraction"]) > 0
                            for r in children), rows
    for needed in ("spec.yaml", "optuna.journal", "pareto.csv", "mlflow.json", "ray/tuner.pkl",
                   *(f"trials/{k}/{f}" for k in keys for f in ("result.json", "model.pt"))):
        assert files.get(needed), f"{needed} is not in the bucket: {sorted(files)}"
    assert any(p.startswith("ray/trial_") and "/checkpoint_" in p for p in files)  # Ray's own
    assert json.loads(s3.read(f"{prefix}/{name}/outcome.json"))["complete"] is True
    for key, rec in before.items():  # recorded before the kill: neither rerun nor re-recorded
        after = json.loads(s3.read(f"{prefix}/{name}/trials/{key}/result.json"))
        assert (after["trial_id"], after["finished_at"]) == (rec["trial_id"], rec["finished_at"])
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("ons3").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sparse_search.role") == "search"]
    assert [r.info.status for r in parents] == ["FINISHED"]
    # MLflow names where the run dir lives (the URI), not the driver's local copy of it.
    assert parents[0].data.tags["sparse_search.run_dir"] == uri
    assert uri in parents[0].data.tags["mlflow.note.content"]
    children = {r.data.tags["sparse_search.trial_key"]: r.info.status for r in runs
                if r.data.tags.get("sparse_search.role") == "trial"}
    assert all(children[k] == "FINISHED" for k in keys) and "RUNNING" not in children.values()

    # pareto and export straight from the URI: no local run dir, nothing copied (fresh cache).
    env3 = {**s3.env, "SPARSE_SEARCH_RUNS_CACHE": str(cache3)}
    res = _run(["pareto", uri, "--json"], env3, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    front = json.loads(res.stdout)["front"]
    expected = _rows(s3.read(f"{prefix}/{name}/pareto.csv").decode())
    assert [str(p["trial_key"]) for p in front] == [r["trial_key"] for r in expected] != []
    out = tmp_path / "front0.pt"
    res = _run(["export", uri, str(front[0]["trial_key"]), "--format", "state_dict", "-o",
                str(out)], env3, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    import torch

    state = torch.load(out, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert not cache3.exists()

    # file:// names a local folder: the resume's local copy is a complete run dir.
    local = next(cache2.glob(f"*/{name}"))
    res = _run(["pareto", f"file://{local}"], env3, tmp_path)
    assert res.returncode == 0 and f"Pareto front ({len(expected)})" in res.stdout, res.stderr


def test_a_run_dir_on_s3_has_one_owner_across_machines(s3: S3, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease at the URI (search/owner.py), where no flock reaches: another machine's live
    lease refuses `resume` in one line (exit 2, nothing changed); a stale one, or one of this
    machine whose process is gone (SIGKILL), is taken over; two takers: the second is refused;
    the owner's end removes it."""
    from search.errors import UserError
    from search.rundir import storage as st
    from search.rundir.owner import LEASE_FILE, LEASE_S, take_lease

    for key, value in s3.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    prefix = f"leases-{tmp_path.name}/r1"
    run = st.parse(s3.uri(prefix), what="run directory")
    fs = s3.fs()

    def put(rel: str, data: bytes) -> None:
        with fs.open_output_stream(f"{BUCKET}/{prefix}/{rel}") as f:
            f.write(data)

    put("spec.yaml", SPEC.encode())  # what `resume` needs before it takes the lease
    put("ray/tuner.pkl", b"not read: the lease is refused first")
    other = {"pid": 4242, "host": "another-machine", "started": "2026-12-06T10:00:00+00:00",
             "command": "sparse-search resume s3://...", "token": "theirs"}
    put(LEASE_FILE, json.dumps({**other, "renewed": time.time()}).encode())
    done = _run(["resume", run.uri], {**s3.env, "SPARSE_SEARCH_RUNS_CACHE": str(tmp_path / "c")},
                tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {run.uri} is in use by PID 4242 on another-machine (started "
                           "2026-12-06T10:00:00+00:00"), line
    assert json.loads(s3.read(f"{prefix}/{LEASE_FILE}"))["token"] == "theirs"  # untouched

    put(LEASE_FILE, json.dumps({**other, "renewed": time.time() - LEASE_S - 1}).encode())
    mine = take_lease(run, shown=run.uri)  # stale: taken over
    assert json.loads(s3.read(f"{prefix}/{LEASE_FILE}"))["token"] == mine.mine["token"]
    with pytest.raises(UserError, match=rf"is in use by PID {os.getpid()} on "):
        take_lease(run, shown=run.uri)  # a second taker, while it is renewed
    mine.release()
    assert LEASE_FILE not in s3.files(prefix)

    dead = subprocess.Popen(["true"])  # a PID of this machine that no longer runs
    dead.wait()
    put(LEASE_FILE, json.dumps({**other, "host": socket.gethostname(), "pid": dead.pid,
                                "renewed": time.time()}).encode())
    again = take_lease(run, shown=run.uri)  # SIGKILLed owner of this machine: at once
    again.release()
