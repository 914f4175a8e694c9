"""The Ray Tune searcher: Ray asks it for configs, it asks sparse-search's Proposer.

Why not Ray's ``OptunaSearch``: it tells a trial the scheduler stopped early as COMPLETE with
its low-epoch score (so that trial lands on Optuna's front), drops intermediate results for
multi-objective studies, and knows nothing of the budget screen. Here:

- ``suggest`` -> ``Proposer.ask()``: only feasible configs ever reach Ray (over-budget
  proposals are told to Optuna inside the Proposer and counted in ``rejected``);
- ``on_trial_complete`` -> ``tell(values)`` only for the trainable's final report (full
  fidelity); a trial the scheduler stopped is told PRUNED, a failed one FAIL.

Each config carries ``meta/trial_key``: the Optuna trial number as a string, the key of the
trial's folder, MLflow run and CSV rows, unchanged across a resume.

Resume: Ray pickles this object with the experiment and saves :meth:`save` state with every
experiment snapshot. The Optuna study itself lives in the journal file, so only the Ray trial
id -> trial key map and counters are saved. On :meth:`restore`, Optuna trials the dead driver
asked but Ray never recorded (created after the last snapshot) are told FAIL, so they do not
stay RUNNING forever (TPE's constant liar would keep imputing them); the trials Ray restores
keep their Optuna trial and are told when they finish. ``num_samples`` is enforced here, over
trials recorded on disk plus those in flight, so trials that finished after the last snapshot
are not trained twice over the budget (Ray Tune's own sample count is never what ends a
search: it is restored from a file of its own, see search.run.ray_compat.searcher_decides_the_end).
The searcher's snapshot and Ray's list of trials are separate files too: a driver killed while
they were copied to a storage URI can leave a trial the searcher holds as running that Ray
never restores; :class:`ForgetLostTrials` finds those at the resumed run's first step and
:meth:`forget_lost` hands their place back, so the search still trains ``num_samples``.

Time budget (``search.time_budget``, wall seconds over the whole search, resumes included):
no trial starts once it is spent, nor one that the median finished trial says would end after
it; the trials in flight finish. The search then ends complete, ``stopped_by`` says why. The
budget travels with the searcher's snapshot; a resume given ``extend_s`` (``sparse-search
resume --time-budget``) sets it to the time spent so far plus that, so a search that stopped
at its budget goes on where it was.
"""

from __future__ import annotations

import logging
import os
import pickle
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher

from search.pickled import public
from search.rundir.results import is_final
from search.schema import INITIAL_KEY, SCREENED_KEY, TRIAL_KEY
from search.space import Proposer, SearchSpace
from search.spec.dims import finite
from trainables.trial import CHILD_EPOCHS_KEY, PARENT_KEY

log = logging.getLogger("sparse_search.searcher")


