"""A multi-node Ray cluster on this machine, loopback only, for tests and benchmarks.

Design (what made it sound here, Ray 2.60, root in a container):

- **one network namespace for the whole cluster** (``unshare -n``, then ``ip link set lo up``),
  held open by a ``sleep`` process; every node, every driver and every state-API query runs in
  it through ``nsenter --net=/proc/<holder>/ns/net``. The namespace has no interface but ``lo``,
  so Ray picks 127.0.0.1 by itself and nothing can listen anywhere else: no
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which makes ``ray start --address`` refuse to join),
  and the Ray that other people run on this machine (8265 / 52365 / 6379) is invisible;
- **a temp folder per node** (``--temp-dir``, per node since Ray 2.x): sessions, runtime-env
  caches (a job's working_dir copy) and logs are never shared, so one node's runtime-env
  clean-up cannot remove a folder another node's driver runs in; ``as_docs=True`` starts the
  nodes as Ray's docs do instead (a joining node gives no temp dir and no ports: it shares the
  head's session folder), the way users start them;
- **token auth on**: ``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN`` in the environment
  of every process (head, joining nodes, drivers); ``~/.ray/auth_token`` is neither read nor
  written;
- **every port explicit** and distinct per node (the namespace's loopback is private, but two
  nodes share it);
- **every process stopped by PID**: each ``ray start --block`` runs in its own session; at the
  end each ``ray start`` process (only it: Ray 2.60 drains a node on SIGTERM by asking the GCS,
  and a GCS killed in the same breath makes every node wait 30 s for it) gets SIGTERM, then
  every PID left in its session SIGKILL, and :meth:`LoopbackCluster.stop` asserts that none
  survive (nor the namespace holder).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAY = Path(sys.executable).with_name("ray")
HEAD_PORTS = {  # the head's fixed ports (inside the namespace nothing else holds any)
    "port": 46379, "dashboard-port": 48265, "ray-client-server-port": 40001,
}
NODE_PORT_BASE = 41000  # node i takes NODE_PORT_BASE + 100 * i + (0..99)
NODE_TIMEOUT = "The current node timed out during startup"  # ray start's words, Ray 2.60


def available() -> str | None:
    """Why the harness cannot run here (None: it can): network namespaces need root or
    unprivileged user namespaces."""
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        return "unshare / nsenter / ip not found"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -n failed: {probe.stderr.strip()}"


def session_pids(sid: int) -> set[int]:
    """Live processes of session ``sid`` (zombies, already dead, are left out)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    return {int(p) for p, s, st in (line.split() for line in out.splitlines())
            if int(s) == sid and not st.startswith("Z")}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Node:
    index: int  # 0 is the head
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    port: int = 0  # its raylet's node-manager port (how ray.nodes() names it here)
    node_id: str | None = None  # Ray's hex node id, once up
    argv: list[str] = field(default_factory=list)  # its ray start (to start it again)
    restarts: int = 0

    @property
    def sid(self) -> int:
        return self.proc.pid  # start_new_session: the session id is the ray start's pid

    def pids(self) -> set[int]:
        return session_pids(self.sid)

    def raylet_pid(self) -> int | None:
        return next((p for p in sorted(self.pids()) if _comm(p) == "raylet"), None)


