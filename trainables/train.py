"""The training loop: tensor-resident data, batch-wise augmentation, lottery-ticket rounds.

Why it is fast on a small CPU: the dataset stays one uint8 tensor (on the training device);
each batch is one index of uint8 rows, then random crop and flip for the whole batch in one
gather (one padded tensor; random per-image offsets; a flipped image reads its window's
columns reversed), then a fused per-channel normalisation to float. No DataLoader workers,
no per-sample Python, no PIL.

Pruning rounds (``prune_rounds > 0``, Frankle & Carbin with rewinding): train ``epochs``, then
per round prune ``prune_rate`` of the surviving weights, rewind the survivors to their values
after ``rewind_epoch`` epochs, and retrain ``epochs`` with a fresh optimizer and schedule.
Fidelity is the fraction of all planned epochs ``epochs * (prune_rounds + 1)`` done.

It owns one epoch's machinery first: :func:`lr_factor` (warmup then onecycle / cosine /
constant), :class:`Batcher` (uint8 batches -> normalised float, crop and flip in one gather,
cutout), :func:`make_ema` (the weight average of ``train.ema``), :func:`_train_epoch` (one
permutation, device-side loss and hits, no per-step host sync) and :func:`evaluate` (flip TTA
optional) / :func:`accuracy_se`; then the config, the phases and rounds, early stopping and
checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from trainables import flat, pruning
from trainables.accounting import count_built
from trainables.data import Splits
from trainables.errors import ConfigError


def lr_factor(step: int, total: int, *, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of a ``total``-step phase."""
    warm = round(warmup_fraction * total)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)  # 0 at the peak, -> 1 at the last step
    if schedule == "onecycle":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


