"""What a finalize prints while it trains: one progress line every ``interval_s`` seconds.

A finalization is a few long retrainings (an hour each is common), so a line per finished one
is not enough. Each Ray task reports its epochs to a :class:`ray.util.queue.Queue` (an actor
with no CPU of its own); the driver drains it between ``ray.wait`` calls and prints::

    final 0/2 done, 2 running, 0 failed | 1-s0 epoch 12/80 val 0.7712, 1-s1 epoch 12/80 val 0.7698 | 14/75 min

Reporting is best effort: a lost report never fails a retraining.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Board", "report_epochs"]


def report_epochs(queue: Any, job_id: str, total: int) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch`` step for a task: put (job id, epoch, total, val accuracy) on ``queue``."""

    def put(metrics: dict[str, Any]) -> None:
        # Sent to the queue's actor without waiting for it: Queue.put / put_nowait block in
        # ray.get, and Ray lends a blocked task's CPUs to the next queued task, which then runs
        # beside this one (two 2-thread retrainings on 2 cores: ResNet-8 at ~150 s an epoch each
        # instead of 18 one at a time). (The driver may be gone: training goes on.)
        with contextlib.suppress(Exception):
            queue.actor.put_nowait.remote((job_id, int(metrics.get("epoch") or 0), total,
                                           metrics.get("val_accuracy")))

    return put


class Board:
    """The latest epoch of each running retraining, and the line that shows them."""

    def __init__(self, queue: Any, *, total: int, budget_s: float | None,
                 echo: Callable[[str], Any], interval_s: float = 30.0) -> None:
        self.queue, self.total, self.budget_s, self.echo = queue, total, budget_s, echo
        self.interval_s = interval_s
        self.began = time.monotonic()
        self.latest: dict[str, tuple[int, int, float | None]] = {}
        self.done = self.failed = 0
        self._last = time.monotonic()  # the first line comes after one interval

    def drain(self) -> None:
        try:  # (each qsize is a round trip to the queue's actor: asked once)
            waiting = self.queue.qsize()
            items = self.queue.get_nowait_batch(waiting) if waiting else []
        except Exception:  # (best effort, as the reports are)
            items = []
        for job_id, epoch, total, val in items:
            self.latest[job_id] = (epoch, total, val)

    def finished(self, job_id: str, ok: bool) -> None:
        self.latest.pop(job_id, None)
        self.done += ok
        self.failed += not ok

    def line(self, pending: list[str]) -> str:
        # A submitted retraining counts as running once it has reported (epoch 0 at its start):
        # without a time budget every one is submitted and Ray queues what does not fit.
        parts, started = [], 0
        for jid in pending:
            if jid not in self.latest:
                parts.append(f"{jid} waiting")
                continue
            started += 1
            epoch, total, val = self.latest[jid]
            acc = f" val {val:.4f}" if isinstance(val, float) and math.isfinite(val) else ""
            parts.append(f"{jid} epoch {epoch}/{total}{acc}" if epoch else f"{jid} starting")
        minutes = (time.monotonic() - self.began) / 60
        clock = f"{minutes:.0f}/{self.budget_s / 60:.0f} min" if self.budget_s else f"{minutes:.0f} min"
        return (f"final {self.done}/{self.total} done, {started} running, {self.failed} failed"
                f" | {', '.join(parts) or '-'} | {clock}")

    def tick(self, pending: list[str]) -> None:
        """Drain the reports; print the line when an interval has passed."""
        self.drain()
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            self.echo(self.line(pending))
