"""Local sqlite stores shared by searches started at once, honest `sync`, a `ui` that restarts.

Everything is real: separate Python processes racing on one fresh sqlite file, MLflow's own
store and migrations, `sparse-search ui` started, stopped by SIGINT and started again.

Measured here (2 cores) with the race below, 4 processes per fresh store, 3 rounds: the
tracker of a16e413 (no store lock) crashed at start in 9 of 12 processes ("table experiments
already exists", "duplicate column name: step"); with the lock, 0 of 12.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sigint
import yaml
from mlflow.tracking import MlflowClient

from search.errors import UserError
from search.rundir.layout import write_outcome
from search.tracking import (
    DEFAULT_EXPERIMENT,
    STATE_FILE,
    TAG_FAILURE,
    TAG_PARENT,
    TAG_ROLE,
    SearchTracker,
    check_not_half_migrated,
    check_reachable,
    client_for,
    sync_end,
    sync_run_dir,
)

pytestmark = pytest.mark.slow  # many seconds of real work without Ray

REPO = Path(__file__).resolve().parents[2]
SPEC_YAML = "name: spec-named\nobjectives: {val_accuracy: max, nonzero_params: min}\n"

# One search's tracker: imports first, then waits on the barrier (file `go`) with the others,
# so that every process opens the fresh store within a few milliseconds of the others.
RACER = """
import json, sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imports before the barrier)
import yaml
from search.tracking import SearchTracker
from trainables.arch import ArchConfig, StageConfig, StemConfig
uri, run_dir, barrier, index, trials = sys.argv[1:6]
spec = {spec!r}
tracker = SearchTracker(uri, "race", run_dir=run_dir, spec_dict=yaml.safe_load(spec),
                        spec_yaml_text=spec, search_name=f"search{{index}}", front_interval_s=3600)
Path(barrier, f"ready{{index}}").touch()
while not Path(barrier, "go").exists():
    time.sleep(0.002)
tracker.start()
for t in range(int(trials)):
    arch = ArchConfig(in_channels=1, input_size=(8, 8), stem=StemConfig(width=4 + t),
                      stages=(StageConfig(block="plain", width=8),))
    key = f"s{{index}}t{{t}}"
    tracker.trial_started(key, arch, arch.to_flat())
    for epoch in (1, 2):
        tracker.trial_result(key, {{"val_accuracy": 0.3 * epoch, "nonzero_params": 100 + t}}, epoch)
    tracker.trial_finished(key, {{"val_accuracy": 0.6, "nonzero_params": 100 + t, "epoch": 2}})
tracker.finish()
print(json.dumps({{"failure": getattr(tracker, "failure", None), "offline": tracker.offline,
                  "parent": tracker.parent_run_id}}))
