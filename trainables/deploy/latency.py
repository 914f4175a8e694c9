"""Latency measured, not modelled: an architecture's untrained network timed with ONNX Runtime.

:func:`measure_latency` builds ``arch`` (seeded, untrained: latency does not depend on the
weights' values), exports it to ONNX at batch 1 (TorchScript's exporter, the faster one;
:func:`trainables.deploy.quantize.export_onnx` if that fails; ``int8``
quantizes it first with random calibration data, as :func:`trainables.deploy.quantize.quantize_file`
does for trained models) and times ONNX Runtime on this CPU: batch 1, ``intra_op_num_threads``
= 1 (the run executes on the calling thread), ``warmup`` untimed runs, then ``rounds`` rounds
of ``repeats`` samples of ``number`` back-to-back runs each (``number`` chosen so one sample
lasts >= ``min_sample_s``, since one run of a small net takes tens of microseconds). It reports
the median over rounds of each round's median per-run time, and the coefficient of variation
(stdev / mean) of all samples.

Repeatability on a shared machine (bench/deploy.py measures it): ``clock="cpu"`` (the default)
times the thread's CPU time (``time.thread_time``), which on an idle machine equals the wall
time of a single-threaded run but leaves out the time the thread waited for a core while
other processes ran: run-to-run CV median 2.2% (max 4.3%) against 36.7% (max 75%) for the wall
clock, 5 cifar10 nets x 6 measurements at load average 17 on 2 cores (NOT an idle machine).
``pin`` (the timing thread kept on one core, ``os.sched_setaffinity``) and ``rounds`` > 1
(median of round medians) measured no better there (3.2% and 2.8%), so both are off by
default. ``clock="wall"`` is ``time.perf_counter``.

**Which machine.** The figure is the CPU of the process that calls it. In a search that is the
driver (the budget screen runs there, :mod:`search.space.latency`, so an over-budget network
is refused before anything trains), not the node that later trains the trial: every record
names the CPU and runtime that measured it.

Results are cached per (architecture key, precision, threads, clock, CPU model, onnxruntime
version) as one JSON file in ``cache_dir`` (default ``$XDG_CACHE_HOME/sparse-search/latency``,
else ``~/.cache/sparse-search/latency``): a cached figure is only reused on the same kind of
machine, and every record says which CPU (``/proc/cpuinfo``'s model name) and runtime measured it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.arch import ArchConfig

__all__ = ["CLOCKS", "Latency", "cpu_model", "default_cache_dir", "measure_latency", "time_onnx"]

PRECISIONS = ("fp32", "int8")
CLOCKS = ("cpu", "wall")  # the timing thread's CPU time | wall time (time.perf_counter)


@dataclass(frozen=True)
class Latency:
    """One latency measurement (a cache file's content)."""

    arch_key: str  # ArchConfig.key()
    arch: str  # ArchConfig.canonical()
    precision: str  # fp32 | int8
    median_ms: float  # median over rounds of the median sample (mean time of one batch-1 run)
    cv: float  # coefficient of variation of the samples (stdev / mean)
    repeats: int  # samples per round
    number: int  # runs per sample
    warmup: int  # untimed runs first
    threads: int  # intra_op_num_threads
    cpu: str  # /proc/cpuinfo model name (platform.processor() elsewhere)
    onnxruntime: str  # onnxruntime.__version__
    measured_at: str  # UTC, ISO 8601
    clock: str = "wall"  # cpu | wall (records written before the clock existed timed wall)
    rounds: int = 1  # timing rounds (median of their medians)
    pinned: bool = False  # the timing thread was kept on one core
    cached: bool = False  # True when read from the cache, not measured now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparse-search" / "latency"


def time_onnx(path: str | Path, input_shape: tuple[int, int, int], *, threads: int = 1,
              warmup: int = 20, repeats: int = 30, min_sample_s: float = 0.01,
              seed: int = 0, clock: str = "cpu", rounds: int = 1,
              pin: bool = False) -> tuple[float, float, int]:
    """(median ms per run, CV, runs per sample) of the ONNX model at ``path`` at batch 1."""
    import onnxruntime as ort

    if clock not in CLOCKS:
        raise ValueError(f"{clock=} is invalid: expected one of {', '.join(CLOCKS)}")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"{rounds=} must be an integer >= 1")
    now = time.thread_time if clock == "cpu" else time.perf_counter
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"images": np.random.default_rng(seed).standard_normal((1, *input_shape), dtype=np.float32)}
    run = sess.run
    with _pinned(pin and threads == 1):
        for _ in range(max(1, warmup)):
            run(None, feed)
        number = 1
        while True:  # calibrate: runs per sample so that a sample lasts >= min_sample_s
            t = now()
            for _ in range(number):
                run(None, feed)
            if now() - t >= min_sample_s or number >= 1 << 16:
                break
            number *= 2
        samples: list[float] = []
        medians = []
        for _ in range(rounds):
            start = len(samples)
            for _ in range(repeats):
                t = now()
                for _ in range(number):
                    run(None, feed)
                samples.append((now() - t) / number * 1000)
            medians.append(statistics.median(samples[start:]))
    mean = statistics.fmean(samples)
    cv = statistics.stdev(samples) / mean if len(samples) > 1 and mean > 0 else 0.0
    return statistics.median(medians), cv, number


