"""The Ray Tune trainable: flat config -> model -> :func:`trainables.train.fit` -> reports.

Use it as ``tune.with_parameters(train_trial, splits=splits)``: the dataset is loaded once by
the driver and shared through the object store (read-only, zero copy; see
:class:`trainables.data.Splits`). Each epoch reports the metrics below with a checkpoint
directory holding ``state.pt`` (model, optimizer, RNG, progress, rewind snapshot: everything to
resume exactly), ``model.pt`` (a plain state_dict with pruning folded in: it loads into
``build_model(arch)``) and ``arch.yaml``. A restarted trial resumes from the latest checkpoint.

Metrics per epoch: val_accuracy, val_accuracy_se (its binomial standard error), val_loss,
train_loss, train_accuracy, nonzero_params, deploy_params (+ a frozen trunk's weights), macs, nonzero_macs, epoch, fidelity, prune_round, lr,
epoch_seconds, train_seconds, node_id (the Ray node running it), done (True only on the last report, which adds test_accuracy and
test_loss).

A child of ``search.sampler: lamarckian`` carries ``meta/parent`` (its parent's trial key) and
``meta/child_epochs``: it starts from the parent's ``model.pt`` (its newest checkpoint in the
experiment's storage, wherever the run dir lives: a local folder or a URI, read through Ray's
storage file system; :func:`trainables.models.inherit.inherit`), trains ``meta/child_epochs``
epochs instead of ``train/epochs`` (which stays the recipe finalize retrains from scratch), and
reports inherited_fraction (of its parameters copied from the parent) with every epoch.

The last report also carries the trial's int8 evaluation (when ``train.int8_eval``: the spec turns it on
for deployment searches, search/spec/model.py ``SearchSpec.int8_eval``;
:func:`trainables.deploy.quantize.trial_int8`): int8_val_accuracy (= int8_accuracy, the objective),
int8_test_accuracy, int8_drop, int8_calibration_images, int8_seconds, or int8_error when the
quantization failed; its checkpoint adds model.onnx and model-int8.onnx (FP32_ONNX_FILE,
INT8_ONNX_FILE).
"""

from __future__ import annotations

import io
import posixpath
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch
from ray import get_runtime_context
from ray.tune import Checkpoint, get_checkpoint, get_context, report

from trainables.arch import ArchConfig, ArchError
from trainables.data import Splits
from trainables.deploy.quantize import trial_int8
from trainables.models import build_model
from trainables.models.inherit import inherit
from trainables.train import EpochCallback, FitResult, TrainConfig, fit, fold_pruning

# Config keys of a lamarckian child (set by the searcher, search/run/searcher.py).
PARENT_KEY = "meta/parent"  # the parent's trial key
CHILD_EPOCHS_KEY = "meta/child_epochs"  # epochs the child trains from the parent's weights

STATE_FILE = "state.pt"  # resumable training state (torch.save of a dict)
MODEL_FILE = "model.pt"  # plain state_dict of the model (pruning folded in)
ARCH_FILE = "arch.yaml"  # the ArchConfig that builds the model


def trial_dirname(key: str) -> str:
    """The folder of the trial with this key inside the experiment (Ray Tune's trial dir)."""
    return f"trial_{key}"


def parent_state(parent: str) -> dict[str, torch.Tensor]:
    """The parent trial's newest ``model.pt``, read from the experiment's storage."""
    storage = get_context().get_storage()
    fs, folder = storage.storage_filesystem, posixpath.join(storage.experiment_fs_path,
                                                           trial_dirname(parent))
    found = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
             if i.type == pyarrow.fs.FileType.Directory
             and posixpath.basename(i.path).startswith("checkpoint_")]
    if not found:
        raise FileNotFoundError(f"parent trial {parent}: no checkpoint under {folder}")
    with fs.open_input_file(posixpath.join(max(found), MODEL_FILE)) as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def check_compatible(arch: ArchConfig, splits: Splits) -> None:
    """Refuse an architecture whose input or class count does not match the dataset."""
    c, h, w = splits.input_shape
    if arch.in_channels != c or tuple(arch.input_size) != (h, w):
        raise ArchError(
            f"arch in_channels={arch.in_channels}, input_size={list(arch.input_size)} does not "
            f"match {splits.name} images of {c}x{h}x{w}: expected in_channels: {c}, "
            f"input_size: [{h}, {w}]"
        )
    if arch.num_classes != splits.num_classes:
        raise ArchError(f"arch num_classes={arch.num_classes} does not match {splits.name}: "
                        f"expected num_classes: {splits.num_classes}")


