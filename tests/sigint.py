"""Starting a CLI under test as an interactive shell does: SIGINT at its default and unblocked.

A SIG_IGN or a blocked SIGINT in the test process survives fork and exec, and a Python started
so never raises KeyboardInterrupt: a test that sends Ctrl-C then waits in vain (seen under
pytest-xdist: ``sparse-search ui`` not gone 60 s after SIGINT). Pass :func:`interactive` as
``preexec_fn`` to a child that a test will interrupt.
"""

from __future__ import annotations

import signal


def interactive() -> None:
    """In the child, before exec: SIGINT handled as a terminal's foreground job gets it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
