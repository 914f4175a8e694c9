"""Pareto maths on hand-computed tables (ties, duplicates, infinities, NaN, empty input)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna._hypervolume import compute_hypervolume

from search.rundir.pareto import front_indices, hypervolume_2d, pareto_ranks

INF, NAN = math.inf, math.nan
ACC_PARAMS = ("max", "min")  # (val_accuracy, nonzero_params)


@pytest.mark.parametrize(
    ("points", "senses", "ranks"),
    [
        ([], ACC_PARAMS, []),
        ([(0.9, 100)], ACC_PARAMS, [0]),
        # a trade-off: both on the front
        ([(0.9, 100), (0.8, 50)], ACC_PARAMS, [0, 0]),
        # (0.8, 200) is worse on both counts than (0.9, 100)
        ([(0.9, 100), (0.8, 200)], ACC_PARAMS, [0, 1]),
        # duplicates never dominate each other
        ([(0.9, 100), (0.9, 100), (0.8, 200)], ACC_PARAMS, [0, 0, 1]),
        # a tie on one objective: better on the other decides
        ([(0.9, 100), (0.9, 90)], ACC_PARAMS, [1, 0]),
        # three fronts in a chain, given out of order
        ([(0.7, 300), (0.9, 100), (0.8, 200)], ACC_PARAMS, [2, 0, 1]),
        # rank 1 holds two points dominated only by the front
        ([(0.9, 10), (0.8, 15), (0.85, 20), (0.5, 30)], ACC_PARAMS, [0, 1, 1, 2]),
        # infinities compare as numbers: +inf accuracy dominates, +inf params is worst
        ([(INF, 100), (0.9, 100)], ACC_PARAMS, [0, 1]),
        ([(0.9, INF), (0.9, 100)], ACC_PARAMS, [1, 0]),
        # NaN is the worst value of its objective
        ([(NAN, 100), (0.5, 100)], ACC_PARAMS, [1, 0]),
        ([(NAN, 10), (0.5, 100)], ACC_PARAMS, [0, 0]),
        ([(0.5, NAN), (0.5, INF)], ACC_PARAMS, [0, 0]),
        # all minimised, three objectives (error, params, macs)
        ([(0.1, 10, 5), (0.1, 10, 6), (0.2, 5, 6)], ("min", "min", "min"), [0, 1, 0]),
        # all maximised
        ([(1, 1), (2, 2), (2, 1)], ("max", "max"), [2, 0, 1]),
    ],
)
def test_pareto_ranks_table(points, senses, ranks):
    assert pareto_ranks(points, senses) == ranks


def test_front_indices_keeps_input_order_and_duplicates():
    points = [(0.8, 200), (0.9, 100), (0.5, 10), (0.9, 100)]
    assert front_indices(points, ACC_PARAMS) == [1, 2, 3]
    assert front_indices([], ACC_PARAMS) == []


@pytest.mark.parametrize(
    ("points", "senses", "message"),
    [
        ([(1, 2)], ("max", "maximize"), "senses[1]='maximize'"),
        ([(1, 2), (1,)], ACC_PARAMS, "points[1] has 1 values"),
    ],
)
def test_pareto_ranks_rejects_bad_input(points, senses, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pareto_ranks(points, senses)


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 10**6)), max_size=25))
@settings(max_examples=60, deadline=None)
def test_front_points_are_never_dominated(points):
    ranks = pareto_ranks(points, ACC_PARAMS)
    for i, r in enumerate(ranks):
        # every point of rank r > 0 is dominated by some point of rank r - 1
        if r > 0:
            assert any(
                ranks[j] == r - 1 and points[j][0] >= points[i][0] and points[j][1] <= points[i][1]
                and points[j] != points[i]
                for j in range(len(points))
            )
        # no point dominates a point of equal or better rank
        for j, p in enumerate(points):
            if ranks[j] >= r and p != points[i]:
                assert not (p[0] >= points[i][0] and p[1] <= points[i][1])


# y = log10(params) / log10(ref): with ref 1e4, 10 params -> 0.25, 100 -> 0.5, 1000 -> 0.75.
@pytest.mark.parametrize(
    ("errors", "params", "ref", "hv"),
    [
        ([], [], 1e4, 0.0),
        ([0.0], [1], 1e4, 1.0),  # perfect accuracy with one parameter fills the box
        ([0.5], [100], 1e4, 0.25),  # (1-0.5) * (1-0.5)
        ([0.2], [10], 1e4, 0.8 * 0.75),
        # a trade-off, swept in x: (0.2, 0.5) adds 0.8*0.5, then (0.5, 0.25) adds 0.5*0.25
        ([0.5, 0.2], [10, 100], 1e4, 0.8 * 0.5 + 0.5 * 0.25),
        # a dominated point and a duplicate add nothing
        ([0.2, 0.3, 0.2], [10, 100, 10], 1e4, 0.8 * 0.75),
        # at or over the budget (y >= 1) or error >= 1: outside the box
        ([0.1, 0.1, 1.0], [10_000, 50_000, 10], 1e4, 0.0),
        # NaN ignored, -inf error clipped to 0, params < 1 clipped to y = 0
        ([NAN, 0.5, -INF], [10, NAN, 100], 1e4, 1.0 * 0.5),
        ([0.5], [0], 1e4, 0.5),
        # no budget: reference 1e7, so 1000 params -> y = 3/7
        ([0.0], [1000], None, 1 - 3 / 7),
    ],
)
def test_hypervolume_2d_table(errors, params, ref, hv):
    assert hypervolume_2d(errors, params, max_params_ref=ref) == pytest.approx(hv)


def test_hypervolume_2d_rejects_bad_input():
    with pytest.raises(ValueError, match="max_params_ref=1"):
        hypervolume_2d([0.1], [10], max_params_ref=1)
    with pytest.raises(ValueError, match="must be equal"):
        hypervolume_2d([0.1], [10, 20], max_params_ref=100)


@given(st.lists(st.tuples(st.floats(0, 0.999), st.integers(1, 9_999)), min_size=1, max_size=30))
@settings(max_examples=60, deadline=None)
def test_hypervolume_2d_matches_optuna(points):
    """Cross-check the sweep against Optuna's (private) exact hypervolume in the same box."""
    errors = [e for e, _ in points]
    params = [p for _, p in points]
    xy = np.array([[e, math.log10(p) / 4] for e, p in points])
    expected = compute_hypervolume(xy, np.array([1.0, 1.0]))
    assert hypervolume_2d(errors, params, max_params_ref=1e4) == pytest.approx(expected)
