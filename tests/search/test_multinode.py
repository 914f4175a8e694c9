"""Searches on a real multi-node Ray cluster on this machine (tests/cluster_harness.py).

One cluster for the module, loopback only, token auth, a temp dir per node: a head (2 CPUs),
node 1 (2 CPUs and ``accel: 1``) and node 2 (2 CPUs). The nodes join while a first job, whose
data is missing, is submitted the moment the head's job server answers (a fresh head: its job
agent may not be up yet). Every search goes through the installed console script:
``sparse-search run --address 127.0.0.1:<gcs>`` (a user attaching to a head they started by
hand) and ``sparse-search submit --follow --address http://127.0.0.1:<dashboard>`` (a Ray Job),
both of the same space. The last test on it loses node 2 mid-search.

Two tests start a cluster of their own, as users do: two nodes started as Ray's docs start them
(the joining node shares the head's session folder) taking a submitted search with MLflow on;
and Ray's fake multi-node autoscaler growing from no worker node while a search waits.

The submitted search's run dir is on S3: moto's standalone S3 server runs INSIDE the cluster's
network namespace (host loopback is not reachable from there), started with the harness's
nsenter and stopped by its PID at the end; every cluster process has the dummy credentials
(workers on both nodes write checkpoints to the bucket).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster_harness import LoopbackCluster, available, session_pids

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("clusters"),
              pytest.mark.skipif(available() is not None,
                                 reason=f"no network namespaces: {available()}")]

CLI = str(Path(sys.executable).with_name("sparse-search"))
SPEC = """
name: {name}
data: {data}
constraints: {{max_params: 2000}}
search: {{sampler: random, num_samples: {n}, max_concurrent: 2, seed: 0, max_failures: 2}}
train: {{epochs: {epochs}, batch_size: 64, optimizer: adamw, lr: 0.02}}
resources: {resources}
space:
  stem: {{width: {{int: [2, 8]}}}}
  num_stages: 1
  stages: {{width: {{int: [4, 16]}}, layers: 1}}
