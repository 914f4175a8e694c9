"""One epoch's machinery for :func:`trainables.train.fit`: the lr schedule, the batcher, the
training pass and the evaluation pass.

Owns what runs per step: :func:`lr_factor` (warmup then onecycle / cosine / constant),
:class:`_Batcher` (uint8 batches -> normalised float, crop and flip in one gather, cutout),
:func:`make_ema` (the weight average of ``train.ema``), :func:`_train_epoch` (one permutation,
device-side loss and hits, no per-step host sync) and :func:`evaluate` (flip TTA optional) /
:func:`accuracy_se`. Phases, pruning rounds, early stopping and
checkpoints stay in :mod:`trainables.train`, which re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from trainables import pruning

if TYPE_CHECKING:
    from trainables.train import TrainConfig

__all__ = ["_Batcher", "_train_epoch", "accuracy_se", "evaluate", "lr_factor", "make_ema"]


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
class _Batcher:
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
    batcher: _Batcher,
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
    batcher: _Batcher,
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
