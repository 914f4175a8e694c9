"""Pareto maths for the search: non-dominated sorting and a fixed-reference 2-d hypervolume.

Pure functions on plain numbers, so the tracker, the CLI and the tests share one definition.

Conventions:
- ``senses`` name each objective's direction: ``"max"`` or ``"min"``.
- NaN is the worst possible value of its objective (a trial that reported NaN never dominates
  anything); infinities compare as usual (``+inf`` is the best "max" value, the worst "min").
- Equal points do not dominate each other, so duplicates share a rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SENSES = ("max", "min")
# Hypervolume y-axis reference when the search has no parameter budget (10M params).
DEFAULT_MAX_PARAMS_REF = 1e7


def _as_minimised(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[list[float]]:
    """Points with every objective turned into "smaller is better" and NaN into +inf."""
    for i, s in enumerate(senses):
        if s not in SENSES:
            raise ValueError(f"senses[{i}]={s!r} is invalid: expected one of {', '.join(SENSES)}")
    out = []
    for i, p in enumerate(points):
        if len(p) != len(senses):
            raise ValueError(
                f"points[{i}] has {len(p)} values but there are {len(senses)} senses"
            )
        row = []
        for v, s in zip(p, senses, strict=True):
            v = float(v)
            row.append(math.inf if math.isnan(v) else (-v if s == "max" else v))
        out.append(row)
    return out


def _dominates(a: list[float], b: list[float]) -> bool:
    """a is no worse than b everywhere and strictly better somewhere (both minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def pareto_ranks(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[int]:
    """Non-dominated sorting (Deb's fast sort): rank 0 is the Pareto front, 1 the next, ...

    ``points[i]`` holds one value per objective, in the order of ``senses``.
    """
    pts = _as_minimised(points, senses)
    n = len(pts)
    dominated_by: list[list[int]] = [[] for _ in range(n)]  # i -> points that i dominates
    n_dominating = [0] * n  # how many points dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if _dominates(pts[i], pts[j]):
                dominated_by[i].append(j)
                n_dominating[j] += 1
            elif _dominates(pts[j], pts[i]):
                dominated_by[j].append(i)
                n_dominating[i] += 1
    ranks = [0] * n
    current = [i for i in range(n) if n_dominating[i] == 0]
    rank = 0
    while current:
        nxt = []
        for i in current:
            ranks[i] = rank
            for j in dominated_by[i]:
                n_dominating[j] -= 1
                if n_dominating[j] == 0:
                    nxt.append(j)
        current = nxt
        rank += 1
    return ranks


def crowding_distances(points: Sequence[Sequence[float]], senses: Sequence[str],
                       ranks: Sequence[int] | None = None) -> list[float]:
    """NSGA-II crowding distance of each point within its sorting front (``ranks``, computed
    when not given): the sum over objectives of the gap between its two neighbours, scaled
    by the front's range; inf at a front's ends. Larger means less crowded."""
    pts = _as_minimised(points, senses)
    if ranks is None:
        ranks = pareto_ranks(points, senses)
    out = [0.0] * len(pts)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for k in range(len(senses)):
            members.sort(key=lambda i: pts[i][k])
            lo, hi = pts[members[0]][k], pts[members[-1]][k]
            out[members[0]] = out[members[-1]] = math.inf
            span = hi - lo
            if not math.isfinite(span) or span <= 0:
                continue
            for a, i, b in zip(members, members[1:], members[2:], strict=False):
                out[i] += (pts[b][k] - pts[a][k]) / span
    return out


def front_indices(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (rank 0), in input order."""
    return [i for i, r in enumerate(pareto_ranks(points, senses)) if r == 0]


def hypervolume_2d(
    errors: Sequence[float],
    params: Sequence[float],
    *,
    max_params_ref: float | None = None,
) -> float:
    """Area dominated by (error, params) points inside a fixed box; larger is better, max 1.

    The box is fixed so that values are comparable across searches and over time:
    x = error (1 - accuracy, in [0, 1]); y = log10(params) / log10(max_params_ref), where
    ``max_params_ref`` is the search's parameter budget (``DEFAULT_MAX_PARAMS_REF`` = 1e7 when
    there is none). The reference point is (1, 1): a point with x >= 1 or y >= 1 (at or over
    the budget) contributes nothing. Negative coordinates (params < 1) are clipped to 0; points
    with a NaN coordinate are ignored.
    """
    if len(errors) != len(params):
        raise ValueError(f"{len(errors)=} and {len(params)=} must be equal")
    ref = DEFAULT_MAX_PARAMS_REF if max_params_ref is None else float(max_params_ref)
    if not ref > 1:
        raise ValueError(f"{max_params_ref=} must be > 1 (it is the log-scale's top)")
    log_ref = math.log10(ref)
    pts = []
    for e, p in zip(errors, params, strict=True):
        e, p = float(e), float(p)
        if math.isnan(e) or math.isnan(p):
            continue
        y = math.log10(p) / log_ref if p > 0 else 0.0
        x, y = max(e, 0.0), max(y, 0.0)
        if x < 1.0 and y < 1.0:
            pts.append((x, y))
    # Sweep in x: each point adds the strip between its y and the lowest y seen so far.
    area, best_y = 0.0, 1.0
    for x, y in sorted(pts):
        if y < best_y:
            area += (1.0 - x) * (best_y - y)
            best_y = y
    return area
