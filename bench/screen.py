"""What the budget screen costs per proposal: the shape-only count against torch's flop counter.

Samples N feasible configs from a shipped space (``search.space.preview``: the real sampler and
screen, nothing trained), then times on each config, interleaved, in one run:

- ``count``: :func:`trainables.accounting.count` (meta build without init + shape-only pass):
  what the screen and every trial use;
- ``flop_counter``: the meta build and :func:`count_module` (a forward under torch's
  FlopCounterMode): the screen before the shape-only pass, and the reference the tests hold
  ``count`` equal to (checked here on every config too).

Prints the median / p90 milliseconds of each, the ratio, and the screen's own ms per proposal
(sampling + counting + ``fill_budget`` scaling) as ``dry_run`` measured it. CPU time of this
process, so other load on the machine moves it little. The last line is JSON.

    .venv/bin/python bench/screen.py [--space spaces/cifar10.yaml] [--n 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from search.space import dry_run
from search.spec import load_spec
from trainables.accounting import count, count_module
from trainables.models import build_model

REPO = Path(__file__).resolve().parents[1]
# (C, H, W) and classes of the datasets the shipped spaces use (no data is read).
SHAPES = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
          "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "digits": ((1, 8, 8), 10)}


def _cpu_ms(fn, *args):
    t = time.process_time()
    out = fn(*args)
    return (time.process_time() - t) * 1000, out


def _flop_counter(arch):
    with torch.device("meta"):
        model = build_model(arch)
    return count_module(model, (arch.in_channels, *arch.input_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(REPO / "spaces" / "cifar10.yaml"))
    ap.add_argument("--n", type=int, default=100, help="feasible configs to sample")
    args = ap.parse_args()
    torch.set_num_threads(1)

    spec = load_spec(args.space)
    shape, classes = SHAPES[spec.data.name]
    sampled = dry_run(spec, args.n, input_shape=shape, num_classes=classes)
    archs = [p.arch for p in sampled.proposals]
    _flop_counter(archs[0])  # first use of FlopCounterMode: ~1.5 s of one-time set-up
    count(archs[0])
    ours, ref = [], []
    for arch in archs:
        ms, a = _cpu_ms(count, arch)
        ours.append(ms)
        ms, b = _cpu_ms(_flop_counter, arch)
        ref.append(ms)
        assert a == b, f"count and the flop counter disagree on {arch}"

    def q(xs, p):
        return statistics.quantiles(xs, n=10)[p - 1] if len(xs) >= 2 else xs[0]

    med_ours, med_ref = statistics.median(ours), statistics.median(ref)
    print(f"{len(archs)} configs of {Path(args.space).name} ({sampled.rejected} over-budget "
          f"proposals screened out while sampling them)")
    print(f"{'':14} {'median ms':>10} {'p90 ms':>8}")
    print(f"{'count':14} {med_ours:10.1f} {q(ours, 9):8.1f}")
    print(f"{'flop_counter':14} {med_ref:10.1f} {q(ref, 9):8.1f}")
    print(f"count is {med_ref / med_ours:.1f}x cheaper than the flop counter (median, CPU time); "
          f"a proposal costs {sampled.ms_per_screen:.1f} ms in all (the sampler's ask + screen)")
    print(json.dumps({
        "space": Path(args.space).name, "configs": len(archs),
        "count_ms_median": round(med_ours, 2), "count_ms_p90": round(q(ours, 9), 2),
        "flop_counter_ms_median": round(med_ref, 2), "flop_counter_ms_p90": round(q(ref, 9), 2),
        "ratio_vs_flop_counter": round(med_ref / med_ours, 2),
        "screen_ms_per_proposal": round(sampled.ms_per_screen, 2),
    }))


if __name__ == "__main__":
    main()
