"""search/owner.py: one owner per run dir, through the console script, on a copy of the
suite's finished search (tests/conftest.py). The owner is a real process holding the real
lock: this test process, or a child that is then SIGKILLed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from search.rundir.owner import JOURNAL_LOCK, OWNER_FILE, own

# `resume` of the shared search starts Ray; it runs on the shared search's worker.
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("finished_search")]

SCRIPT = str(Path(sys.executable).with_name("sparse-search"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def run_dir(finished_search, tmp_path: Path) -> Path:
    return finished_search.copy(tmp_path)


def test_a_second_command_that_would_change_an_owned_run_dir_exits_2_naming_the_owner(
        run_dir: Path, finished_search) -> None:
    with own(run_dir):
        for args in (["resume", str(run_dir)], ["finalize", str(run_dir), "--no-mlflow"]):
            done = _cli(*args)
            assert done.returncode == 2, (args, done.stderr[-2000:])
            (line,) = done.stderr.strip().splitlines()  # one line, no traceback
            assert line.startswith(f"error: {run_dir} is in use by PID {os.getpid()} on "
                                   f"{socket.gethostname()} (started "), line
        # Reading is never refused.
        shown = _cli("pareto", str(run_dir))
        assert shown.returncode == 0, shown.stderr[-2000:]
    assert not (run_dir / "final").exists()  # the refused finalize changed nothing
    done = _cli("resume", str(run_dir))  # released: the resume goes ahead (nothing left to do)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_owner_killed_with_sigkill_leaves_no_stale_lock_nor_journal_lock(
        run_dir: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from search.rundir.owner import own; "
         "own(sys.argv[1]); print('owned', flush=True); time.sleep(600)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "owned"
        refused = _cli("resume", str(run_dir))
        assert refused.returncode == 2 and f"in use by PID {holder.pid} " in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / OWNER_FILE).exists()  # the file stays; its lock went with the process
    # Optuna's journal lock as a killed driver leaves it (a symlink to a gone file): Optuna
    # itself would stall 30 s and force it; the run dir's new owner removes it at once.
    os.symlink(run_dir / "optuna.journal.lock-gone", run_dir / JOURNAL_LOCK)
    done = _cli("resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Forcibly releasing" not in done.stderr and not os.path.lexists(run_dir / JOURNAL_LOCK)


def test_the_owner_drops_a_journal_line_cut_short_by_a_full_disk(tmp_path: Path, capsys) -> None:
    # Seen in a full-disk run (tests/test_cli_faults.py): the journal ended in half a line, the
    # resume appended after it, and Optuna then failed to read its own study (JSONDecodeError).
    journal = tmp_path / "optuna.journal"
    whole = b'{"op_code": 0, "worker_id": "w"}\n{"op_code": 4, "worker_id": "w"}\n'
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "w", "trial_id": 2, "para')
    with own(tmp_path):
        assert journal.read_bytes() == whole
    assert "optuna.journal: dropped its last line, cut short (53 bytes" in capsys.readouterr().err
    with own(tmp_path):  # a whole journal is left as it is
        assert journal.read_bytes() == whole