class LoopbackCluster:
    """Head + nodes in a private network namespace; see the module docstring.

    Use as a context manager (stops everything, asserts nothing survives)::

        with LoopbackCluster(root) as c:
            c.start_head(num_cpus=2)
            c.add_node(num_cpus=2, resources={"accel": 1})
            c.run([sparse_search, "run", spec, "--address", c.gcs_address])
    """

    def __init__(self, root: Path | None = None, *, token: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        """``env``: more environment for every cluster process (nodes, drivers, queries),
        e.g. storage credentials: Ray workers inherit their raylet's environment, and every
        node's workers write checkpoints to the run dir's storage."""
        # Short: Ray's unix sockets live under each temp dir (107-byte limit).
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="ssc", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token or secrets.token_hex(32)
        self.extra_env = dict(env or {})
        self.nodes: list[Node] = []
        self.holder = subprocess.Popen(
            ["unshare", "-n", "--", "sh", "-c", "ip link set lo up && exec sleep infinity"],
            start_new_session=True)
        deadline = time.monotonic() + 10
        while not self._lo_up():
            assert self.holder.poll() is None, "the namespace holder died"
            assert time.monotonic() < deadline, "lo did not come up in the namespace"
            time.sleep(0.05)

    # ------------------------------------------------------------------ namespace
    @property
    def netns(self) -> str:
        return f"/proc/{self.holder.pid}/ns/net"

    def _lo_up(self) -> bool:
        out = subprocess.run(["nsenter", f"--net={self.netns}", "ip", "-o", "addr"],
                             capture_output=True, text=True).stdout
        return "127.0.0.1" in out

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the cluster's network namespace."""
        return ["nsenter", f"--net={self.netns}", "--", *map(str, argv)]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment every cluster process gets: token auth, quiet, no cluster guard."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                            "RAY_AUTH_TOKEN_PATH")}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0"})
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{HEAD_PORTS['port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{HEAD_PORTS['dashboard-port']}"

    # ------------------------------------------------------------------ nodes
    def _start(self, args: list[str], *, num_cpus: int,
               resources: Mapping[str, float] | None, as_docs: bool = False) -> Node:
        i = len(self.nodes)
        temp = self.root / f"n{i}"
        log = self.root / f"n{i}.log"
        base = NODE_PORT_BASE + 100 * i
        if as_docs:
            # Ray's docs' way: no port but the head's own, no temp dir on a joining node (it
            # takes the head's: one session folder for both), no usage-stats flag.
            temp = self.nodes[0].temp_dir if self.nodes else temp
            temp.mkdir(exist_ok=True)
            argv = [str(RAY), "start", "--block", f"--num-cpus={num_cpus}", *args]
            if not self.nodes:
                argv.append(f"--temp-dir={temp}")
            node = Node(i, self._popen_node(argv, log), temp, log, num_cpus, argv=argv)
            self.nodes.append(node)
            return node
        temp.mkdir(exist_ok=True)
        ports = {"node-manager-port": base, "object-manager-port": base + 1,
                 "dashboard-agent-listen-port": base + 2, "dashboard-agent-grpc-port": base + 3,
                 "runtime-env-agent-port": base + 4, "metrics-export-port": base + 5,
                 "min-worker-port": base + 10, "max-worker-port": base + 99}
        argv = [str(RAY), "start", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
                f"--temp-dir={temp}", "--disable-usage-stats",
                *(f"--{k}={v}" for k, v in ports.items()), *args]
        if resources:
            argv.append(f"--resources={json.dumps(dict(resources))}")
        node = Node(i, self._popen_node(argv, log), temp, log, num_cpus,
                    dict(resources or {}), port=base, argv=argv)
        self.nodes.append(node)
        return node

    def _popen_node(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "a") as out:
            return subprocess.Popen(self.wrap(argv), stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True, cwd=self.root)

    def _start_again(self, node: Node) -> bool:
        """A node whose ``ray start`` gave up registering (Ray waits 30 s, fixed: a loaded
        2-core box with a busy GCS can take longer) is started once more; True if it was."""
        if node.restarts or node.node_id or NODE_TIMEOUT not in node.log.read_text():
            return False
        self._kill_session(node, signal.SIGKILL)  # what it started before giving up
        node.restarts += 1
        node.proc = self._popen_node(node.argv, node.log)
        return True

    def start_head(self, *, num_cpus: int = 2, resources: Mapping[str, float] | None = None,
                   timeout_s: float = 120, wait: bool = True, as_docs: bool = False,
                   args: Sequence[str] = ()) -> Node:
        """The head; ``wait=False``: return once ``ray start`` runs (see :meth:`wait_nodes`,
        :meth:`wait_job_server`). ``as_docs``: started as Ray's docs start one (``--port``,
        the dashboard's host and port, a temp dir; every other port Ray's default). ``args``:
        more ``ray start`` flags (``--autoscaling-config=FILE``)."""
        assert not self.nodes, "the head is the first node"
        ports = HEAD_PORTS if not as_docs else {k: v for k, v in HEAD_PORTS.items()
                                                 if k in ("port", "dashboard-port")}
        node = self._start(["--head", "--dashboard-host=127.0.0.1",
                            *(f"--{k}={v}" for k, v in ports.items()), *args],
                           num_cpus=num_cpus, resources=resources, as_docs=as_docs)
        if wait:
            self.wait_nodes(1, timeout_s=timeout_s)
        return node

    def add_node(self, *, num_cpus: int = 2, resources: Mapping[str, float] | None = None,
                 timeout_s: float = 120, as_docs: bool = False) -> Node:
        """A node joins the head, alive on return. One at a time: nodes joining at once on a
        loaded box overran Ray's fixed 30 s registration wait. ``as_docs``: ``ray start
        --address=HEAD --num-cpus=N``, nothing else (it shares the head's temp dir)."""
        assert self.nodes, "start the head first"
        node = self._start([f"--address={self.gcs_address}"], num_cpus=num_cpus,
                           resources=resources, as_docs=as_docs)
        self.wait_nodes(sum(1 for n in self.nodes if n.proc.poll() is None or
                            n.node_id is None), timeout_s=timeout_s)
        return node

    def wait_job_server(self, *, timeout_s: float = 120) -> None:
        """Until the head's dashboard answers HTTP (401 without the token counts): what a user
        sees first of a fresh head; its job agent may register seconds later."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.nodes[0].proc.poll() is None, self.nodes[0].log.read_text()[-3000:]
            done = subprocess.run(self.wrap([sys.executable, "-c", (
                "import sys, urllib.error, urllib.request\n"
                f"try: urllib.request.urlopen({self.dashboard_url + '/api/version'!r}, timeout=2)\n"
                "except urllib.error.HTTPError: pass\n"
                "except OSError: sys.exit(1)\n")]), capture_output=True)
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, f"no job server in {timeout_s} s"
            time.sleep(0.5)

    def alive_nodes(self) -> list[dict[str, Any]]:
        """``ray.nodes()`` of the alive nodes, read by a short driver in the namespace."""
        out = self.python(
            f"import json, ray; ray.init(address={self.gcs_address!r}, logging_level='ERROR');"
            "print(json.dumps([{'id': n['NodeID'], 'res': n['Resources'],"
            " 'port': n['NodeManagerPort']} for n in ray.nodes() if n['Alive']]))", timeout=60)
        return json.loads(out.strip().splitlines()[-1])

    def wait_nodes(self, n: int, *, timeout_s: float = 120) -> None:
        """Wait until ``n`` nodes are alive; fill in their node ids (matched by port)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.nodes:
                if node.proc.poll() is not None and not self._start_again(node):
                    raise AssertionError(f"node {node.index} died:\n{node.log.read_text()}")
            try:
                alive = self.alive_nodes()
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError,
                    IndexError):
                alive = []
            if len(alive) >= n:
                by_port = {a["port"]: a["id"] for a in alive}
                for node in self.nodes:
                    node.node_id = by_port.get(node.port, node.node_id)
                if len(alive) == n:
                    return
            assert time.monotonic() < deadline, f"{n} nodes not alive in {timeout_s} s: {alive}"
            time.sleep(1.0)

    def kill_node(self, node: Node) -> None:
        """Lose ``node`` at once: SIGKILL its raylet's process group, then every process left
        in its session (workers running trials included), by PID."""
        raylet = node.raylet_pid()
        if raylet is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(raylet), signal.SIGKILL)
        self._kill_session(node, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)

    # ------------------------------------------------------------------ commands
    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float = 600, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in the namespace (a driver: ``sparse-search run --address ...``)."""
        return subprocess.run(self.wrap(argv), env=self.env(env), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd or self.root)

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None, **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(argv), env=self.env(env), cwd=cwd or self.root,
                                start_new_session=True, **kw)

    def python(self, code: str, *, timeout: float = 120,
               env: Mapping[str, str] | None = None) -> str:
        done = subprocess.run(self.wrap([sys.executable, "-c", code]), env=self.env(env),
                              capture_output=True, text=True, timeout=timeout, check=True,
                              cwd=self.root)
        return done.stdout

    def state(self, *, timeout: float = 120) -> dict[str, list[dict[str, Any]]]:
        """Ray's state API: every task and actor (name / class, node id, state), from the head."""
        code = (
            "import json, ray\n"
            "from ray.util.state import list_actors, list_tasks\n"
            f"ray.init(address={self.gcs_address!r}, logging_level='ERROR')\n"
            # address given: other Ray instances on this machine would make it ambiguous
            f"t = list_tasks(address={self.gcs_address!r}, detail=True, limit=10000, "
            "raise_on_missing_output=False)\n"
            f"a = list_actors(address={self.gcs_address!r}, detail=True, limit=10000, "
            "raise_on_missing_output=False)\n"
            "print(json.dumps({'tasks': [{'name': x.name, 'node_id': x.node_id, "
            "'state': x.state} for x in t], 'actors': [{'class_name': x.class_name, "
            "'node_id': x.node_id, 'state': x.state, 'pid': x.pid, 'actor_id': x.actor_id}"
            " for x in a]}))\n")
        # The state API answers through the head's dashboard, which can be slow to answer on
        # a loaded 2-core box: a few tries, then the last error with the child's stderr.
        for attempt in range(4):
            try:
                return json.loads(self.python(code, timeout=timeout).strip().splitlines()[-1])
            except subprocess.CalledProcessError as e:
                if attempt == 3:
                    raise AssertionError(f"state API failed: {e.stderr[-3000:]}") from None
                time.sleep(5)
        raise AssertionError("unreachable")

    def trial_actors(self) -> dict[str, str]:
        """Ray Tune's trial actors (function trainables) ever started: actor id -> node id.
        Diff two calls to get one search's (the cluster may have run others)."""
        return {a["actor_id"]: a["node_id"] for a in self.state()["actors"]
                if a["class_name"] == "ImplicitFunc"}

    # ------------------------------------------------------------------ stop
    def _kill_session(self, node: Node, sig: int) -> None:
        deadline = time.monotonic() + 30
        while (node.proc.poll() or True) and (pids := node.pids()):  # poll(): reap our child
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            assert time.monotonic() < deadline, f"node {node.index} processes survive: {pids}"
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every node (workers first), then the namespace; assert nothing survives."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None:  # not reaped: its pid is still ours
                node.proc.send_signal(signal.SIGTERM)  # ray start: drains, stops its own
        deadline = time.monotonic() + 20
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.sid, signal.SIGKILL)
                node.proc.wait()
            self._kill_session(node, signal.SIGKILL)  # workers and agents have own groups
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait(timeout=10)
        survivors = {n.index: n.pids() for n in self.nodes if n.pids()}
        assert not survivors, f"cluster processes survive: {survivors}"

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def loopback_cluster(root: Path | None = None, *, nodes: Sequence[Mapping[str, Any]] = (
        {"num_cpus": 2}, {"num_cpus": 2})) -> Iterator[LoopbackCluster]:
    """A started cluster: ``nodes[0]`` is the head's options, the rest join it."""
    c = LoopbackCluster(root)
    try:
        c.start_head(**nodes[0])
        for opts in nodes[1:]:
            c.add_node(**opts)
        yield c
    finally:
        c.stop()