"""


def race(root: Path, processes: int, trials: int, *, env: dict[str, str] | None = None) -> list[dict]:
    """`processes` trackers start at the same moment on a fresh sqlite:///root/mlflow.db."""
    root.mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    code = RACER.format(spec=SPEC_YAML)
    procs = [subprocess.Popen(
        [sys.executable, "-c", code, uri, str(root / f"run{i}"), str(root), str(i), str(trials)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env)
        for i in range(processes)]
    try:
        deadline = time.monotonic() + 180
        while sum((root / f"ready{i}").exists() for i in range(processes)) < processes:
            assert time.monotonic() < deadline, "the racers never got ready"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        (root / "go").touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        if p.returncode == 0:
            results.append({**json.loads(out.strip().splitlines()[-1]), "stderr": err})
        else:  # the tracker of a16e413 raised out of start()
            lines = [ln for ln in err.splitlines() if "Error: " in ln] or [f"exit {p.returncode}"]
            last = lines[-1].strip()
            results.append({"failure": f"crashed: {last}", "offline": True, "parent": None,
                            "stderr": err})
    return results


@pytest.mark.parametrize("round_", range(3))
def test_searches_started_at_once_share_a_fresh_sqlite_store(tmp_path, round_):
    processes, trials = 4, 2
    results = race(tmp_path / "store", processes, trials)
    assert [r["failure"] for r in results] == [None] * processes, [r["stderr"] for r in results]
    assert not any(r["offline"] for r in results)
    db = tmp_path / "store" / "mlflow.db"
    check_not_half_migrated(db)  # no _alembic_tmp_* left
    with sqlite3.connect(db) as con:
        revisions = con.execute("SELECT version_num FROM alembic_version").fetchall()
    assert len(revisions) == 1
    client = client_for(f"sqlite:///{db}")  # opens cleanly
    experiments = [e.name for e in client.search_experiments()]
    assert experiments.count("race") == 1
    eid = client.get_experiment_by_name("race").experiment_id
    runs = client.search_runs([eid], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "search"]
    children = [r for r in runs if TAG_PARENT in r.data.tags]
    assert sorted(r.info.run_id for r in parents) == sorted(r["parent"] for r in results)
    assert len(children) == processes * trials
    assert {c.data.tags[TAG_PARENT] for c in children} == {r["parent"] for r in results}
    assert all(r.info.status == "FINISHED" for r in parents + children)


def test_a_half_migrated_store_is_a_user_error_that_says_how_to_repair_it(tmp_path, capfd):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client_for(uri)  # a complete store, then what an interrupted batch migration leaves
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_latest_metrics AS SELECT * FROM latest_metrics")
    with pytest.raises(UserError, match=r"half-migrated.*_alembic_tmp_latest_metrics") as e:
        check_reachable(uri)  # before a search trains anything
    message = str(e.value)
    assert "DROP TABLE _alembic_tmp_latest_metrics;" in message and "mlflow db upgrade" in message
    with pytest.raises(UserError, match="half-migrated"):
        client_for(uri)

    # A tracker that cannot open it goes offline, says why once on stderr, and keeps it.
    run_dir = tmp_path / "run"
    tracker = SearchTracker(uri, "x", run_dir=run_dir, spec_dict={}, spec_yaml_text="",
                            search_name="x").start()
    assert tracker.offline and tracker.parent_run_id is None
    assert tracker.failure.startswith(f"MLflow tracking at {uri} failed in start (UserError: ")
    assert "half-migrated" in tracker.failure and "\n" not in tracker.failure
    tracker.finish()
    err = capfd.readouterr().err
    assert err.count("warning: MLflow tracking at") == 1 and f"sparse-search sync {run_dir}" in err
    # the run dir still says which store and experiment the search meant, for `sync`
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert state["tracking_uri"] == uri and state["experiment"] == "x"

    # The repair the message gives works.
    sql = message.split(f"`sqlite3 {db} \"", 1)[1].split('"`', 1)[0]
    with sqlite3.connect(db) as con:
        con.executescript(sql)
    upgrade = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "db", "upgrade", uri],
                             capture_output=True, text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stderr
    check_reachable(uri)
    assert client_for(uri).search_experiments()


