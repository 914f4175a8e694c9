"""search.run.resources: the per-trial plan against a cluster, and how many trials may be out."""

from __future__ import annotations

import pytest

from search.errors import UserError
from search.run.resources import Cluster, Node, plan
from search.spec.model import Resources

TWO_CPUS = Cluster((Node("this machine", 2.0, 0.0),), where="this machine")


def test_auto_on_two_cpus_shares_them_and_says_so():
    p = plan(Resources(auto=True, cpu=4, gpu=0.25), TWO_CPUS, max_concurrent=4, source="s.yaml")
    assert (p.cpu, p.gpu, p.concurrent) == (1.0, 0.0, 2)
    assert p.line == ("resources: auto -> 1 CPU per trial, no GPU (none found) (this machine: "
                      "2 CPUs, no GPU): up to 2 at once on this machine")


def test_under_a_time_budget_no_more_trials_are_out_than_can_run():
    # Study 000 at full data: max_concurrent 4 (for a GPU), 2 slots here, a 165-min budget.
    # Four handed out at once: two waited for a slot and started when the first two ended at
    # minute 85, past what the budget allowed.
    p = plan(Resources(auto=True, cpu=4, gpu=0.25), TWO_CPUS, max_concurrent=4, source="s.yaml")
    assert p.outstanding(4, time_budget=9900.0) == 2
    assert p.outstanding(1, time_budget=9900.0) == 1
    # Without a budget a waiting trial costs nothing: max_concurrent as asked (a node that
    # joins later gets trials at once).
    assert p.outstanding(4, time_budget=None) == 4


def test_an_autoscaling_cluster_keeps_max_concurrent():
    # Pending trials are what makes the autoscaler add nodes: never capped there.
    grows = Cluster((Node("head", 2.0, 0.0),), where="the cluster at X", autoscaling=True)
    p = plan(Resources(cpu=1), grows, max_concurrent=8, source="s.yaml")
    assert p.grows and p.concurrent == 2 and p.outstanding(8, time_budget=600.0) == 8
    none_fits = plan(Resources(cpu=4), grows, max_concurrent=8, source="s.yaml")
    assert none_fits.concurrent == 0 and none_fits.outstanding(8, time_budget=600.0) == 8


def test_a_trial_no_node_can_hold_is_refused_naming_what_was_asked():
    with pytest.raises(UserError, match=r"s.yaml: resources=\{cpu: 4, gpu: 0\} per trial is "
                                        r"more than any node has"):
        plan(Resources(cpu=4), TWO_CPUS, max_concurrent=2, source="s.yaml")