"""
MISSING = "/nonexistent/mnist.npz"
# 2 CPUs per trial, 2 at a time, nodes of 2 CPUs: no node holds two, so two nodes run them,
# if the first trial outlasts the start of the second one's actor: a finished trial's warm
# actor takes a trial whose actor has not started yet (Tune's reuse_actors), and a worker
# process spawned on a loaded machine took longer than a 4 s trial once (CI rehearsal 5).
# So two trials of ~12 s each (24 epochs), not four of ~4 s: one round, and a wide margin.
SPREAD = {"resources": "{cpu: 2}", "n": 2, "epochs": 24, "subset": 600}
# moto's S3 server in the namespace: a port outside the harness's Ray ranges (40001, 41000-41299,
# 46379, 48265), taken before any node starts.
S3_PORT = 45900
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
BUCKET = "multinode"
REGION = "us-east-1"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
S3_FS = ("from pyarrow.fs import S3FileSystem, FileSelector, FileType\n"
         f"fs = S3FileSystem(endpoint_override={S3_ENDPOINT!r}, region={REGION!r}, "
         "scheme='http', access_key='testing', secret_key='testing', "
         "allow_bucket_creation=True)\n")


@dataclass(frozen=True)
class Done:
    """A console-script run that ended: exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackCluster, Done]]:
    """The cluster, and the failing job submitted to its fresh head while the nodes join;
    moto's S3 server (one bucket) in its namespace."""
    tmp = tmp_path_factory.mktemp("fresh")
    spec = tmp / "failing.yaml"
    spec.write_text(SPEC.format(name="failing", data=f"{{name: mnist, path: {MISSING}}}",
                                n=2, epochs=1, resources="{cpu: 1}"))
    # Every cluster process: S3 credentials, and the drivers' local copies of a run dir on a
    # URI under the cluster's folder (not ~/.cache).
    c = LoopbackCluster(env={**S3_ENV, "SPARSE_SEARCH_RUNS_CACHE": str(tmp / "cache")})
    moto = None
    try:
        with open(tmp / "moto.log", "w") as log:
            moto = c.popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                            str(S3_PORT)], stdout=log, stderr=subprocess.STDOUT)
        c.start_head(num_cpus=2, wait=False)
        c.wait_job_server()
        with open(tmp / "out", "w") as o, open(tmp / "err", "w") as e:
            job = c.popen([CLI, "submit", str(spec), "--address", c.dashboard_url, "--follow",
                           "--no-mlflow", "--storage", str(tmp / "runs")],
                          cwd=tmp, stdout=o, stderr=e)
        c.add_node(num_cpus=2, resources={"accel": 1})  # they join while the job runs
        c.add_node(num_cpus=2)
        try:
            job.wait(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
        _make_bucket(c, moto, tmp / "moto.log")
        yield c, Done(job.returncode, (tmp / "out").read_text(), (tmp / "err").read_text())
    finally:
        try:
            c.stop()
        finally:
            if moto is not None:
                _stop_session(moto)
    assert not any(n.pids() for n in c.nodes)


def _make_bucket(c: LoopbackCluster, moto: subprocess.Popen, log: Path) -> None:
    """Wait for moto's server (up to 60 s), then create the bucket, from inside the namespace."""
    assert moto.poll() is None, log.read_text()[-2000:]
    c.python("import time, urllib.request\n"
             "deadline = time.monotonic() + 60\n"
             "while True:\n"
             "    try:\n"
             f"        urllib.request.urlopen({S3_ENDPOINT!r}, timeout=2).close(); break\n"
             "    except OSError:\n"
             "        assert time.monotonic() < deadline, 'moto did not answer in 60 s'\n"
             "        time.sleep(0.2)\n"
             f"{S3_FS}fs.create_dir({BUCKET!r})\n", timeout=90)


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session, then anything left in that session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while pids := session_pids(proc.pid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"moto's processes survive: {pids}"
        time.sleep(0.2)


def _s3_files(c: LoopbackCluster, prefix: str) -> dict[str, int]:
    """Every object under BUCKET/prefix (relative path -> size), listed inside the namespace."""
    base = f"{BUCKET}/{prefix}".rstrip("/")
    out = c.python(f"{S3_FS}import json\n"
                   f"infos = fs.get_file_info(FileSelector({base!r}, recursive=True))\n"
                   f"print(json.dumps({{i.path[{len(base) + 1}:]: i.size for i in infos"
                   " if i.type == FileType.File}))\n")
    return json.loads(out.strip().splitlines()[-1])


def _s3_read(c: LoopbackCluster, path: str) -> str:
    out = c.python(f"{S3_FS}import sys\n"
                   f"sys.stdout.write(fs.open_input_stream({f'{BUCKET}/{path}'!r}).readall()"
                   ".decode())\n")
    return out


@pytest.fixture(scope="module")
def cluster(started: tuple[LoopbackCluster, Done]) -> LoopbackCluster:
    return started[0]


def _spec(tmp: Path, name: str, *, resources: str = "{cpu: 2}", n: int = 4, epochs: int = 2,
          subset: int = 300) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, resources=resources, n=n, epochs=epochs,
                                data=f"{{name: digits, val_fraction: 0.2, subset: {subset}}}"))
    return path


def _run(cluster: LoopbackCluster, spec: Path, tmp: Path, *extra: str):
    return cluster.run([CLI, "run", str(spec), "--address", cluster.gcs_address, "--no-mlflow",
                        "--json", "--storage", str(tmp / "runs"), *extra], timeout=600, cwd=tmp)


def _rows(done: Done | subprocess.CompletedProcess) -> tuple[dict, list[dict[str, str]]]:
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    with open(Path(summary["run_dir"]) / "results.csv") as f:
        return summary, list(csv.DictReader(f))


def _why(done) -> str:
    return done.stdout[-3000:] + done.stderr[-5000:]


def test_everything_listens_on_loopback_only(cluster):
    out = cluster.run(["ss", "-ltnH"]).stdout
    addrs = [line.split()[3] for line in out.splitlines()]
    assert addrs and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))
                         for a in addrs), addrs
    assert len({n.node_id for n in cluster.nodes}) == 3 and all(n.node_id for n in cluster.nodes)


def test_a_spec_asking_what_no_node_has_is_refused_at_start(cluster, tmp_path):
    spec = _spec(tmp_path, "tpu", resources="{cpu: 1, custom: {tpu: 1}}")
    done = _run(cluster, spec, tmp_path)
    assert done.returncode == 2, _why(done)
    assert "more than any node has" in done.stderr and "3 nodes" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_custom_resource_places_trials_only_on_the_node_that_has_it(cluster, tmp_path):
    done = _run(cluster, _spec(tmp_path, "accel", resources="{cpu: 1, custom: {accel: 0.25}}"),
                tmp_path)
    assert done.returncode == 0, _why(done)
    assert "up to 2 at once on 1 of the 3 nodes" in done.stderr, done.stderr[-2000:]
    _summary, rows = _rows(done)
    accel = cluster.nodes[1].node_id
    assert len(rows) == 4 and {r["node"] for r in rows} == {accel}, rows