@public("search.run")
class ProposerSearcher(Searcher):
    """A Ray Tune :class:`Searcher` backed by :class:`search.space.Proposer`."""

    def __init__(
        self,
        space: SearchSpace,
        *,
        journal: str | Path,
        study_name: str,
        num_samples: int,
        recorded: Iterable[str] = (),
        time_budget: float | None = None,
        started_at: float | None = None,
        extend_s: float | None = None,
    ) -> None:
        spec = space.spec
        super().__init__(metric=[o.metric for o in spec.objectives],
                         mode=[o.mode for o in spec.objectives])
        self.space = space
        self.journal = str(journal)
        self.study_name = study_name
        self.num_samples = num_samples
        self._proposer: Proposer | None = None
        self._live: dict[str, str] = {}  # Ray trial id -> trial key, asked and not yet told
        self._issued: set[str] = set(recorded)  # trial keys that count towards num_samples
        self._recorded: set[str] = set(recorded)  # ... of trials on disk (never forgotten)
        self._rejected_before = 0  # rejected by proposers of earlier driver processes
        self._duplicates_before = 0
        self.told = {"complete": 0, "pruned": 0, "failed": 0}
        self.time_budget = time_budget
        # On restore: the budget becomes what earlier drivers spent plus this (seconds).
        self.extend_s = extend_s
        self._spent_before = 0.0  # wall seconds of earlier driver processes
        self._t0: float | None = None  # monotonic time this process started searching
        # When this process's command started (time.monotonic()): Ray's start-up and the data
        # loading count against the time budget too. None: from the first suggestion.
        self._started_at = started_at
        self._started: dict[str, float] = {}  # Ray trial id -> monotonic start
        self.durations: list[float] = []  # wall seconds of trials that ended (this process)
        # ... of those that trained to the end (not stopped early): what a new trial may take
        self.full_durations: list[float] = []
        self.stopped_by: str | None = None  # "time_budget" once it stopped new trials

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # The study is rebuilt from the journal: never pickle a storage handle.
        return {**self.__dict__, "_proposer": None,
                "_rejected_before": self.rejected, "_duplicates_before": self.duplicates,
                "_spent_before": self.spent, "_t0": None, "_started_at": None,
                "_started": {}}

    @property
    def proposer(self) -> Proposer:
        if self._proposer is None:
            s = self.space.spec.search
            self._proposer = Proposer(self.space, sampler=s.sampler, seed=s.seed,
                                      storage=self.journal, study_name=self.study_name,
                                      max_rejects=s.max_rejects)
        return self._proposer

    @property
    def rejected(self) -> int:
        """Over-budget proposals told to Optuna by this search, over resumes."""
        return self._rejected_before + (self._proposer.rejected if self._proposer else 0)

    @property
    def duplicates(self) -> int:
        """Proposals that repeated a handed-out config (never trained twice), over resumes."""
        return self._duplicates_before + (self._proposer.duplicates if self._proposer else 0)

    @property
    def live(self) -> int:
        """Trials asked and not yet told."""
        return len(self._live)

    @property
    def spent(self) -> float:
        """Wall seconds this search has run, over resumes (each process from its command's
        start, or from its first suggestion without ``started_at``)."""
        return self._spent_before + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

    def out_of_time(self) -> bool:
        """The time budget leaves no room for another trial (always False without one)."""
        if self.time_budget is None:
            return False
        left = self.time_budget - self.spent
        return left <= 0 or self.typical_trial_s() > left

    def typical_trial_s(self) -> float:
        """What a new trial may take: the median trial that trained to the end (with early
        stopping most trials end early, and the next one may not), else the median of all
        that ended; 0 before any ended."""
        durations = self.full_durations or self.durations
        return statistics.median(durations) if durations else 0.0

    @property
    def exhausted(self) -> bool:
        """Every trial of ``num_samples`` was handed out (recorded ones included)."""
        return len(self._issued) >= self.num_samples

    # ------------------------------------------------------------------ Ray Tune API
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return True  # the space comes from the spec, never from Tune's param_space

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._t0 is None:
            self._t0 = self._started_at if self._started_at is not None else time.monotonic()
        if len(self._issued) >= self.num_samples:
            return Searcher.FINISHED
        if self.out_of_time():
            if self.stopped_by is None:
                self.stopped_by = "time_budget"
                log.info("time budget: %.0f of %.0f s spent, no new trial starts (median trial "
                         "%.0f s)", self.spent, self.time_budget, self.typical_trial_s())
            return Searcher.FINISHED
        number, proposal = self.proposer.ask()
        key = str(number)
        self._started[trial_id] = time.monotonic()
        self._live[trial_id] = key
        self._issued.add(key)
        config = {**proposal.config, TRIAL_KEY: key, SCREENED_KEY: proposal.screened_params}
        if proposal.initial is not None:
            config[INITIAL_KEY] = proposal.initial
        settings = self.space.spec.search.lamarckian
        if proposal.parent is not None and settings is not None and settings.inherit:
            # a lamarckian child: trained from its parent's weights
            assert proposal.train is not None
            config[PARENT_KEY] = str(proposal.parent)
            config[CHILD_EPOCHS_KEY] = settings.epochs_for(proposal.train.epochs)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        key = self._live.pop(trial_id, None)
        started = self._started.pop(trial_id, None)
        if started is not None and not error:
            self.durations.append(time.monotonic() - started)
            if result is not None and is_final(result):
                self.full_durations.append(self.durations[-1])
        if key is None and result is not None and f"config/{TRIAL_KEY}" in result:
            key = str(result[f"config/{TRIAL_KEY}"])
        if key is None:
            return
        number = int(key)
        if error or result is None:
            self.proposer.tell_failed(number)
            self.told["failed"] += 1
        elif is_final(result):
            values = [result.get(m) for m in self.metric]
            if all(finite(v) for v in values):
                self.proposer.tell(number, [float(v) for v in values])
                self.told["complete"] += 1
            else:  # a final report without its objectives: nothing to learn from
                self.proposer.tell_failed(number)
                self.told["failed"] += 1
        else:  # stopped early by the scheduler: its low-fidelity score must not reach the front
            self.proposer.tell_pruned(number)
            self.told["pruned"] += 1

    def save(self, checkpoint_path: str) -> None:
        state = {"live": self._live, "issued": sorted(self._issued), "rejected": self.rejected,
                 "told": self.told, "spent": self.spent, "durations": self.durations,
                 "full_durations": self.full_durations,
                 "duplicates": self.duplicates, "time_budget": self.time_budget}
        # Replaced in one step: a disk that fills while it is written keeps the last one whole
        # (a cut-short snapshot fails Tuner.restore).
        tmp = Path(f"{checkpoint_path}.tmp")
        tmp.write_bytes(pickle.dumps(state))
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        state = pickle.loads(Path(checkpoint_path).read_bytes())
        self._live = dict(state["live"])
        self._issued |= set(state["issued"]) | set(self._live.values())
        self._rejected_before = int(state["rejected"])
        self._duplicates_before = int(state.get("duplicates", 0))
        self.told = dict(state["told"])
        self._spent_before = float(state.get("spent", 0.0))
        # The budget the search ran under (an earlier resume may have extended the spec's);
        # snapshots older than this key: the spec's.
        self.time_budget = state.get("time_budget", self.time_budget)
        if self.extend_s is not None:
            self.time_budget = self._spent_before + self.extend_s
            log.info("time budget: %.0f s spent, %.0f s more: %.0f s in all",
                     self._spent_before, self.extend_s, self.time_budget)
        self._t0 = None  # this process's clock starts at its start (see started_at)
        self.durations = list(state.get("durations", []))
        self.full_durations = list(state.get("full_durations", []))
        self.fail_orphans()

    def forget_lost(self, known: Iterable[str]) -> list[str]:
        """Ray trial ids this searcher holds as running but Ray Tune did not restore (not in
        ``known``): they never run, so their Optuna trials are told FAIL and their keys stop
        counting towards ``num_samples``. Returns the forgotten ids."""
        known = set(known)
        recorded = getattr(self, "_recorded", set())  # (a searcher pickled before it had one)
        lost = [tid for tid in self._live if tid not in known]
        for tid in lost:
            key = self._live.pop(tid)
            self._started.pop(tid, None)
            if key not in recorded:
                self._issued.discard(key)
            self.proposer.tell_failed(int(key))
        if lost:
            log.info("forgot %d trial(s) of the snapshot that Ray did not restore: %s",
                     len(lost), lost)
        return lost

    def fail_orphans(self) -> list[int]:
        """Tell FAIL to Optuna trials left RUNNING that no Ray trial will ever finish."""
        from optuna.trial import TrialState

        alive = {int(k) for k in self._live.values()}
        orphans = [t.number for t in self.proposer.study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in alive]
        for n in orphans:
            self.proposer.tell_failed(n)
        if orphans:
            log.info("told %d Optuna trial(s) of the interrupted driver FAIL: %s",
                     len(orphans), orphans)
        return orphans


@public("search.run")
class ForgetLostTrials(Callback):
    """On a resume, at Tune's first step (before it asks for a trial): the trials the
    restored searcher and concurrency limiter hold as running that Ray did not restore are
    forgotten (:meth:`ProposerSearcher.forget_lost`); otherwise the search would wait for
    them forever and end unfinished."""

    def __init__(self, search_alg: Any) -> None:
        self.search_alg = search_alg  # ConcurrencyLimiter(ProposerSearcher)
        self.done = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.done:
            return
        self.done = True
        from search.run import ray_compat

        known = {t.trial_id for t in trials}
        self.search_alg.searcher.forget_lost(known)
        ray_compat.limiter_forget_lost(self.search_alg, known)
