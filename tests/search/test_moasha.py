"""Multi-objective ASHA: the rung rule, and on a real Ray Tune run next to Ray's own ASHA."""

from __future__ import annotations

import math

import pytest
from ray.tune.schedulers import TrialScheduler

from search.run.moasha import MultiObjectiveASHA
from search.rundir.pareto import crowding_distances

pytestmark = pytest.mark.ray  # starts Ray (in-process or a CLI search)

ACC_PARAMS = [("val_accuracy", "max"), ("nonzero_params", "min")]
STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def make(**kw) -> MultiObjectiveASHA:
    return MultiObjectiveASHA(**{"objectives": ACC_PARAMS, "max_t": 9, "grace_period": 1,
                                 "reduction_factor": 3, **kw})


def test_rungs_follow_grace_and_reduction_factor():
    assert make().rungs == [1, 3]
    assert make(max_t=30, grace_period=2, reduction_factor=2).rungs == [2, 4, 8, 16]
    with pytest.raises(ValueError, match="reduction_factor=1"):
        make(reduction_factor=1)
    with pytest.raises(ValueError, match="max_t=0"):
        make(max_t=0)
    with pytest.raises(ValueError, match="objectives"):
        make(objectives=[("val_accuracy", "up")])


def test_a_small_net_is_never_stopped_for_being_less_accurate_than_a_big_one():
    s = make()
    # a big accurate net, then smaller and less accurate ones: each is on the rung's front
    for key, acc, params in [("big", 0.95, 4000), ("mid", 0.90, 1500), ("small", 0.80, 500),
                             ("tiny", 0.60, 120)]:
        assert s._on_result(key, {"epoch": 1, "val_accuracy": acc, "nonzero_params": params}) \
            == CONTINUE, key
    # dominated (bigger and worse than "mid") and out of the top third: stopped
    assert s._on_result("bad", {"epoch": 1, "val_accuracy": 0.70, "nonzero_params": 2000}) == STOP
    # at the next rung the rule starts again with what reached it
    assert s._on_result("big", {"epoch": 3, "val_accuracy": 0.97, "nonzero_params": 4000}) \
        == CONTINUE
    assert s.recorded[1].keys() == {"big", "mid", "small", "tiny", "bad"}
    assert s.recorded[3].keys() == {"big"}
    # a report between rungs or a second one at a recorded rung changes nothing
    assert s._on_result("small", {"epoch": 2, "val_accuracy": 0.1, "nonzero_params": 500}) \
        == CONTINUE
    assert s._on_result("small", {"epoch": 1, "val_accuracy": 0.1, "nonzero_params": 500}) \
        == CONTINUE
    # reaching max_t is the end (as Ray's ASHA)
    assert s._on_result("big", {"epoch": 9, "val_accuracy": 0.98, "nonzero_params": 4000}) == STOP


def test_a_pruning_trial_is_ranked_by_the_size_it_will_deliver():
    s = make()
    assert s._on_result("dense", {"epoch": 1, "val_accuracy": 0.9, "nonzero_params": 2000},
                        {"meta/screened_params": 2000}) == CONTINUE
    # it reports 4,000 dense params at its first rung, and will deliver 1,000 after pruning:
    # less accurate than "dense" but smaller, so on the rung's front
    report = {"epoch": 1, "val_accuracy": 0.8, "nonzero_params": 4000}
    assert s._on_result("ticket", report, {"meta/screened_params": 1000}) == CONTINUE
    assert s.recorded[1]["ticket"] == (0.8, 1000.0)
    # by its dense count it would have been dominated and stopped
    assert s._on_result("ticket-2", report) == STOP
    # ranked by deploy_params, a pruning trial on a frozen trunk delivers its pruned head plus
    # the whole trunk: 1,000 + (reported deploy 9,000 - reported nonzero 4,000)
    s = make(objectives=[("val_accuracy", "max"), ("deploy_params", "min")])
    s._on_result("trunk", {**report, "deploy_params": 9000}, {"meta/screened_params": 1000})
    assert s.recorded[1]["trunk"] == (0.8, 6000.0)


def test_dominated_trials_keep_the_top_share_of_the_order():
    s = make()
    front = [(0.9, 1000.0)]
    # second: dominated, 2 points, keep ceil(2/3) = 1: the front point only
    assert not s.goes_on((0.8, 1200.0), front)
    # with many dominated ones recorded, a dominated point at the top of the second sorting
    # front is inside the top third
    others = [(0.9, 1000.0), (0.5, 3000.0), (0.4, 3500.0), (0.3, 3900.0), (0.2, 4000.0)]
    assert s.goes_on((0.85, 1100.0), others)
    assert not s.goes_on((0.25, 3950.0), others)
    # a trial that reported no accuracy (or NaN) ranks last
    assert not s.goes_on((math.nan, 100.0), others)
    assert s._on_result("x", {"epoch": 1, "nonzero_params": 10}) == CONTINUE  # nothing to rank
    assert s.recorded[1] == {}


def test_crowding_distance_prefers_spread_points():
    pts = [(0.9, 1000.0), (0.89, 990.0), (0.7, 500.0), (0.5, 100.0)]
    d = crowding_distances(pts, ["max", "min"])
    assert d[0] == d[3] == math.inf  # the front's ends
    assert d[2] > d[1] > 0  # (0.7, 500) has wider gaps than (0.89, 990)


def test_save_restore_keeps_the_rungs(tmp_path):
    s = make()
    s._on_result("a", {"epoch": 1, "val_accuracy": 0.9, "nonzero_params": 100})
    s.save(str(tmp_path / "sched.pkl"))
    t = make()
    t.restore(str(tmp_path / "sched.pkl"))
    assert t.recorded == s.recorded and t.rungs == s.rungs


def test_on_a_real_tune_run_small_nets_reach_the_end_where_asha_stops_them(tmp_path):
    """Synthetic learning curves on real Ray Tune: accuracy grows with size and epochs, so
    Ray's ASHA (accuracy alone) stops the small nets, and multi-objective ASHA keeps them."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    def trainable(config: dict) -> None:
        params = config["params"]
        for epoch in range(1, 10):
            acc = 1 - 0.5 / math.log10(params) - 0.2 / epoch - config["noise"]
            tune.report({"epoch": epoch, "val_accuracy": acc, "nonzero_params": params})

    # from big to small: each new net is less accurate than everything before it
    params = [8000, 4000, 2000, 1000, 500, 200]
    space = {"params": tune.grid_search(params), "noise": 0.0}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        ends = {}
        for name, scheduler in [
            ("asha", ASHAScheduler(time_attr="epoch", metric="val_accuracy", mode="max",
                                   max_t=9, grace_period=1, reduction_factor=3)),
            ("moasha", make()),
        ]:
            grid = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
                run_config=tune.RunConfig(storage_path=str(tmp_path / name), verbose=0),
            ).fit()
            ends[name] = {r.config["params"]: r.metrics["epoch"] for r in grid}
    finally:
        if started_here:
            ray.shutdown()
    assert ends["moasha"] == dict.fromkeys(params, 9)  # every one is on its rung's front
    assert sum(e < 9 for e in ends["asha"].values()) >= 3  # the small ones, cut early
    assert ends["asha"][200] == 1