def _spread(cluster: LoopbackCluster, rows: list[dict[str, str]],
            before: dict[str, str] | None) -> set[str]:
    """The trials' nodes (results.csv): two at least, all of them this cluster's, and, given
    ``before``, Ray's state API agrees (this search's trial actors, new since then, ran there)."""
    ids = {n.node_id for n in cluster.nodes}
    nodes = {r["node"] for r in rows}
    assert nodes <= ids and len(nodes) >= 2, (nodes, ids)
    if before is None:
        return nodes
    actors = {a: n for a, n in cluster.trial_actors().items() if a not in before}
    assert nodes <= set(actors.values()), (nodes, actors)
    return nodes


def test_run_from_a_vanishing_folder_spreads_trials_over_nodes(cluster, tmp_path):
    """``run --address``: relative spec, data-free digits and ``--storage ../runs`` given from
    a folder that is deleted once the search trains (as Ray's runtime-env clean-up once
    removed a job's working_dir copy under a running driver): every path was resolved at
    start. The trials run on two nodes at least, each recorded with its node."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _spec(cwd, "spread", **SPREAD)
    before = cluster.trial_actors()
    proc = cluster.popen([CLI, "run", "spread.yaml", "--address", cluster.gcs_address,
                          "--no-mlflow", "--json", "--storage", "../runs"], cwd=cwd,
                         stdout=open(tmp_path / "out", "w"),  # noqa: SIM115
                         stderr=open(tmp_path / "err", "w"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs").glob("*/ray/tuner.pkl")):
            assert proc.poll() is None, (tmp_path / "err").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (cwd / "spread.yaml").unlink()
        cwd.rmdir()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    summary, rows = _rows(Done(0, out, err))
    assert summary["complete"] and summary["trials"] == SPREAD["n"] == len(rows)
    assert all(r["retries"] == "0" and r["retry_error"] == "" for r in rows)
    _spread(cluster, rows, before)


def test_a_failing_job_submitted_to_a_fresh_head_exits_1(started):
    """Submitted the moment the head's job server answered (its job agent may register
    seconds later: submit retries "No available agent"); the job's search cannot find its
    data (exit 2 on the cluster), the job ends FAILED, ``submit --follow`` exits 1."""
    _cluster, done = started[:2]
    assert done.returncode == 1, _why(done)
    assert re.fullmatch(r"job \S+: FAILED", done.stdout.strip().splitlines()[-1]), _why(done)
    assert f"{MISSING}: no such file" in done.stdout, _why(done)


def test_submit_follow_to_s3_spreads_trials_over_nodes_and_mlflow_agrees(cluster, tmp_path):
    """``submit --follow`` of the same space as a Ray Job, its run dir on S3 (moto in the
    namespace): SUCCEEDED, exit 0, trials on two nodes at least; the bucket holds the whole
    run dir (spec, CSVs, trial models, Optuna journal, Ray's experiment state and the
    checkpoints both nodes wrote); ``pareto URI`` reads it; MLflow: one parent, one child per
    trial tagged with its node, none RUNNING."""
    from mlflow.tracking import MlflowClient

    from search.tracking.store import TAG_NODE, TAG_PARENT, TAG_ROLE, TAG_TRIAL_KEY

    spec = _spec(tmp_path, "submitted", **SPREAD)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prefix = f"{tmp_path.name}/runs"  # this test's own (a repeated test finds the last one's)
    storage = f"s3://{BUCKET}/{prefix}?endpoint_override={S3_ENDPOINT}&region={REGION}"
    done = cluster.run([CLI, "submit", str(spec), "--address", cluster.dashboard_url,
                        "--follow", "--json", "--storage", storage,
                        "--tracking-uri", uri], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, _why(done)
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"job \S+: SUCCEEDED", lines[-1]), _why(done)
    summary = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
    names = {p.split("/")[0] for p in _s3_files(cluster, prefix)}
    assert len(names) == 1, names  # the failing job's run dir is local
    (name,) = names
    run_uri = f"s3://{BUCKET}/{prefix}/{name}?endpoint_override={S3_ENDPOINT}&region={REGION}"
    assert summary["run_dir"] == run_uri, summary
    files = _s3_files(cluster, f"{prefix}/{name}")
    rows = list(csv.DictReader(io.StringIO(_s3_read(cluster, f"{prefix}/{name}/results.csv"))))
    assert summary["complete"] and summary["trials"] == SPREAD["n"] == len(rows)
    # Nodes from results.csv, and MLflow's node tags below. Not the state API: the same trial
    # code records its node in ``run`` (the test above checks it against Ray's actors), and
    # once in CI the state API listed none of a finished Ray Job's trial actors.
    _spread(cluster, rows, None)
    keys = [r["trial_key"] for r in rows]
    for needed in ("spec.yaml", "results.csv", "pareto.csv", "optuna.journal", "ray/tuner.pkl",
                   *(f"trials/{k}/{f}" for k in keys
                     for f in ("result.json", "arch.yaml", "model.pt"))):
        assert files.get(needed), f"{needed} is not in the bucket: {sorted(files)}"
    assert any(p.startswith("ray/experiment_state") for p in files), sorted(files)
    # Ray's checkpoints, written to the bucket by the workers of every node that ran a trial.
    ckpt = {p.split("/")[1] for p in files if p.startswith("ray/") and "/checkpoint_" in p}
    assert len(ckpt) == SPREAD["n"], sorted(files)

    front = cluster.run([CLI, "pareto", run_uri, "--json"], cwd=tmp_path, timeout=120)
    assert front.returncode == 0, _why(front)
    expected = list(csv.DictReader(io.StringIO(
        _s3_read(cluster, f"{prefix}/{name}/pareto.csv"))))
    assert [str(p["trial_key"]) for p in json.loads(front.stdout)["front"]] == \
        [r["trial_key"] for r in expected] != []

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              max_results=1000)
    assert {r.data.tags.get(TAG_ROLE) for r in runs} == {"search", "trial"}, runs
    parents = [r for r in runs if r.data.tags[TAG_ROLE] == "search"]
    children = [r for r in runs if r.data.tags[TAG_ROLE] == "trial"]
    assert len(parents) == 1 and len(children) == len(rows), (parents, children)
    assert {c.data.tags[TAG_PARENT] for c in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    node_of = {c.data.tags[TAG_TRIAL_KEY]: c.data.tags.get(TAG_NODE) for c in children}
    assert node_of == {r["trial_key"]: r["node"] for r in rows}


def test_a_node_lost_mid_search_is_retried_on_the_nodes_left(cluster, tmp_path):
    """SIGKILL a worker node that trains a trial (its raylet's process group, then the rest
    of it): the trial is retried on the nodes left."""
    spec = _spec(tmp_path, "lost", n=4, epochs=12, subset=1400)
    proc = cluster.popen([CLI, "run", str(spec), "--address", cluster.gcs_address,
                          "--no-mlflow", "--json", "--storage", str(tmp_path / "runs")],
                         cwd=tmp_path, stdout=open(tmp_path / "out", "w"),  # noqa: SIM115
                         stderr=open(tmp_path / "err", "w"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 300
        while (lost := next((n for n in cluster.nodes[1:] if _training_on(n)), None)) is None:
            assert proc.poll() is None, (tmp_path / "err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial started on a worker node"
            time.sleep(0.2)
        time.sleep(1.0)  # mid-trial: an epoch or so in
        cluster.kill_node(lost)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    with open(Path(summary["run_dir"]) / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert summary["complete"] and len(rows) == 4
    assert len({r["trial_key"] for r in rows}) == 4  # every trial recorded once
    retried = [r for r in rows if int(r["retries"]) > 0]
    assert retried, rows
    for r in retried:
        assert r["status"] == "TERMINATED" and r["node"] != lost.node_id
        # The failed attempt's node is known once it reported an epoch ("?" before that).
        assert r["retry_error"].startswith((lost.node_id, "?: ")), r["retry_error"]
        assert "Actor" in r["retry_error"], r["retry_error"]


def _training_on(node) -> bool:
    """A Tune function-trainable actor lives on ``node`` (its process title)."""
    for pid in node.pids():
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::ImplicitFunc"):
            return True
    return False


def test_submit_to_two_nodes_started_as_rays_docs_start_them(tmp_path_factory):
    """Its own cluster, started as a user following Ray's docs would on one host: ``ray start
    --head --port --dashboard-host --dashboard-port --num-cpus=1 --temp-dir=DIR``, then ``ray
    start --address=HEAD --num-cpus=1`` and nothing else (both nodes share the head's session
    folder, where the job's working dir is unpacked and their runtime-env agents clean up).
    ``submit --follow`` with MLflow on: SUCCEEDED, exit 0, no traceback, the trials recorded,
    no MLflow run left RUNNING."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("docs")
    with LoopbackCluster() as c:
        c.start_head(num_cpus=1, as_docs=True)
        c.add_node(num_cpus=1, as_docs=True)
        # one session folder for both nodes: the joining node's raylet logs into the head's
        logs = list(c.nodes[0].temp_dir.glob("session_2*/logs/raylet*.out"))  # not _latest
        assert len({p.parent.parent for p in logs}) == 1 and len(logs) >= 2, logs
        c.wait_job_server()
        spec = _spec(tmp, "docs", resources="{cpu: 1}", n=2, epochs=24, subset=600)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        done = c.run([CLI, "submit", str(spec), "--address", c.dashboard_url, "--follow",
                      "--json", "--storage", str(tmp / "runs"), "--tracking-uri", uri],
                     cwd=tmp, timeout=600)
        alive = {n["id"] for n in c.alive_nodes()}
    assert done.returncode == 0, _why(done)
    assert re.fullmatch(r"job \S+: SUCCEEDED", done.stdout.strip().splitlines()[-1]), _why(done)
    assert "Traceback" not in done.stdout + done.stderr, _why(done)
    (run_dir,) = (tmp / "runs").iterdir()
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}, rows
    # (which node each trial ran on is not asserted: on a loaded box Tune's actor reuse can
    # put both on one node; test_run_from_a_vanishing_folder_spreads_trials_over_nodes checks
    # spreading)
    assert {r["node"] for r in rows} <= alive and len(alive) == 2, (rows, alive)
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}, runs