def train_arch(
    arch: ArchConfig,
    splits: Splits,
    cfg: TrainConfig,
    *,
    device: str | torch.device | None = None,
    on_epoch: EpochCallback | None = None,
    start_state: Mapping[str, Any] | None = None,
) -> FitResult:
    """Seed, build and train one architecture (the CLI's ``train`` and the trainable share it)."""
    model = seeded_model(arch, splits, cfg)
    return fit(model, splits, cfg, device=device, on_epoch=on_epoch, start_state=start_state)


def seeded_model(arch: ArchConfig, splits: Splits, cfg: TrainConfig) -> torch.nn.Module:
    """The untrained network of ``arch`` as :func:`train_arch` builds it (checked, seeded)."""
    check_compatible(arch, splits)
    torch.manual_seed(cfg.seed)  # model init; fit reseeds batch order, augmentation and dropout
    return build_model(arch)


def train_trial(config: dict[str, Any], splits: Splits) -> None:
    """Ray Tune function trainable; ``config`` holds flat ``arch/...`` and ``train/...`` keys."""
    arch = ArchConfig.from_flat(config)
    cfg = TrainConfig.from_flat(config)
    resources = get_context().get_trial_resources().required_resources
    if cfg.threads is None:
        cfg = cfg.replace(threads=max(1, int(resources.get("CPU", 1))))
    device = "cuda" if resources.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    start_state = None
    ckpt = get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            # CPU: RNG states must be CPU tensors; load_state_dict moves the rest to the model.
            start_state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    arch_yaml = arch.to_yaml()
    model = seeded_model(arch, splits, cfg)
    inherited: dict[str, Any] = {}
    if config.get(PARENT_KEY) is not None:
        cfg = cfg.replace(epochs=int(config[CHILD_EPOCHS_KEY]))
        # A resumed child has its own weights in its checkpoint: the share it inherited is
        # counted again on a scratch copy, so every report of the trial says it.
        target = model if start_state is None else seeded_model(arch, splits, cfg)
        inherited = {"inherited_fraction": inherit(target, parent_state(str(config[PARENT_KEY])))}

    def on_epoch(metrics: dict[str, Any], state: Any) -> None:
        st = state()
        with tempfile.TemporaryDirectory(prefix="sparse-search-ckpt-") as d:
            torch.save(st, Path(d) / STATE_FILE)
            torch.save(fold_pruning(st["model"]), Path(d) / MODEL_FILE)
            (Path(d) / ARCH_FILE).write_text(arch_yaml)
            # Every report names the int8 objective (Tune refuses a result without a metric
            # its searcher expects); it has a value only in the final report, when measured.
            metrics["int8_accuracy"] = None
            if metrics.get("done") and cfg.int8_eval:
                # The trained model as it stands after its last epoch (deploy_model copies it).
                metrics.update(trial_int8(model, splits, d, val_accuracy=metrics["val_accuracy"],
                                          threads=cfg.threads or 1))
            # report() copies the directory to the trial's storage before returning. node_id:
            # where this attempt runs (results.csv's ``node`` column).
            # latency_ms: the driver's measurement (search/space/latency.py), in the config
            # when the spec uses latency; reported so Ray, the schedulers and MLflow see it.
            screened = {k: config[k] for k in ("latency_ms",) if k in config}
            report({**metrics, **screened, **inherited, "node_id": get_runtime_context().get_node_id()},
                   checkpoint=Checkpoint.from_directory(d))

    fit(model, splits, cfg, device=device, on_epoch=on_epoch, start_state=start_state)
