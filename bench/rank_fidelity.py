"""Rank fidelity of cheap signals: do they order the networks of one size band as training does?

A search with size as an objective needs a cheap signal that ranks networks *of the same size*
by how well they will train; one that ranks by size alone is worthless (the size is already
known, screened before training). For each of N networks of a space, every signal below is
compared with the reference (the val accuracy after the space's own training, or a recorded
trial's) by Kendall's tau **within size bands** (nonzero params cut into ``--bands`` log-spaced
bands; the bands' taus averaged, each weighted by its number of pairs), and overall:

- ``params``: log10 nonzero params, the size itself (its within-band tau shows how much size
  still explains inside a band);
- ``synflow``: SynFlow (Tanaka et al. 2020) at initialization: sum |theta * dR/dtheta| of the
  network with absolute weights on an all-ones input (log of it; float64);
- ``naswot``: NASWOT (Mellor et al. 2021): log|det K| of the Hamming-similarity kernel of the
  binary activation codes of one batch (``--batch`` training images) at initialization;
- ``jacob_cov``: Jacobian covariance (Mellor et al. 2020, v1): the correlations of the input
  Jacobians of one batch, scored by their eigenvalues;
- ``subset``: the val accuracy after the same training on 1/``--subset-divisor`` of the
  training images (reduced fidelity; costs training);
- ``epochs``: ... after 1/``--epochs-divisor`` of the epochs (the schedule shortened with them),
  when the reference trains more than one;
- ``seed``: the reference training again with another seed (the ceiling: how well the
  reference ranks itself; costs a full training).

Each signal's cost is measured in seconds per network here. Networks come from the space's
own screen (``--n`` proposals of its sampler replaced by random sampling, fill bands and all),
trained two at a time on one CPU each, at the benchmark's size (default: search_quality.py's
trial fidelity). With ``--results CSV`` (a search's results.csv), its trials that trained to
the end are networks too, their recorded val accuracy the reference, and the space's own data
and training are used as they are (``--n`` more are sampled and trained like them; ``seed``
is left out: it would retrain every network in full). Writes ``--json-out`` (default
docs/results/rank_fidelity-<space>.json); the LAST line printed is the same JSON.

    .venv/bin/python bench/rank_fidelity.py --quick                      # ~1-minute smoke check
    .venv/bin/python bench/rank_fidelity.py --data ../shared/datasets/mnist.npz   # tiny-mnist
    .venv/bin/python bench/rank_fidelity.py --space spaces/cifar10-50k.yaml \
        --data ../shared/datasets/cifar10.npz --results docs/results/cifar10-50k-results.csv --n 8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/rank_fidelity.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_SPACE = REPO_ROOT / "spaces" / "studies" / "tiny-mnist.yaml"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "mnist.npz"
RESULTS = REPO_ROOT / "docs" / "results"
PROXIES = ("synflow", "naswot", "jacob_cov")
TRAINED = ("subset", "epochs", "seed")
SIGNALS = ("params", *PROXIES, *TRAINED)
# search_quality.py's trial fidelity by default: the reference is what its searches train.
DEFAULT_SIZE = {"n": 120, "subset": 3000, "test_subset": 1000, "epochs": 1, "batch_size": 32}
QUICK_SIZE = {"n": 8, "subset": 1000, "test_subset": 500, "epochs": 1, "batch_size": 32}


# ---------------------------------------------------------------------- zero-cost proxies
def _activations(model: Any) -> list[Any]:
    from torch import nn

    kinds = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
    return [m for m in model.modules() if isinstance(m, kinds)]


def synflow(model: Any, input_shape: Sequence[int]) -> float:
    """log(sum |theta * dR/dtheta|), R = sum of the outputs of the network with |theta| on an
    all-ones (1, C, H, W) input; BatchNorm in eval mode (its init stats: identity)."""
    import torch

    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    net.zero_grad()
    net(torch.ones((1, *input_shape), dtype=torch.float64)).sum().backward()
    score = sum(float((p.detach() * p.grad).abs().sum()) for p in net.parameters()
                if p.grad is not None)
    return math.log(score) if score > 0 else -math.inf


def naswot(model: Any, x: Any) -> float:
    """log|det K|, K[i, j] = units where images i and j share their activation's sign
    (both > 0 or both <= 0), over every activation's input, for one batch at init."""
    import torch

    codes: list[Any] = []
    hooks = [m.register_forward_pre_hook(
        lambda _m, inp: codes.append((inp[0] > 0).flatten(1).double()))
        for m in _activations(model)]
    try:
        model.train()  # BatchNorm on batch statistics, as the network starts training
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    c = torch.cat(codes, 1)
    k = c @ c.T + (1 - c) @ (1 - c).T
    return float(torch.linalg.slogdet(k)[1])


