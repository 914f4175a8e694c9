"""Searches on a real multi-node Ray cluster on this machine (tests/cluster_harness.py).

One cluster for the module, loopback only, token auth, a temp dir per node: a head (2 CPUs),
node 1 (2 CPUs and ``accel: 1``) and node 2 (2 CPUs). Every search goes through the installed
console script, ``sparse-search run --address 127.0.0.1:<gcs>``, as a user would attach to a
head they started by hand and other nodes joined. The last test loses node 2 mid-search.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster_harness import LoopbackCluster, available

pytestmark = [pytest.mark.ray, pytest.mark.skipif(available() is not None,
                                                  reason=f"no network namespaces: {available()}")]

CLI = str(Path(sys.executable).with_name("sparse-search"))
SPEC = """
name: {name}
data: {{name: digits, val_fraction: 0.2, subset: {subset}}}
constraints: {{max_params: 2000}}
search: {{sampler: random, num_samples: {n}, max_concurrent: 2, seed: 0, max_failures: 2}}
train: {{epochs: {epochs}, batch_size: 64, optimizer: adamw, lr: 0.02}}
resources: {resources}
space:
  stem: {{width: {{int: [2, 8]}}}}
  num_stages: 1
  stages: {{width: {{int: [4, 16]}}, layers: 1}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    c = LoopbackCluster()
    try:
        c.start_head(num_cpus=2)
        c.add_node(num_cpus=2, resources={"accel": 1})
        c.add_node(num_cpus=2)
        yield c
    finally:
        c.stop()
    assert not any(n.pids() for n in c.nodes)


def _spec(tmp: Path, name: str, *, resources: str = "{cpu: 2}", n: int = 4, epochs: int = 2,
          subset: int = 300) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, resources=resources, n=n, epochs=epochs,
                                subset=subset))
    return path


def _run(cluster: LoopbackCluster, spec: Path, tmp: Path, *extra: str):
    return cluster.run([CLI, "run", str(spec), "--address", cluster.gcs_address, "--no-mlflow",
                        "--json", "--storage", str(tmp / "runs"), *extra], timeout=600, cwd=tmp)


def _rows(done) -> tuple[dict, list[dict[str, str]]]:
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


def test_trials_spread_over_nodes_and_record_their_node(cluster, tmp_path):
    """2 CPUs per trial, 2 at a time: no node holds two, so they run on two nodes at least."""
    # Trials long enough to overlap: a finished trial's reused actor would take the next one on
    # its own node, so short trials on a loaded box could all run on one.
    done = _run(cluster, _spec(tmp_path, "spread", epochs=8, subset=600), tmp_path)
    assert done.returncode == 0, _why(done)
    summary, rows = _rows(done)
    assert summary["trials"] == 4 and summary["complete"]
    ids = {n.node_id for n in cluster.nodes}
    nodes = {r["node"] for r in rows}
    assert len(rows) == 4 and nodes <= ids and len(nodes) >= 2, (nodes, ids)
    assert all(r["retries"] == "0" and r["retry_error"] == "" for r in rows)
    # Ray's state API agrees: the trial actors (finished now) ran on those nodes.
    actors = [a for a in cluster.state()["actors"] if a["class_name"] == "ImplicitFunc"]
    assert nodes <= {a["node_id"] for a in actors}, actors


def test_a_custom_resource_places_trials_only_on_the_node_that_has_it(cluster, tmp_path):
    done = _run(cluster, _spec(tmp_path, "accel", resources="{cpu: 1, custom: {accel: 0.25}}"),
                tmp_path)
    assert done.returncode == 0, _why(done)
    assert "up to 2 at once on 1 of the 3 nodes" in done.stderr, done.stderr[-2000:]
    _summary, rows = _rows(done)
    accel = cluster.nodes[1].node_id
    assert len(rows) == 4 and {r["node"] for r in rows} == {accel}, rows


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


def test_the_driver_does_not_need_its_working_directory(cluster, tmp_path):
    """Relative spec, data-free digits and ``--storage ../runs`` given from a folder that is
    deleted once the search trains (as Ray's runtime-env clean-up once removed a job's
    working_dir copy under a running driver): every path was resolved at start."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _spec(cwd, "nocwd", n=4, epochs=4)
    proc = cluster.popen([CLI, "run", "nocwd.yaml", "--address", cluster.gcs_address,
                          "--no-mlflow", "--json", "--storage", "../runs"], cwd=cwd,
                         stdout=open(tmp_path / "out", "w"),  # noqa: SIM115
                         stderr=open(tmp_path / "err", "w"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs").glob("*/ray/tuner.pkl")):
            assert proc.poll() is None, (tmp_path / "err").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        (cwd / "nocwd.yaml").unlink()
        cwd.rmdir()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["complete"] and summary["trials"] == 4