# ---------------------------------------------------------------------- sync
def make_run_dir(root: Path, uri: str, *, start: bool, close: str | None = None) -> tuple[Path, SearchTracker]:
    """A run dir whose spec names the experiment "spec-named", with 2 trials in results.csv
    and trials/; its tracker started (and closed with ``close``) or never started."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_tracking import drive

    run_dir = root / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(SPEC_YAML)
    tracker = SearchTracker(uri, "spec-named", run_dir=run_dir, spec_dict=yaml.safe_load(SPEC_YAML),
                            spec_yaml_text=SPEC_YAML, search_name="run", front_interval_s=0)
    if start:
        tracker.start()
    drive(tracker, run_dir, range(2))
    if close:
        tracker.finish(close, reason="the search process exited before the search finished")
    else:  # the server went away (or the driver died): MLflow never hears the end
        tracker.offline = True
    return run_dir, tracker


def parent_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_ROLE}` = 'search'")
    assert len(runs) == 1
    return runs[0]


def test_sync_closes_a_complete_search_finished_even_after_a_killed_close(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, _ = make_run_dir(tmp_path, uri, start=True, close="KILLED")
    client = client_for(uri)
    assert parent_of(client, "spec-named").info.status == "KILLED"
    write_outcome(run_dir, complete=True, stopped_by="num_samples")
    sync_run_dir(run_dir)
    parent = parent_of(client, "spec-named")
    assert parent.info.status == "FINISHED" and TAG_FAILURE not in parent.data.tags
    assert sync_run_dir(run_dir) == {"trials": 2, "created": 0, "finalized": 0, "closed": 0}
    assert parent_of(client, "spec-named").info.status == "FINISHED"


def test_sync_files_a_never_tracked_search_under_its_spec_name(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, _ = make_run_dir(tmp_path, uri, start=False)
    assert not (run_dir / STATE_FILE).exists()
    write_outcome(run_dir, complete=True, stopped_by="time_budget")
    assert sync_run_dir(run_dir, uri)["created"] == 2
    client = client_for(uri)
    assert client.get_experiment_by_name(DEFAULT_EXPERIMENT) is None
    assert parent_of(client, "spec-named").info.status == "FINISHED"


@pytest.mark.parametrize("outcome", [None, {"complete": False, "stopped_by": "interrupted"}])
def test_sync_without_a_complete_outcome_closes_the_parent_killed(tmp_path, outcome):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir, _ = make_run_dir(tmp_path, uri, start=True)
    client = client_for(uri)
    assert parent_of(client, "spec-named").info.status == "RUNNING"
    if outcome is not None:
        write_outcome(run_dir, **outcome)
    sync_run_dir(run_dir)
    parent = parent_of(client, "spec-named")
    assert parent.info.status == "KILLED"
    expected = "no outcome.json" if outcome is None else f"sparse-search resume {run_dir}"
    assert expected in parent.data.tags[TAG_FAILURE]


DONE = {"complete": True, "stopped_by": "num_samples", "ended_at": "2026-01-01T00:00:00+00:00"}
STOPPED = {"complete": False, "stopped_by": "interrupted", "ended_at": "2026-01-01T00:00:00+00:00"}
ERRED = {"complete": False, "stopped_by": "error: RuntimeError", "ended_at": "2026-01-01T00:00:00+00:00"}


@pytest.mark.parametrize(("outcome", "parent", "status", "reason"), [
    (DONE, "RUNNING", "FINISHED", None),  # MLflow missed the end
    (DONE, "KILLED", "FINISHED", None),  # the server went away; the exit hook said KILLED
    (DONE, None, "FINISHED", None),  # sync created the parent
    (STOPPED, "RUNNING", "KILLED", "interrupted: continue with `sparse-search resume /r`"),
    (STOPPED, "FINISHED", "KILLED", "interrupted: continue with `sparse-search resume /r`"),
    (STOPPED, "KILLED", "KILLED", None),  # the driver's own reason stays
    (ERRED, "RUNNING", "FAILED", "the search driver stopped on an error: RuntimeError; closed by sync"),
    (ERRED, "FAILED", "FAILED", None),
    (None, "RUNNING", "KILLED",
     "the search driver stopped before the search ended (no outcome.json); closed by sync"),
    (None, None, "KILLED",
     "the search driver stopped before the search ended (no outcome.json); closed by sync"),
    (None, "FINISHED", "FINISHED", None),  # a driver older than outcome.json closed it
])
def test_sync_end_table(outcome, parent, status, reason):
    assert sync_end(outcome, parent, "/r") == (status, reason)


# ---------------------------------------------------------------------- ui
def read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line within {timeout} s"
    return proc.stdout.readline()


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_masks(pid: int) -> str:
    """The SigBlk / SigIgn / SigCgt lines of /proc/PID/status (hex masks, bit 1 = SIGINT)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as e:
        return f"status unreadable ({e})"
    return ", ".join(ln.replace("\t", " ") for ln in lines if ln.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_ui_restarts_at_once_on_the_same_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("sparse-search")), "ui", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifact-root", str(tmp_path / "mlruns")]
    for attempt in ("first", "restarted"):
        # stderr (the server's log) to a file: an undrained pipe fills at 64 KiB and blocks
        # the server, and the UI with it, in the middle of their shutdown.
        log = tmp_path / f"ui-{attempt}.log"
        with log.open("w") as err:
            # As an interactive shell starts it (tests/sigint.py: Ctrl-C must reach it).
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                    cwd=tmp_path, start_new_session=True,
                                    preexec_fn=sigint.interactive)
        groups, browser = [proc.pid], []
        try:
            line = read_line(proc, 180)
            assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}/"), (
                attempt, line, log.read_text())
            groups += [os.getpgid(c) for c in children_of(proc.pid)]  # the server's group
            # Kept-alive connections, as a browser holds them: stopping the server closes them
            # from its side, which leaves the port's end in FIN-WAIT/TIME-WAIT for a while (a
            # bind without SO_REUSEADDR then failed: "--port P is not free").
            for _ in range(3):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/health")
                assert conn.getresponse().read() == b"OK"
                browser.append(conn)
            masks = _signal_masks(proc.pid)  # for the failure message: is SIGINT caught?
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{attempt}: the UI not gone 60 s after SIGINT; its {masks}; "
                            f"log: {log.read_text()[-3000:]}")
            assert code == 0, log.read_text()
            deadline = time.monotonic() + 30
            while any(map(group_alive, groups)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(groups) > 1 and not any(map(group_alive, groups)), (attempt, groups)
        finally:
            for conn in browser:
                conn.close()
            for g in groups:
                if group_alive(g):
                    os.killpg(g, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()


def test_a_sqlite_store_keeps_artifacts_beside_it_wherever_the_driver_runs(tmp_path, monkeypatch):
    """The driver runs from its run dir (and a submitted job from a working_dir that may
    vanish): a relative sqlite URI is made absolute at start, and a new experiment's artifacts
    go to mlruns/<name> beside the database, not to ./mlruns of whatever the cwd is then."""
    from search.tracking.store import artifact_location, ensure_experiment, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri("sqlite:///stores/mlflow.db")
    assert uri == f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert artifact_location("http://127.0.0.1:5000", "x") is None
    (tmp_path / "stores").mkdir()
    elsewhere = tmp_path / "run-dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as the driver is when the background tracker starts
    client = MlflowClient(uri)
    exp = client.get_experiment(ensure_experiment(client, "my search/1"))
    assert exp.artifact_location.removeprefix("file://") == str(tmp_path / "stores" / "mlruns" / "my-search-1")
    run = client.create_run(exp.experiment_id)
    client.log_text(run.info.run_id, "hello", "note.txt")
    client.set_terminated(run.info.run_id)
    assert list((tmp_path / "stores" / "mlruns").rglob("note.txt"))
    assert not (elsewhere / "mlruns").exists()


def test_a_store_locked_by_another_writer_is_said_in_one_line_not_refused(tmp_path, capsys):
    # (A corrupt store is refused: tests/test_cli_faults.py, through the console script.)
    from search.tracking.store import check_sqlite_file

    locked = tmp_path / "locked.db"
    with sqlite3.connect(locked) as con:
        con.execute("CREATE TABLE t (x)")
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing (here: another connection)
    try:
        check_sqlite_file(locked)  # not refused: MLflow waits for the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"note: tracking store {locked} is locked by another process: MLflow waits "
                    "for it (up to 30 s), then goes on or says what is wrong")