def test_a_search_on_a_cluster_that_grows_from_no_worker(tmp_path_factory):
    """Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1 ray start --head
    --autoscaling-config``; its nodes are real raylets it starts on this host): a head with no
    CPU and a worker type of 2 CPUs at zero nodes; the driver's HOME holds the config as
    ``ray up`` leaves it on a head. The search's trials (2 CPUs each) fit no
    node at start: one line says they wait for the autoscaler (no refusal, no repeated Ray
    warning); it adds nodes, the trials run there, the search completes, each trial recorded
    once."""
    tmp = tmp_path_factory.mktemp("grows")
    config = tmp / "autoscaling.json"
    config.write_text(json.dumps({
        "cluster_name": "grows", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": "127.0.0.1:46379"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu2": {"resources": {"CPU": 2, "object_store_memory": 200 * 2**20},
                     "node_config": {}, "min_workers": 0, "max_workers": 2}},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands", "cluster_synced_files",
                           "rsync_exclude", "rsync_filter")},
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False}))
    with LoopbackCluster(env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as c:
        c.start_head(num_cpus=0, args=[f"--autoscaling-config={config}"])
        head = {n["id"] for n in c.alive_nodes()}
        assert len(head) == 1
        spec = _spec(tmp, "grows", resources="{cpu: 2}", n=2, epochs=2, subset=300)
        # The driver runs where `ray up` leaves the cluster's config (as Ray Tune checks):
        # a HOME of its own holding ~/ray_bootstrap_config.yaml.
        home = tmp / "home"
        home.mkdir()
        (home / "ray_bootstrap_config.yaml").write_text(config.read_text())
        done = c.run([CLI, "run", str(spec), "--address", c.gcs_address, "--no-mlflow", "--json",
                      "--storage", str(tmp / "runs")], env={"HOME": str(home)}, timeout=600,
                     cwd=tmp)
        alive = {n["id"]: n["res"].get("CPU") for n in c.alive_nodes()}
    assert done.returncode == 0, _why(done)
    assert "trials wait for the autoscaler to add one" in done.stderr, _why(done)
    assert "Ignore this message if the cluster is autoscaling" not in done.stderr, _why(done)
    summary, rows = _rows(done)
    assert summary["complete"] and len(rows) == 2 == len({r["trial_key"] for r in rows})
    assert {r["status"] for r in rows} == {"TERMINATED"}, rows
    added = {n for n, cpu in alive.items() if n not in head and cpu == 2}
    assert added and {r["node"] for r in rows} <= added, (rows, alive)