def jacob_cov(model: Any, x: Any) -> float:
    """-sum(log(v + k) + 1 / (v + k)) over the eigenvalues v of the correlation matrix of the
    batch's input Jacobians (of the summed outputs), k = 1e-5."""
    import numpy as np

    x = x.clone().requires_grad_(True)
    model.train()
    model.zero_grad()
    model(x).sum().backward()
    jac = x.grad.reshape(len(x), -1).double().numpy()
    corr = np.nan_to_num(np.corrcoef(jac))
    v = np.linalg.eigvalsh(corr)
    k = 1e-5
    return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))


# ---------------------------------------------------------------------- workers
_SPLITS: Any = None


def _init_worker(data_cfg: Any) -> None:
    import torch

    from trainables.data import load_dataset

    global _SPLITS
    torch.set_num_threads(1)
    _SPLITS = load_dataset(data_cfg)


def _train(config: dict[str, Any], *, seed_offset: int = 0, divisor: int = 1,
           epochs_divisor: int = 1) -> tuple[float, float]:
    """(val accuracy, seconds) of one training of ``config`` in this worker."""
    from trainables.arch import ArchConfig
    from trainables.train import TrainConfig
    from trainables.trial import train_arch

    splits = _SPLITS
    if divisor > 1:
        n = len(splits.y_train) // divisor
        splits = dataclasses.replace(splits, x_train=splits.x_train[:n],
                                     y_train=splits.y_train[:n])
    cfg = TrainConfig.from_flat(config)
    cfg = cfg.replace(seed=cfg.seed + seed_offset, threads=1,
                      epochs=max(1, cfg.epochs // epochs_divisor))
    start = time.perf_counter()
    result = train_arch(ArchConfig.from_flat(config), splits, cfg)
    return float(result.metrics["val_accuracy"]), time.perf_counter() - start


def _proxies(config: dict[str, Any], batch: int) -> dict[str, tuple[float, float]]:
    """{proxy: (score, seconds)} of ``config``'s seeded untrained network."""
    import torch

    from trainables.arch import ArchConfig
    from trainables.train import TrainConfig
    from trainables.trial import seeded_model

    splits = _SPLITS
    arch, cfg = ArchConfig.from_flat(config), TrainConfig.from_flat(config)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(splits.y_train), generator=g)[:batch]
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    x = (splits.x_train[idx].float() / 255.0 - mean) / std  # as the training loop feeds it
    out = {}
    for name in PROXIES:
        model = seeded_model(arch, splits, cfg)
        start = time.perf_counter()
        score = (synflow(model, splits.input_shape) if name == "synflow"
                 else naswot(model, x) if name == "naswot" else jacob_cov(model, x))
        out[name] = (score, time.perf_counter() - start)
    return out


# ---------------------------------------------------------------------- statistics (pure)
def band_of(params: float, edges: Sequence[float]) -> int:
    """Index of the log-spaced band (``edges`` ascending, len bands + 1) holding ``params``."""
    for i in range(len(edges) - 1):
        if params < edges[i + 1]:
            return i
    return len(edges) - 2


def log_edges(lo: float, hi: float, bands: int) -> list[float]:
    a, b = math.log10(lo), math.log10(hi)
    return [10 ** (a + (b - a) * i / bands) for i in range(bands + 1)]


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b; NaN when either side is constant or fewer than 2 points."""
    from scipy.stats import kendalltau

    if len(a) < 2:
        return math.nan
    tau = kendalltau(a, b).statistic
    return float(tau) if tau == tau else math.nan


def within_bands(signal: Sequence[float], reference: Sequence[float], band: Sequence[int]
                 ) -> tuple[float, dict[int, float]]:
    """(pair-weighted mean of the per-band taus, {band: tau}) over bands with 2+ members."""
    taus, weights = {}, {}
    for b in sorted(set(band)):
        idx = [i for i, x in enumerate(band) if x == b]
        tau = kendall([signal[i] for i in idx], [reference[i] for i in idx])
        if not math.isnan(tau):
            taus[b], weights[b] = tau, len(idx) * (len(idx) - 1) / 2
    total = sum(weights.values())
    mean = sum(taus[b] * weights[b] for b in taus) / total if total else math.nan
    return mean, taus


# ---------------------------------------------------------------------- main
def sample_configs(spec: Any, n: int, input_shape: Sequence[int], num_classes: int
                   ) -> list[tuple[dict[str, Any], float]]:
    """``n`` distinct feasible (config, nonzero params) of the space, its sampler replaced by
    random sampling."""
    from search.space import dry_run

    spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, sampler="random"))
    return [(dict(p.config), float(p.screened_params))
            for p in dry_run(spec, n, input_shape=input_shape, num_classes=num_classes).proposals]


def recorded(path: Path) -> list[tuple[dict[str, Any], float, float]]:
    """(flat config, nonzero params, val accuracy) of the trials of a results.csv that trained
    every epoch (not stopped early, not pruned further); values typed as YAML reads them."""
    import csv

    import yaml

    out = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] != "TERMINATED" or float(row.get("fidelity") or 1) < 1:
                continue
            config = {k: yaml.safe_load(v) for k, v in row.items()
                      if k.startswith(("arch/", "train/")) and v != ""}
            out.append((config, float(row["nonzero_params"]), float(row["val_accuracy"])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search space YAML")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the space's dataset file")
    helps = {"n": "networks", "subset": "train+val images", "test_subset": "test images",
             "epochs": "epochs of the reference training", "batch_size": "images per step"}
    for name, text in helps.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int,
                        help=f"{text} (default {DEFAULT_SIZE[name]}, --quick {QUICK_SIZE[name]})")
    ap.add_argument("--bands", type=int, default=4, help="log-spaced size bands (default 4)")
    ap.add_argument("--batch", type=int, default=64, help="images per proxy batch (default 64)")
    ap.add_argument("--subset-divisor", type=int, default=4,
                    help="the subset signal trains on 1/this of the images (default 4)")
    ap.add_argument("--epochs-divisor", type=int, default=3,
                    help="the epochs signal trains 1/this of the epochs (default 3)")
    ap.add_argument("--results", type=Path, help="a search's results.csv: its full trials too")
    ap.add_argument("--workers", type=int, default=2, help="trainings at once, 1 CPU each")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--quick", action="store_true", help="a ~1-minute smoke check")
    ap.add_argument("--json-out", type=Path,
                    help="default docs/results/rank_fidelity-<space>.json (--quick: not written)")
    args = ap.parse_args(argv)
    size = {k: getattr(args, k) if getattr(args, k) is not None else v
            for k, v in (QUICK_SIZE if args.quick else DEFAULT_SIZE).items()}
    if args.results is not None:
        size["n"] = args.n if args.n is not None else 0
    if min([*size.values(), args.bands, args.batch, args.subset_divisor, args.epochs_divisor,
            args.workers]) < (0 if args.results else 1):
        print("error: every count must be >= 1", file=sys.stderr)
        return 2
    if not args.data.is_file():
        print(f"error: no dataset at {args.data}: pass --data PATH", file=sys.stderr)
        return 2
    json_out = args.json_out or (None if args.quick
                                 else RESULTS / f"rank_fidelity-{args.space.stem}.json")

    from search.errors import UserError
    from search.spec import load_spec

    try:
        spec = load_spec(args.space, seed=args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.results is None:  # the benchmark's size; else the space's own
        data_cfg = spec.data.replace(path=str(args.data.resolve()), subset=size["subset"],
                                     test_subset=size["test_subset"], seed=0)
        spec = dataclasses.replace(spec, data=data_cfg, train={
            **spec.train, "epochs": size["epochs"], "batch_size": size["batch_size"]})
    else:
        data_cfg = spec.data.replace(path=str(args.data.resolve()))
        spec = dataclasses.replace(spec, data=data_cfg)
    _init_worker(data_cfg)
    splits = _SPLITS
    started = time.time()
    known = recorded(args.results) if args.results is not None else []
    sampled = (sample_configs(spec, size["n"], splits.input_shape, splits.num_classes)
               if size["n"] else [])
    configs = [c for c, _, _ in known] + [c for c, _ in sampled]
    params = [p for _, p, _ in known] + [p for _, p in sampled]
    epochs = {int(c["train/epochs"]) for c in configs}
    signals = [s for s in SIGNALS if not (s == "seed" and known) and not (
        s == "epochs" and (max(epochs) == 1 or max(epochs) // args.epochs_divisor < 1))]
    print(f"{len(configs)} networks of {args.space.name} ({len(known)} recorded) "
          f"({min(params):,.0f}-{max(params):,.0f} params); reference: {sorted(epochs)} "
          f"epoch(s) on {len(splits.y_train):,} images, val {len(splits.y_val):,}; "
          f"{args.workers} at once; signals {', '.join(signals)}", flush=True)

    scores: dict[str, list[float]] = {s: [] for s in signals}
    seconds: dict[str, list[float]] = {s: [] for s in signals}
    for c in configs:
        for name, (score, secs) in _proxies(c, args.batch).items():
            scores[name].append(score)
            seconds[name].append(secs)
    reference: list[float] = [r for _, _, r in known]
    ref_seconds: list[float] = []
    kwargs = {"subset": {"divisor": args.subset_divisor},
              "epochs": {"epochs_divisor": args.epochs_divisor}, "seed": {"seed_offset": 1}}
    with concurrent.futures.ProcessPoolExecutor(args.workers, initializer=_init_worker,
                                                initargs=(data_cfg,)) as pool:
        jobs = {"reference": [pool.submit(_train, c) for c, _ in sampled],
                **{s: [pool.submit(_train, c, **kwargs[s]) for c in configs]
                   for s in TRAINED if s in signals}}
        for name, futures in jobs.items():
            for f in futures:
                acc, secs = f.result()
                (reference if name == "reference" else scores[name]).append(acc)
                (ref_seconds if name == "reference" else seconds[name]).append(secs)
            print(f"  trained: {name} ({len(futures)})", flush=True)
    scores["params"] = [math.log10(p) for p in params]
    seconds["params"] = [0.0] * len(params)
    edges = log_edges(min(params), max(params) * (1 + 1e-9), args.bands)
    band = [band_of(p, edges) for p in params]

    rows = {}
    for s in signals:
        within, per_band = within_bands(scores[s], reference, band)
        rows[s] = {"tau_within_bands": within, "tau_overall": kendall(scores[s], reference),
                   "tau_per_band": per_band, "seconds_per_net": statistics.fmean(seconds[s])}
    print(f"\n{'signal':<11}{'tau in bands':>14}{'tau overall':>13}{'s per net':>11}")
    for s, r in rows.items():
        print(f"{s:<11}{r['tau_within_bands']:>14.3f}{r['tau_overall']:>13.3f}"
              f"{r['seconds_per_net']:>11.3f}")
    print(f"reference training: {statistics.fmean(ref_seconds) if ref_seconds else math.nan:.2f}"
          " s per net; bands "
          + ", ".join(f"{edges[b]:,.0f}-{edges[b + 1]:,.0f}: {band.count(b)}"
                      for b in range(args.bands)))
    if known:  # the space's own data and training, as they were used
        size = {"n": size["n"], "subset": data_cfg.subset, "test_subset": data_cfg.test_subset,
                "epochs": sorted(epochs), "batch_size": sorted({int(c["train/batch_size"])
                                                                for c in configs})}
    result = {"space": args.space.name, "networks": len(configs), **size, "bands": args.bands,
              "band_edges": edges, "band_counts": [band.count(b) for b in range(args.bands)],
              "recorded": len(known), "results_csv": str(args.results) if known else None,
              "reference_seconds_per_net": statistics.fmean(ref_seconds) if ref_seconds
              else None, "subset_divisor": args.subset_divisor,
              "epochs_divisor": args.epochs_divisor, "proxy_batch": args.batch,
              "signals": rows, "minutes": round((time.time() - started) / 60, 1),
              "per_network": [{"nonzero_params": p, "reference": r,
                               **{s: scores[s][i] for s in signals}}
                              for i, (p, r) in enumerate(zip(params, reference, strict=True))]}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_out}")
    print(json.dumps({k: v for k, v in result.items() if k != "per_network"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