@contextlib.contextmanager
def _pinned(on: bool) -> Iterator[None]:
    """Keep the calling thread on one of its allowed cores (Linux ``sched_setaffinity`` with
    pid 0 sets the calling thread only), and give its affinity back afterwards."""
    setter = getattr(os, "sched_setaffinity", None)
    if not on or setter is None:
        yield
        return
    allowed = os.sched_getaffinity(0)
    try:
        setter(0, {min(allowed)})
    except OSError:  # a container that refuses it: time unpinned
        yield
        return
    try:
        yield
    finally:
        setter(0, allowed)


def _export(model: torch.nn.Module, shape: tuple[int, int, int], out: Path, *,
            fast: bool = True) -> Path:
    """ONNX of ``model`` at a static batch of 1 (what is timed). TorchScript's exporter first:
    about 10x faster than the dynamo export (0.3 s vs 3-9 s for a small net on a busy 2-core
    box, the same ONNX Runtime time within 5%), which matters when a screen times every
    proposal; :func:`trainables.deploy.quantize.export_onnx` (the deployed file's exporter) if it fails."""
    from trainables.deploy.quantize import export_onnx

    if not fast:
        return export_onnx(model, shape, out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice, once per proposal
            torch.onnx.export(model, (torch.zeros(1, *shape),), str(out), dynamo=False,
                              input_names=["images"], output_names=["logits"])
        return out
    except Exception:  # removed in a later torch, or a module it cannot script
        return export_onnx(model, shape, out)


def _cache_file(cache_dir: Path, arch: ArchConfig, precision: str, threads: int, cpu: str,
                ort_version: str, clock: str) -> Path:
    what = f"{arch.key()}|{precision}|{threads}|{cpu}|{ort_version}"
    what += f"|{clock}" if clock != "wall" else ""  # wall: the key of records made before clocks
    tag = hashlib.sha256(what.encode()).hexdigest()[:16]
    return cache_dir / f"{arch.key()}-{precision}-{tag}.json"


def measure_latency(
    arch: ArchConfig,
    *,
    precision: str = "fp32",
    threads: int = 1,
    warmup: int = 20,
    repeats: int = 30,
    min_sample_s: float = 0.01,
    clock: str = "cpu",
    rounds: int = 1,
    pin: bool = False,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    seed: int = 0,
) -> Latency:
    """The batch-1 ONNX Runtime latency of ``arch`` on this CPU, from the cache when there."""
    import onnxruntime as ort

    if precision not in PRECISIONS:
        raise ValueError(f"{precision=} is invalid: expected one of {', '.join(PRECISIONS)}")
    if not (isinstance(repeats, int) and repeats >= 2):
        raise ValueError(f"{repeats=} must be an integer >= 2")
    if clock not in CLOCKS:
        raise ValueError(f"{clock=} is invalid: expected one of {', '.join(CLOCKS)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cpu = cpu_model()
    path = _cache_file(cache, arch, precision, threads, cpu, ort.__version__, clock)
    if use_cache and path.is_file():
        try:
            return Latency(**{**json.loads(path.read_text()), "cached": True})
        except (ValueError, TypeError):
            pass  # a corrupt or older record: measure again
    from trainables.deploy.quantize import deploy_model, quantize_file
    from trainables.models import build_model

    shape = (arch.in_channels, *arch.input_size)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="sparse-search-latency-") as tmp:
        model = deploy_model(build_model(arch).eval(), shape)
        # int8: the deployed file's exporter (ONNX Runtime's quantizer cannot read the bias of
        # TorchScript's export); fp32: the fast one
        onnx_path = _export(model, shape, Path(tmp) / "fp32.onnx", fast=precision == "fp32")
        if precision == "int8":
            rng = np.random.default_rng(seed)
            calib = [rng.standard_normal((8, *shape), dtype=np.float32) for _ in range(4)]
            onnx_path = quantize_file(onnx_path, Path(tmp) / "int8.onnx", calib)
        median, cv, number = time_onnx(onnx_path, shape, threads=threads, warmup=warmup,
                                       repeats=repeats, min_sample_s=min_sample_s, seed=seed,
                                       clock=clock, rounds=rounds, pin=pin)
    result = Latency(arch_key=arch.key(), arch=arch.canonical(), precision=precision,
                     median_ms=median, cv=cv, repeats=repeats, number=number, warmup=warmup,
                     threads=threads, cpu=cpu, onnxruntime=ort.__version__,
                     measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     clock=clock, rounds=rounds, pinned=pin and threads == 1)
    if use_cache:
        cache.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in result.to_dict().items() if k != "cached"}
        tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_text(json.dumps(record, indent=1))
        tmp_path.replace(path)  # atomic: parallel trials never read half a file
    return result
