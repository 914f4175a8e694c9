"""SIGTERM means the same as Ctrl-C: stop the search cleanly, resumable, exit 130.

Ray Tune stops a run cleanly on the first SIGINT (trials saved, the experiment snapshot
written) and only then returns; on SIGTERM ``ray.init``'s own handler exits at once
(``sys.exit(15)``), and a local head's handler kills the node's processes first. A scheduler, a
container runtime or ``timeout`` sends SIGTERM, so it is turned into SIGINT: one behaviour for
both, and the CLI's exit code 130 for both.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the driver before Tune could stop cleanly; the CLI prints
    this one line (the resume command) and exits 130."""

    def __init__(self, run_dir: Path, *, resumable: bool) -> None:
        self.run_dir, self.resumable = run_dir, resumable
        super().__init__(f"interrupted: continue with `sparse-search resume {run_dir}`"
                         if resumable else
                         f"interrupted before any trial started: nothing to resume in {run_dir}")


def _as_sigint(signum: int, frame: Any) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):  # Tune's (a clean stop) or Python's own: the Ctrl-C path, either way
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a shell's `cmd &` or nohup) or default: raising it would do nothing
        raise KeyboardInterrupt


def sigterm_as_sigint() -> None:
    """Install the SIGTERM -> SIGINT handler (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_sigint)
