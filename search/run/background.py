"""One worker thread for the driver's slow bookkeeping, so trials never wait on it.

Ray Tune calls callbacks inside its event loop: while a callback runs, no trial is started,
stopped or fed. MLflow calls (tens of milliseconds each against sqlite, more over HTTP; the
first one imports MLflow and may migrate the store: seconds) and per-layer accounting of a
finished model would sit on that critical path after every report. Here they run in order on a
single daemon thread; the driver only enqueues. ``drain()`` waits for everything queued (the
tuner calls it before the final front push and before closing MLflow).

A job that raises is logged once per kind and skipped: bookkeeping never stops a search.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ray.tune import Callback

from search.pickled import public

log = logging.getLogger("sparse_search.background")


@public("search.run")
class Background:
    """An ordered job queue served by one daemon thread (started on the first job)."""

    def __init__(self, name: str = "sparse-search-bookkeeping") -> None:
        self.name = name
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] | None = None
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()
        self.failures = 0

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles callbacks that hold this: a thread and its queue stay in this process.
        return {"name": self.name, "_queue": None, "_thread": None, "_warned": set(),
                "failures": 0}

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._queue is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((fn, args, kwargs))

    def drain(self) -> None:
        """Block until every job submitted so far has run."""
        if self._queue is not None:
            self._queue.join()

    def _serve(self) -> None:
        assert self._queue is not None
        while True:
            fn, args, kwargs = self._queue.get()
            try:
                fn(*args, **kwargs)
            except Exception as e:
                self.failures += 1
                what = getattr(fn, "__qualname__", repr(fn))
                if what not in self._warned:
                    self._warned.add(what)
                    log.warning("background %s failed (%s: %s); the search goes on",
                                what, type(e).__name__, e)
            finally:
                self._queue.task_done()


@public("search.run")
class InBackground(Callback):
    """Forwards trial hooks of ``callbacks`` to a :class:`Background`, in call order."""

    def __init__(self, callbacks: Sequence[Callback], background: Background) -> None:
        self.callbacks = list(callbacks)
        self.background = background

    def _forward(self, hook: str, **kwargs: Any) -> None:
        for cb in self.callbacks:
            self.background.submit(getattr(cb, hook), **kwargs)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._forward("on_trial_start", iteration=iteration, trials=list(trials), trial=trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        # A copy: Ray lets callbacks edit the result dict it keeps as the trial's last result.
        self._forward("on_trial_result", iteration=iteration, trials=list(trials), trial=trial,
                      result=dict(result))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._forward("on_trial_complete", iteration=iteration, trials=list(trials), trial=trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._forward("on_trial_error", iteration=iteration, trials=list(trials), trial=trial)
