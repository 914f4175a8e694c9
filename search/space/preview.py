"""A dry run: what a search would propose, screened but never trained (``--dry-run N``).

:func:`dry_run` asks the spec's sampler for N feasible configs (initial points checked first,
as a search does), :class:`DryRun` holds them with the rejection count and the screen cost,
and :func:`text_histogram` draws the size histograms. ``search.space`` re-exports these.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from search.space.proposer import Proposer, SpaceExhausted
from search.space.searchspace import Proposal, SearchSpace, check_initial
from search.spec.model import SearchSpec

__all__ = ["DryRun", "dry_run", "text_histogram"]


@dataclass(frozen=True)
class DryRun:
    """What a search would propose, screened but never trained."""

    proposals: tuple[Proposal, ...]  # the feasible ones, in order
    rejected: int  # infeasible proposals skipped on the way
    ms_per_screen: float  # wall time per proposal (suggest + build + count), milliseconds
    asked: int = 0  # how many feasible configs were asked for
    exhausted: bool = False  # the space holds fewer distinct configs than asked: all are listed

    @property
    def feasible_fraction(self) -> float:
        total = len(self.proposals) + self.rejected
        return len(self.proposals) / total if total else 0.0

    def text(self) -> str:
        params = [p.screened_params or 0 for p in self.proposals]
        macs = [p.accounting.macs if p.accounting else 0 for p in self.proposals]
        lines = [
            f"{len(self.proposals)} feasible proposals, {self.rejected} rejected "
            f"(feasible fraction {self.feasible_fraction:.0%}), {self.ms_per_screen:.1f} ms "
            "per screen",
            "",
            "nonzero params (delivered):",
            text_histogram(params),
            "",
            "MACs:",
            text_histogram(macs),
            "",
        ]
        deploy = [p.deploy_params or 0 for p in self.proposals]
        ships_more = deploy != params  # a frozen trunk: what ships is not what trains
        if ships_more:
            lines += ["deploy params (every weight shipped, frozen trunks too):",
                      text_histogram(deploy), ""]
        lines.append("first proposals:" + ("  (nonzero params, deploy params)" if ships_more
                                            else ""))
        if self.exhausted:
            lines[-1] = (f"the space holds only {len(self.proposals)} distinct configs (asked for "
                         f"{self.asked}); all of them:")
        shown = self.proposals if self.exhausted else self.proposals[:10]
        lines += [f"  {p.screened_params:>10,}" + (f" {p.deploy_params:>11,}" if ships_more else "")
                  + f"  {p.arch}" for p in shown]
        return "\n".join(lines)


def dry_run(
    spec: SearchSpec, n: int, *, input_shape: Sequence[int], num_classes: int
) -> DryRun:
    """Sample ``n`` feasible configs with the spec's sampler (nothing is trained)."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"{n=} must be an integer >= 1")
    check_initial(spec)  # a bad initial point is refused before anything is sampled
    space = SearchSpace(spec, input_shape=input_shape, num_classes=num_classes)
    proposer = Proposer(space, sampler=spec.search.sampler, seed=spec.search.seed,
                        max_rejects=spec.search.max_rejects)
    start = time.perf_counter()
    found: list[Proposal] = []
    exhausted = False
    try:
        while len(found) < n:
            found.append(proposer.ask()[1])
    except SpaceExhausted:
        exhausted = True
    elapsed = time.perf_counter() - start
    asked = len(found) + proposer.rejected + proposer.duplicates
    return DryRun(tuple(found), proposer.rejected, 1000 * elapsed / max(1, asked), asked=n,
                  exhausted=exhausted)


def text_histogram(values: Sequence[float], *, bins: int = 8, width: int = 40) -> str:
    """Log-spaced bins of positive values as ``lo - hi | ##### count`` lines."""
    vals = [v for v in values if v > 0]
    if not vals:
        return "  (none)"
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    if hi == lo:
        return f"  {min(vals):>12,.0f} | {'#' * width} {len(vals)}"
    step = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(int((math.log10(v) - lo) / step), bins - 1)] += 1
    top = max(counts)
    return "\n".join(
        f"  {10 ** (lo + i * step):>12,.0f} - {10 ** (lo + (i + 1) * step):>12,.0f} | "
        f"{'#' * round(width * c / top)} {c}"
        for i, c in enumerate(counts)
    )