@dataclass(frozen=True)
class Batcher:
    """Turns uint8 ``(B, C, H, W)`` batches into normalised float ones on the device."""

    scale: Tensor  # (1, C, 1, 1): 1 / (255 * std)
    shift: Tensor  # (1, C, 1, 1): -mean / std
    crop: int  # padding per side, 0 = no crop
    flip: bool
    channels_last: bool
    cutout: int = 0  # side of the square set to the mean (0 after normalisation); 0 = off

    def normalize(self, xb: Tensor) -> Tensor:
        x = torch.addcmul(self.shift, xb.float(), self.scale)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def augment(self, xb: Tensor, gen: torch.Generator) -> Tensor:
        """Random crop (zero padding) and horizontal flip of a uint8 batch in ONE gather.

        Each image reads an (H, W) window of its padded plane at a random offset; a flipped
        image reads that window's columns right to left. No per-sample Python.
        """
        if not (self.crop or self.flip):
            return xb
        b, c, h, w = xb.shape
        p, dev = self.crop, xb.device
        hp, wp = h + 2 * p, w + 2 * p
        plane = (F.pad(xb, (p, p, p, p)) if p else xb).reshape(b, c, hp * wp)
        dy = torch.randint(0, 2 * p + 1, (b, 1, 1), generator=gen, device=gen.device).to(dev)
        dx = torch.randint(0, 2 * p + 1, (b, 1, 1), generator=gen, device=gen.device).to(dev)
        cols = torch.arange(w, device=dev).expand(b, 1, w)  # (b, 1, w)
        if self.flip:
            coin = torch.rand(b, 1, 1, generator=gen, device=gen.device).to(dev) < 0.5
            cols = torch.where(coin, w - 1 - cols, cols)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        idx = (dy + rows) * wp + dx + cols  # (b, h, w) flat positions in the padded plane
        return plane.gather(2, idx.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)

    def cut(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Cutout (DeVries & Taylor 2017) of a normalised batch: one ``cutout``-pixel square per
        image, centred anywhere in it (so it may be clipped by the border), set to 0 = the mean."""
        if not self.cutout:
            return x
        b, _, h, w = x.shape
        dev, c = x.device, self.cutout
        # top-left corner of each square: its centre (uniform over the image) minus c // 2
        y0 = torch.randint(0, h, (b, 1, 1), generator=gen, device=gen.device).to(dev) - c // 2
        x0 = torch.randint(0, w, (b, 1, 1), generator=gen, device=gen.device).to(dev) - c // 2
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = (rows >= y0) & (rows < y0 + c) & (cols >= x0) & (cols < x0 + c)  # (b, h, w)
        return x.masked_fill(inside.unsqueeze(1), 0.0)


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel as an EMA of parameters and buffers (BN statistics), whose decay
    warms up as min(decay, (1 + n) / (10 + n)) after n updates: at 0.999 a plain EMA would
    still be ~70% the init weights after an epoch of 352 steps (CIFAR-10, batch 128)."""

    def ema_update(averaged: list[Tensor], current: list[Tensor], n: Tensor | int) -> None:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BN's num_batches_tracked): the current count
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    with pruning.copyable(model):  # AveragedModel deep-copies the model
        return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


def accuracy_se(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` images: sqrt(a (1 - a) / n).

    What a held-out split can tell apart: at 0.976 on 6,000 images it is 0.0020, so two nets
    0.001 apart are ranked by noise. NaN without images."""
    if n < 1 or not math.isfinite(accuracy):
        return math.nan
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batcher: Batcher,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    tta_flip: bool = False,
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy without smoothing) of ``model`` on uint8 images ``x``;
    ``tta_flip``: of the mean logits of each image and its mirror (width axis)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(y), batch_size):
        xb = batcher.normalize(x[i:i + batch_size].to(device, non_blocking=True))
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xb).float()
            if tta_flip:
                logits = 0.5 * (logits + model(xb.flip(3)).float())
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, len(y))
    return correct.item() / n, loss_sum.item() / n


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batcher: Batcher,
    x_train: Tensor,
    y_train: Tensor,
    gen: torch.Generator,
    *,
    cfg: TrainConfig,
    epoch: int,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    ema: AveragedModel | None = None,
) -> tuple[float, float, float]:
    """One pass over a fresh permutation; (mean train loss, train accuracy, last lr).
    ``ema`` (train.ema) is updated after every optimizer step.

    Full batches only (a 1-image tail breaks BatchNorm). Loss and hits accumulate on the device
    and are read once, at the end: no per-step host sync.
    """
    dev = x_train.device
    n = len(y_train)
    steps = n // batch_size
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    hits = torch.zeros((), dtype=torch.int64, device=dev)
    perm = torch.randperm(n, generator=gen, device=dev)
    lr = cfg.lr
    for s in range(steps):
        lr = cfg.lr * lr_factor(epoch * steps + s, cfg.epochs * steps, schedule=cfg.schedule,
                                warmup_fraction=cfg.warmup_fraction)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = perm[s * batch_size:(s + 1) * batch_size]
        xb = batcher.cut(batcher.normalize(batcher.augment(x_train[idx], gen)), gen)
        yb = y_train[idx]
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach() * len(yb)
        hits += (logits.detach().argmax(1) == yb).sum()
    seen = steps * batch_size
    return loss_sum.item() / seen, hits.item() / seen, lr


FLAT_PREFIX = "train"
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("onecycle", "cosine", "constant")
TTAS = ("none", "flip")
AUGMENTS = ("auto", "none", "crop", "flip", "crop+flip")
# What "auto" means per dataset: digit shapes are not mirror-symmetric, 8x8 digits too small to crop.
AUTO_AUGMENT = {
    "digits": "none",
    "mnist": "crop",
    "fashion-mnist": "crop",
    "cifar10": "crop+flip",
    "cifar100": "crop+flip",
    "imagefolder": "crop+flip",
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says when and with which learning rate."""


class TrainConfigError(ConfigError):
    """An invalid training value; the message names the field and the value."""


@dataclass(frozen=True)
class TrainConfig:
    """How one architecture is trained. Flat keys ``train/<field>``."""

    epochs: int = 10  # epochs per training phase (the dense run, and again per pruning round)
    batch_size: int = 128  # images per optimizer step
    optimizer: str = "sgd"  # sgd | adamw | adam
    lr: float = 0.05  # peak learning rate (reached at the end of warm-up)
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    nesterov: bool = True  # SGD Nesterov momentum
    weight_decay: float = 5e-4  # L2 (SGD/Adam) or decoupled (AdamW); on BN, biases, 1-d params only with decay_norms
    decay_norms: bool = False  # weight decay on BN scales/shifts and biases too (1-d params)
    schedule: str = "onecycle"  # onecycle (warm-up, linear to 0) | cosine (warm-up, cosine to 0) | constant
    warmup_fraction: float = 0.15  # share of each phase's steps spent ramping linearly to the peak lr
    label_smoothing: float = 0.1  # cross-entropy target smoothing (training loss only)
    augment: str = "auto"  # auto | none | crop | flip | crop+flip (auto: by dataset, see AUTO_AUGMENT)
    crop_padding: int = 4  # random crop: pixels of zero padding per side, i.e. shifts of +-crop_padding
    cutout: int = 0  # side (pixels) of one square per training image set to the data mean; 0 = off
    # Exponential moving average of the weights and BN statistics, per optimizer step; 0 = off.
    # The average is what is evaluated every epoch and what a phase ends with (model.pt, test).
    # Its decay warms up as min(ema, (1 + n) / (10 + n)) after n steps, so epoch 1 is not init.
    ema: float = 0.0
    # Test-time augmentation of every val/test evaluation: "flip" averages the logits of each
    # image and its mirror (2x evaluation cost). The int8 ONNX figures stay single-view.
    tta: str = "none"
    early_stop_patience: int = 0  # epochs without a val-accuracy gain that end a phase; 0 = off
    prune_rounds: int = 0  # lottery-ticket rounds after the dense run; 0 = no pruning
    prune_rate: float = 0.2  # share of the surviving weights removed per round (classifier: half)
    prune_scope: str = "global"  # global (one magnitude ranking) | layer (each layer its own)
    rewind_epoch: int = 1  # survivors rewind to their values after this many epochs; 0 = init
    seed: int = 0  # model init (by the caller), batch order, augmentation and dropout
    amp: bool = True  # CUDA only: bf16 autocast (fp16 + GradScaler where bf16 is missing)
    channels_last: bool = True  # NHWC memory format; CPU too: 20-40% less time per step measured
    eval_batch_size: int = 1024  # images per forward pass when evaluating
    threads: int | None = None  # torch intra-op threads; None: the CPUs this process may use
    # A search trial's post-training int8 step (trainables/quantize.py trial_int8: ONNX files,
    # int8_val_accuracy / int8_test_accuracy / int8_drop); false: none of them. fit ignores it.
    int8_eval: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, expected: str) -> TrainConfigError:
            return TrainConfigError(f"train.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name, lo in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("seed", 0),
                         ("crop_padding", 0), ("early_stop_patience", 0), ("prune_rounds", 0),
                         ("rewind_epoch", 0), ("cutout", 0)):
            if not is_int(getattr(self, name)) or getattr(self, name) < lo:
                raise bad(name, f"an integer >= {lo}")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise bad("threads", "an integer >= 1 or null")
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("augment", AUGMENTS), ("prune_scope", pruning.SCOPES), ("tta", TTAS)):
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(choices))
        if not is_num(self.lr) or self.lr <= 0:
            raise bad("lr", "a number > 0")
        if not is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "a number in [0, 1)")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        for name in ("warmup_fraction", "label_smoothing", "ema"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise bad(name, "a number in [0, 1)")
        if not is_num(self.prune_rate) or not 0 < self.prune_rate < 1:
            raise bad("prune_rate", "a number in (0, 1)")
        for name in ("nesterov", "amp", "channels_last", "int8_eval", "decay_norms"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise bad("nesterov", f"false when train.momentum=0 (Nesterov needs momentum; {self.momentum=})")
        if self.prune_rounds and self.rewind_epoch > self.epochs:
            raise bad("rewind_epoch", f"at most train.epochs={self.epochs} (the snapshot is taken "
                      "during the dense run)")

    @property
    def total_epochs(self) -> int:
        return self.epochs * (self.prune_rounds + 1)

    def to_flat(self, prefix: str = FLAT_PREFIX) -> dict[str, Any]:
        return flat.to_flat(self, prefix)

    @classmethod
    def from_flat(cls, flat_dict: Mapping[str, Any], prefix: str = FLAT_PREFIX) -> TrainConfig:
        """Inverse of :meth:`to_flat`; other prefixes are ignored, unknown ``train/`` keys are errors."""
        return flat.from_flat(cls, flat_dict, prefix, TrainConfigError)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def resolve_augment(augment: str, data_name: str) -> tuple[bool, bool]:
    """(crop, flip) for an ``augment`` value; "auto" looks the dataset up in AUTO_AUGMENT."""
    a = AUTO_AUGMENT.get(data_name, "none") if augment == "auto" else augment
    return "crop" in a, "flip" in a


# ---------------------------------------------------------------------------- batches
def _batcher(splits: Splits, cfg: TrainConfig, data_name: str, device: torch.device) -> Batcher:
    crop, flip = resolve_augment(cfg.augment, data_name)
    mean = torch.tensor(splits.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(splits.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return Batcher(scale=1.0 / (255.0 * std), shift=-mean / std,
                    crop=cfg.crop_padding if crop else 0, flip=flip,
                    channels_last=cfg.channels_last, cutout=cfg.cutout)


# ---------------------------------------------------------------------------- helpers
def _param_groups(model: nn.Module, weight_decay: float, decay_norms: bool = False) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels; BN scales/shifts and biases (1-d) only with ``decay_norms``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": weight_decay if decay_norms else 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay, cfg.decay_norms)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    betas = (cfg.momentum, 0.999)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)


def fold_pruning(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A pruned model's ``state_dict`` with ``w = w_orig * w_mask`` stored as plain ``weight``.

    The result loads into a freshly built model (export, the tracker's saved weights).
    """
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        base = k.rpartition("_")[0]
        if k.endswith("_orig") and base + "_mask" in state_dict:
            out[base] = (v * state_dict[base + "_mask"]).detach().clone()
        elif not (k.endswith("_mask") and base + "_orig" in state_dict):
            out[k] = v.detach().clone()
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not (cfg.amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------- fit
EpochCallback = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]


@dataclass
class FitResult:
    """What :func:`fit` returns: the final report, every epoch's report and per-round summaries."""

    metrics: dict[str, Any]  # the last (done=True) report, with test_accuracy and train_seconds
    history: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # one per phase: round, nonzero_params, val_accuracy


    def summary(self) -> dict[str, Any]:
        """The headline figures of a finished run (the ``train`` command's JSON line)."""
        m = self.metrics
        return {"val_accuracy": m["val_accuracy"], "test_accuracy": m["test_accuracy"],
                "nonzero_params": m["nonzero_params"], "macs": m["macs"], "epochs": m["epoch"],
                "train_seconds": m["train_seconds"]}


def describe(metrics: Mapping[str, Any], cfg: TrainConfig) -> str:
    """One human line per epoch report."""
    m = metrics
    line = (f"epoch {m['epoch']:>3}/{cfg.total_epochs}"
            + (f"  round {m['prune_round']}" if cfg.prune_rounds else "")
            + f"  train_loss {m['train_loss']:.4f}  val_acc {m['val_accuracy']:.4f}"
            f"  val_loss {m['val_loss']:.4f}  params {m['nonzero_params']:,}"
            f"  lr {m['lr']:.4g}  {m['epoch_seconds']:.1f}s")
    if "test_accuracy" in m:
        line += f"  test_acc {m['test_accuracy']:.4f}"
    return line


@dataclass
class _Progress:
    """Everything that must survive a checkpoint besides model and optimizer."""

    phase: int = 0  # 0 = dense run, r = pruning round r
    epoch_in_phase: int = 0  # epochs finished in this phase
    phase_done: bool = False  # the phase ended (all epochs, or early stop)
    epoch: int = 0  # epochs finished overall
    best_val: float = -1.0  # best val accuracy in this phase (early stopping)
    bad_epochs: int = 0  # epochs since it improved
    train_seconds: float = 0.0  # wall time spent in fit so far, over resumes
    rounds: list[dict[str, Any]] = field(default_factory=list)


def fit(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    *,
    device: str | torch.device | None = None,
    data_name: str | None = None,
    on_epoch: EpochCallback | None = None,
    start_state: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``splits``; evaluate val every epoch and test after the last.

    ``on_epoch(metrics, checkpoint)`` is called after every epoch; ``checkpoint()`` returns a
    small dict (model, optimizer, RNG, progress, rewind snapshot) that ``start_state`` accepts
    to continue exactly where it was taken. The caller seeds and builds the model; ``data_name``
    (default ``splits.name``) picks the "auto" augmentation. Raises :class:`TrainingDiverged`
    on a NaN/inf loss.
    """
    dev = resolve_device(device)
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    batcher = _batcher(splits, cfg, data_name or splits.name, dev)
    amp_dtype = _amp_dtype(cfg, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    x_train, y_train = splits.x_train.to(dev), splits.y_train.to(dev)
    x_val, y_val = splits.x_val.to(dev), splits.y_val.to(dev)
    n = len(y_train)
    if n < 2:
        raise ValueError(f"{n=} training images: expected at least 2 (BatchNorm needs a batch)")
    bs = min(cfg.batch_size, n)
    gen = torch.Generator(device=dev)
    gen.manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout draws from the global generator

    prog = _Progress()
    snap: dict[str, Tensor] = {}  # the rewind point; empty until taken
    opt: torch.optim.Optimizer | None = None
    ema = None  # train.ema: the phase's weight average (torch AveragedModel), evaluated instead
    tta = cfg.tta == "flip"  # every val/test evaluation scores the image and its mirror
    if start_state is not None:
        pruning.apply_masks(model, start_state["model"])
        model.load_state_dict(start_state["model"])
        prog = _Progress(**start_state["progress"])
        snap = start_state["rewind"]
        gen.set_state(start_state["rng"])
        torch.set_rng_state(start_state["torch_rng"])
        if dev.type == "cuda" and start_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(start_state["cuda_rng"], dev)
        if not prog.phase_done:
            opt = make_optimizer(model, cfg)
            opt.load_state_dict(start_state["optimizer"])
            scaler.load_state_dict(start_state["scaler"])
            if cfg.ema:
                ema = make_ema(model, cfg.ema)
                ema.load_state_dict(start_state["ema"])
    elif cfg.prune_rounds and cfg.rewind_epoch == 0:
        snap = pruning.snapshot(model)

    history: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    first_phase = prog.phase + 1 if prog.phase_done else prog.phase
    for phase in range(first_phase, cfg.prune_rounds + 1):
        if opt is None:  # a phase starts: prune (rounds), rewind, fresh optimizer and schedule
            if phase > 0:
                # torch's global pruning flattens weights with .view(-1), which channels_last
                # conv kernels refuse: prune in the default layout, then switch back.
                model.to(memory_format=torch.contiguous_format)
                pruning.prune_step(model, rate=cfg.prune_rate, scope=cfg.prune_scope)
                pruning.rewind(model, snap)
                if cfg.channels_last:
                    model.to(memory_format=torch.channels_last)
            opt = make_optimizer(model, cfg)
            ema = make_ema(model, cfg.ema) if cfg.ema else None
            prog = dataclasses.replace(prog, phase=phase, epoch_in_phase=0, phase_done=False,
                                       best_val=-1.0, bad_epochs=0)
        model.train()
        for e in range(prog.epoch_in_phase, cfg.epochs):
            t0 = time.perf_counter()
            train_loss, train_acc, lr = _train_epoch(model, opt, scaler, batcher, x_train, y_train,
                                                     gen, cfg=cfg, epoch=e, batch_size=bs,
                                                     amp_dtype=amp_dtype, ema=ema)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"training loss became {train_loss} in epoch {prog.epoch + 1} (round {phase}, "
                    f"peak lr {cfg.lr}, {cfg.optimizer}): lower train.lr or check the data"
                )
            val_acc, val_loss = evaluate(ema.module if ema is not None else model, x_val, y_val,
                                         batcher, batch_size=cfg.eval_batch_size, device=dev,
                                         amp_dtype=amp_dtype, tta_flip=tta)
            improved = val_acc > prog.best_val
            prog.best_val = max(prog.best_val, val_acc)
            prog.bad_epochs = 0 if improved else prog.bad_epochs + 1
            prog.epoch += 1
            prog.epoch_in_phase = e + 1
            stop = cfg.early_stop_patience > 0 and prog.bad_epochs >= cfg.early_stop_patience
            prog.phase_done = stop or prog.epoch_in_phase == cfg.epochs
            if prog.phase_done and ema is not None:  # the phase ends with the average's weights
                model.load_state_dict(ema.module.state_dict())
            if phase == 0 and cfg.prune_rounds and not snap and (
                    prog.epoch_in_phase == cfg.rewind_epoch or prog.phase_done):
                snap = pruning.snapshot(model)  # the rewind point (at phase end if stopped early)
            last = prog.phase_done and phase == cfg.prune_rounds
            # Counted after each epoch, not once per phase: a lamarckian child starts with
            # weights set to zero (a widened layer's new inputs) that training makes nonzero.
            counts = count_built(model, splits.input_shape)  # ~ms: the shape-only pass
            metrics = {
                "epoch": prog.epoch,
                "prune_round": phase,
                "val_accuracy": val_acc,
                "val_accuracy_se": accuracy_se(val_acc, len(y_val)),
                "val_loss": val_loss,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "nonzero_params": counts.nonzero_params,
                "deploy_params": counts.deploy_params,  # + a frozen trunk's weights
                "macs": counts.macs,
                "nonzero_macs": counts.nonzero_macs,
                "flash_bytes": counts.flash_bytes,  # int8, after this round's pruning
                "sram_bytes": counts.sram_bytes,  # int8 peak activations at batch 1
                "lr": lr,
                "fidelity": prog.epoch / cfg.total_epochs,
                "epoch_seconds": time.perf_counter() - t0,
                "done": last,
            }
            if prog.phase_done:
                prog.rounds.append({"round": phase, "nonzero_params": counts.nonzero_params,
                                    "val_accuracy": val_acc, "epochs": prog.epoch_in_phase})
            if last:
                test_acc, test_loss = evaluate(model, splits.x_test.to(dev), splits.y_test.to(dev),
                                               batcher, batch_size=cfg.eval_batch_size,
                                               device=dev, amp_dtype=amp_dtype, tta_flip=tta)
                metrics["test_accuracy"], metrics["test_loss"] = test_acc, test_loss
            metrics["train_seconds"] = prog.train_seconds + time.perf_counter() - started
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(dict(metrics), _checkpointer(model, opt, scaler, gen, prog, snap, metrics, dev,
                                                      ema))
            if prog.phase_done:
                break
        opt = None
    return FitResult(metrics=metrics, history=history, rounds=list(prog.rounds))


def _checkpointer(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    gen: torch.Generator,
    prog: _Progress,
    snap: dict[str, Tensor],
    metrics: dict[str, Any],
    dev: torch.device,
    ema: nn.Module | None = None,
) -> Callable[[], dict[str, Any]]:
    """A zero-argument function returning the resumable state right after this epoch."""

    def state() -> dict[str, Any]:
        return {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            # state_dict() shares the momentum tensors the next step updates in place: copy.
            "optimizer": copy.deepcopy(opt.state_dict()),
            "scaler": scaler.state_dict(),
            "rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "rewind": snap,
            "progress": {**dataclasses.asdict(prog), "train_seconds": metrics["train_seconds"]},
            "ema": None if ema is None else {k: v.detach().clone() for k, v in ema.state_dict().items()},
        }

    return state
