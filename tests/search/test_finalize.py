"""search/finalize.py: a real 4-trial search (Ray, digits), then its front retrained over seeds,
tracked in a real MLflow sqlite store."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search.errors import UserError
from search.finalize.front import final_front, front_text, typed_row
from search.finalize.record import ROLE_FINAL, final_from_store
from search.finalize.retrain import finalize_run
from search.spec import parse_spec
from search.spec.model import Finalize
from search.tracking import TAG_PARENT, TAG_ROLE, TAG_TRIAL_KEY, read_state

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

SPEC = {
    "name": "finalize-tiny",
    "data": {"name": "digits", "subset": 300},
    "search": {"sampler": "random", "num_samples": 4, "max_concurrent": 2, "seed": 1,
               "finalize": {"top": 2, "seeds": 2, "epochs": 1}},
    "train": {"epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 0.02},
    "space": {"stem": {"width": {"int": [4, 12]}}, "num_stages": 1,
              "stages": {"width": {"int": [8, 24]}, "layers": 1}},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> tuple[Path, str]:
    from search.run.driver import run_search

    tmp = tmp_path_factory.mktemp("finalize")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    outcome = run_search(parse_spec(SPEC), storage_dir=tmp / "runs", tracking_uri=uri,
                         progress=False)
    assert outcome.complete
    return outcome.run_dir, uri


def _final_runs(uri: str, run_dir: Path) -> list:
    state = read_state(run_dir)
    client = MlflowClient(uri)
    return client.search_runs([state["experiment_id"]], f"tags.`{TAG_ROLE}` = '{ROLE_FINAL}'")


def test_finalize_top2_seeds2_then_rerun_skips(searched: tuple[Path, str]) -> None:
    run_dir, uri = searched
    pareto_before = hashlib.sha256((run_dir / "pareto.csv").read_bytes()).hexdigest()
    with (run_dir / "pareto.csv").open() as f:
        front = list(csv.DictReader(f))
    # pick: best (the default): the two most accurate members, whatever their size
    front_keys = [r["trial_key"] for r in sorted(front, key=lambda r: -float(r["val_accuracy"]))][:2]

    out = finalize_run(run_dir)  # top 2, seeds 2, 1 epoch: the spec's search.finalize
    assert (out.trained, out.skipped, out.failed, out.tracking_error) == (4, 0, 0, None)
    with (run_dir / "final-pareto.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["trial_key"] for r in rows) == sorted(front_keys)
    for r in rows:
        assert r["seeds"] == "2" and r["epochs"] == "1"
        assert 0 <= float(r["val_accuracy_mean"]) <= 1 and float(r["val_accuracy_std"]) >= 0
        assert r["test_accuracy_mean"] and r["test_accuracy_std"] != ""
        assert int(r["nonzero_params"]) > 0
        # pareto.csv's names carry the means, for tools that read a front
        assert (r["val_accuracy"], r["test_accuracy"]) == (r["val_accuracy_mean"], r["test_accuracy_mean"])
    assert any(r["on_front"] == "True" for r in rows)
    assert (run_dir / "final-pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == sorted(
        f"{k}-s{s}" for k in front_keys for s in (0, 1))
    assert all((run_dir / "final" / f"{k}-s0" / "model.pt").is_file() for k in front_keys)
    # The search's front is left as it was.
    assert hashlib.sha256((run_dir / "pareto.csv").read_bytes()).hexdigest() == pareto_before

    # MLflow: 4 final runs nested under the parent, nothing RUNNING, the front on the parent.
    parent = read_state(run_dir)["parent_run_id"]
    finals = _final_runs(uri, run_dir)
    assert len(finals) == 4
    assert {r.data.tags[TAG_PARENT] for r in finals} == {parent}
    assert sorted(r.data.tags[TAG_TRIAL_KEY] for r in finals) == sorted(front_keys * 2)
    assert all("val_accuracy" in r.data.metrics and "test_accuracy" in r.data.metrics
               for r in finals)
    client = MlflowClient(uri)
    every = client.search_runs([read_state(run_dir)["experiment_id"]], "")
    assert not [r.info.run_id for r in every if r.info.status == "RUNNING"]
    assert {"final-pareto.csv", "final-pareto.png"} <= {a.path for a in client.list_artifacts(parent)}
    assert sorted(r["trial_key"] for r in final_from_store(uri)) == sorted(front_keys)

    again = finalize_run(run_dir)
    assert (again.trained, again.skipped, again.failed) == (0, 4, 0)
    assert len(_final_runs(uri, run_dir)) == 4  # no second run for a finished retraining


def test_time_budget_trains_in_pick_order_and_leaves_out_what_cannot_fit(
        searched: tuple[Path, str]) -> None:
    run_dir, _ = searched
    with (run_dir / "pareto.csv").open() as f:
        ranked = [r["trial_key"] for r in sorted(csv.DictReader(f),
                                                 key=lambda r: -float(r["val_accuracy"]))][:2]
    # A budget every planned retraining fits in: all 4 trained, the best member's seeds first
    # (40 epochs: a recipe not trained before), a progress line with their epochs meanwhile.
    shown: list[str] = []
    out = finalize_run(run_dir, epochs=40, time_budget="2h", mlflow=False, echo=shown.append,
                       progress_s=0.2)
    assert (out.trained, out.failed, out.left_out) == (4, 0, ())
    board = [line for line in shown if line.startswith("final ") and " | " in line]
    assert board and all(re.fullmatch(r"final [0-4]/4 done, [0-4] running, 0 failed \| .+ \| "
                                      r"\d+/120 min", line) for line in board), shown
    assert any(re.search(r"-s[01] epoch ([1-9]|[1-3]\d|40)/40 val 0\.\d{4}", line)
               for line in board), board
    started = {p.parent.name: json.loads(p.read_text())["started_at"]
               for p in (run_dir / "final").glob("*/result.json")}
    first = [k for k in started if k.startswith(f"{ranked[0]}-s")]
    assert len(first) == 2 and all(started[k] <= min(started[j] for j in started if j not in first)
                                   for k in first)
    # 5,000 epochs at the trials' measured pace cannot end in 30 s: nothing starts.
    lines: list[str] = []
    none = finalize_run(run_dir, epochs=5000, time_budget=30, mlflow=False, echo=lines.append)
    assert (none.trained, none.failed) == (0, 0)
    assert sorted(none.left_out) == sorted(f"{k}-s{s}" for k in ranked for s in (0, 1))
    assert any("0 retrainings planned" in line for line in lines)
    assert sum("past the budget" in line for line in lines) == 2
    assert none.summary()["left_out"] == list(none.left_out)
    with pytest.raises(UserError, match=r"--time-budget '3 weeks' is invalid"):
        finalize_run(run_dir, time_budget="3 weeks")


def test_bad_overrides_are_user_errors(searched: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = searched
    with pytest.raises(UserError, match="--seeds 0 is invalid"):
        finalize_run(run_dir, seeds=0)
    with pytest.raises(UserError, match="no such run directory"):
        finalize_run(tmp_path / "nowhere")


def test_spec_section_defaults_and_errors() -> None:
    spec = parse_spec({"data": {"name": "digits"}, "search": {"finalize": {}}})
    assert spec.search.finalize == Finalize(top=None, seeds=2, epochs=None)
    assert parse_spec(spec.to_dict()).search.finalize == spec.search.finalize
    assert parse_spec({"data": {"name": "digits"}}).search.finalize is None
    with pytest.raises(UserError, match=r"x.yaml: search.finalize.top=0 is invalid: expected an "
                                        r"integer >= 1 or null"):
        parse_spec({"data": {"name": "digits"}, "search": {"finalize": {"top": 0}}},
                   source="x.yaml")
    assert spec.search.finalize.pick == "best" and spec.search.finalize.train == {}
    longer = parse_spec({"data": {"name": "digits"},
                         "search": {"finalize": {"epochs": 30, "train": {"crop_padding": 4, "ema": 0.99}}}})
    assert longer.search.finalize.train == {"crop_padding": 4, "ema": 0.99}
    assert parse_spec(longer.to_dict()).search.finalize == longer.search.finalize
    for bad, match in (({"epochs": 3}, r"train\.epochs is not allowed here: search\.finalize\.epochs"),
                       ({"lrr": 0.1}, r"search\.finalize\.train\.lrr is not a known key"),
                       ({"seed": 3}, r"x.yaml: search\.finalize\.train\.seed is not allowed here: each repeat's seed"),
                       ({"ema": 1.5}, r"search\.finalize\.train\.ema=1\.5 is invalid: expected a number in \[0, 1\)"),
                       ({"lr": {"float": [0.1, 0.2]}}, r"search\.finalize\.train\.lr=.* is invalid: expected a fixed value")):
        with pytest.raises(UserError, match=match):
            parse_spec({"data": {"name": "digits"}, "search": {"finalize": {"train": bad}}},
                       source="x.yaml")
    timed = parse_spec({"data": {"name": "digits"}, "search": {"finalize": {"time_budget": "75m"}}})
    assert timed.search.finalize.time_budget == 4500.0
    assert parse_spec(timed.to_dict()).search.finalize == timed.search.finalize
    with pytest.raises(UserError, match=r"x.yaml: search.finalize.time_budget='soon' is invalid: "
                                        r"expected a positive duration"):
        parse_spec({"data": {"name": "digits"}, "search": {"finalize": {"time_budget": "soon"}}},
                   source="x.yaml")
    with pytest.raises(UserError, match=r"x.yaml: search.finalize.pick='largest' is invalid: "
                                        r"expected one of best, smallest"):
        parse_spec({"data": {"name": "digits"}, "search": {"finalize": {"pick": "largest"}}},
                   source="x.yaml")
    capped = parse_spec({"data": {"name": "digits"},
                         "search": {"finalize": {"under": {"flash_bytes": [24000, 64000], "macs": 1e6}}}})
    assert capped.search.finalize.under == {"flash_bytes": (24000, 64000), "macs": (1e6,)}
    assert parse_spec(capped.to_dict()).search.finalize == capped.search.finalize
    for bad, match in (({"under": {"flash": 1}}, r"search\.finalize\.under\.flash is not a known key"),
                       ({"under": {"flash_bytes": [0]}}, r"under\.flash_bytes=\[0\] is invalid: expected a number > 0"),
                       ({"top": 2, "under": {"macs": 1}}, r"search\.finalize\.top=2 cannot go with search\.finalize\.under")):
        with pytest.raises(UserError, match=match):
            parse_spec({"data": {"name": "digits"}, "search": {"finalize": bad}}, source="x.yaml")


def test_pick_smallest_or_best_of_the_front(searched: tuple[Path, str]) -> None:
    from search.finalize.retrain import front_members, open_run

    run_dir, _ = searched
    with (run_dir / "pareto.csv").open() as f:
        front = sorted(csv.DictReader(f), key=lambda r: int(r["nonzero_params"]))
    run = open_run(run_dir)
    assert len(front) >= 2 and front[0]["val_accuracy"] < front[-1]["val_accuracy"]
    smallest = front_members(run, top=1, epochs=1, pick="smallest")
    assert [m.trial_key for m in smallest] == [front[0]["trial_key"]]
    best = front_members(run, top=1, epochs=1, pick="best", objective=("val_accuracy", "max"))
    assert [m.trial_key for m in best] == [front[-1]["trial_key"]]  # a front: the largest is best
    fewest = front_members(run, top=1, epochs=1, pick="best", objective=("nonzero_params", "min"))
    assert [m.trial_key for m in fewest] == [front[0]["trial_key"]]  # a minimised objective
    over = front_members(run, top=1, epochs=5, overrides={"crop_padding": 1, "ema": 0.9})
    recorded = front_members(run, top=1, epochs=None)[0].train
    assert over[0].train == recorded.replace(epochs=5, crop_padding=1, ema=0.9)
    params = [int(m.search_point["nonzero_params"]) for m in front_members(run, top=2, epochs=1)]
    assert params == sorted(params)  # listed smallest first
    assert len(front_members(run, top=None, epochs=1, pick="best")) == len(front)
    # under: per cap the best at or under it (one front, several deployment targets); a cap
    # below every member says so and picks nothing; a member under two caps is trained once.
    said: list[str] = []
    small, large = int(front[0]["nonzero_params"]), int(front[-1]["nonzero_params"])
    caps = front_members(run, top=None, epochs=1, pick="best", echo=said.append,
                         under={"nonzero_params": (small - 1, small, large, large + 5)})
    assert [m.trial_key for m in caps] == [front[0]["trial_key"], front[-1]["trial_key"]]
    assert said[0] == f"no front member has nonzero_params <= {small - 1:,}: nothing to retrain for it"
    assert said[1].startswith(f"nonzero_params <= {small:,}: trial {front[0]['trial_key']} ")


class _M:  # the Member fields final_front reads
    def __init__(self, key: str, seed: int = 0) -> None:
        self.trial_key, self.prune_round, self.label = key, 0, key
        self.search_point = {"val_accuracy": "0.5"}
        self.train = type("T", (), {"epochs": 3, "seed": seed})()
        self.arch = type("A", (), {"canonical": lambda _self: f"net{key}"})()

    def job_id(self, seed: int) -> str:
        return f"{self.label}-s{seed}"


def test_final_front_by_hand() -> None:
    def rec(acc: float, params: int) -> dict:
        return {"status": "FINISHED", "metrics": {"val_accuracy": acc, "test_accuracy": acc,
                                                  "nonzero_params": params}}

    records = {"a-s0": rec(0.6, 100), "a-s1": rec(0.8, 100),  # mean 0.7
               "b-s0": rec(0.5, 200), "b-s1": rec(0.7, 200),  # mean 0.6, larger: dominated
               "c-s0": rec(0.9, 300), "c-s1": {"status": "FAILED", "metrics": {}}}
    rows = final_front([_M("a"), _M("b"), _M("c")], records, [0, 1],
                       objectives=[("val_accuracy", "max"), ("nonzero_params", "min")])
    by = {r["trial_key"]: r for r in rows}
    assert by["a"]["val_accuracy_mean"] == pytest.approx(0.7)
    assert by["a"]["val_accuracy_std"] == pytest.approx(0.1414213562)
    assert (by["c"]["seeds"], by["c"]["val_accuracy_std"]) == (1, None)
    assert {k: r["on_front"] for k, r in by.items()} == {"a": True, "b": False, "c": True}
    # The table: a member of one seed shows its mean alone (no "+--"); the JSON of a
    # final-pareto.csv row (all text) has numbers, booleans and None.
    table = front_text(rows).splitlines()
    (c_line,) = [ln for ln in table if ln.split()[1] == "c"]
    assert "+-" not in c_line and "0.9000" in c_line
    assert "0.7000+-0.1414" in next(ln for ln in table if ln.split()[1] == "a")
    typed = typed_row({k: "" if v is None else str(v) for k, v in by["c"].items()})
    assert (typed["trial_key"], typed["seeds"], typed["val_accuracy_std"], typed["on_front"],
            typed["val_accuracy_mean"]) == ("c", 1, None, True, pytest.approx(0.9))


def test_a_retraining_keeps_its_cpus_while_it_reports_epochs(ray_session: None) -> None:
    """Ray lends a task's CPUs to queued tasks while the task blocks in ``ray.get``: epoch reports
    that waited on the queue's actor let a second 2-CPU retraining start beside the first on 2
    CPUs (4 threads on 2 cores: ResNet-8 trained at ~150 s an epoch each, 18 s one at a time).
    So a report is sent without waiting, and it still arrives."""
    import ray
    from ray.util.queue import Queue

    from search.finalize.progress import report_epochs

    @ray.remote(num_cpus=2)
    def job(queue: Queue, name: str) -> tuple[float, float]:
        began, report = time.time(), report_epochs(queue, name, 3)
        for epoch in (1, 2, 3):
            report({"epoch": epoch, "val_accuracy": 0.5})
            time.sleep(0.3)
        return began, time.time()

    queue = Queue(actor_options={"num_cpus": 0})
    try:
        (a0, a1), (b0, b1) = ray.get([job.remote(queue, "a"), job.remote(queue, "b")], timeout=120)
        assert a1 <= b0 or b1 <= a0, f"both ran at once: a {a0:.2f}-{a1:.2f}, b {b0:.2f}-{b1:.2f}"
        deadline, items = time.monotonic() + 30, []
        while len(items) < 6 and time.monotonic() < deadline:
            items += queue.get_nowait_batch(queue.qsize())
            time.sleep(0.1)
        assert sorted(items) == [(n, e, 3, 0.5) for n in "ab" for e in (1, 2, 3)]
    finally:
        queue.shutdown(force=True)
