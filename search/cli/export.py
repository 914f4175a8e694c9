"""Export a trial's model from MLflow: state_dict, TorchScript, ONNX or int8 ONNX.

The tracker uploads ``model.pt`` (a state_dict) and ``arch.yaml`` to the child run of every
Pareto-front member; the network is rebuilt from the ArchConfig with
``trainables.models.build_model`` and the weights loaded with ``torch.load(weights_only=True)``
(tensors only: a downloaded file never runs code). A pruned state_dict (``*_orig`` and
``*_mask`` keys) is folded into plain weights with the zeros baked in.

``onnx-int8`` post-training quantizes the model (``trainables.deploy.quantize.quantize_int8``: BN
folded, per-channel static int8, QOperator) with calibration images from the dataset the
search recorded (the parent run's ``spec_resolved.yaml`` ``data:`` section, or ``data=``),
writes ``<out>`` (int8), ``<out stem>.fp32.onnx`` beside it and ``<out>.json`` (the int8 and fp32
test accuracies, the calibration size, the file's weight bytes).

``export RUN_DIR TRIAL_KEY`` (:func:`export_trial`) reads the same two files from the run
directory instead (``trials/<key>/``, a local folder or a storage URI, :mod:`search.rundir.storage`),
and the dataset from its spec.yaml: no MLflow needed. ``export RUN_DIR final/<member>-s<seed>``
exports a finalized member's retrained weights: what final-pareto.csv measured (in a deployment
search its int8 file is rebuilt byte for byte: the same calibration images).
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from trainables.arch import ArchConfig
    from trainables.data import DataConfig
    from trainables.deploy.quantize import Int8Result

FORMATS = ("state_dict", "torchscript", "onnx", "onnx-int8")


def load_run_model(run_id: str, tracking_uri: str) -> tuple[nn.Module, ArchConfig]:
    """The child run's network with its trained weights, in eval mode on the CPU."""
    from mlflow.exceptions import MlflowException

    from search.tracking import check_reachable, client_for
    from trainables.arch import ArchConfig

    check_reachable(tracking_uri)
    client = client_for(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_id!r} not found in {tracking_uri}") from None
    names = {f.path for f in client.list_artifacts(run_id)}
    missing = [n for n in ("arch.yaml", "model.pt") if n not in names]
    if missing:
        raise UserError(
            f"run {run_id} has no {' or '.join(missing)} artifact: only Pareto-front members "
            "get their weights uploaded (`sparse-search pareto` lists them); every trial's "
            "weights are in its run dir under trials/<trial_key>/model.pt"
        )
    with tempfile.TemporaryDirectory() as tmp:
        arch = ArchConfig.load(client.download_artifacts(run_id, "arch.yaml", tmp))
        weights = client.download_artifacts(run_id, "model.pt", tmp)
        model = rebuild(arch, weights)
    return model, arch


def recorded_data(run_id: str, tracking_uri: str) -> DataConfig:
    """The DataConfig of the search a child run belongs to (its parent's spec_resolved.yaml)."""
    import yaml

    from search.tracking import TAG_PARENT, client_for

    client = client_for(tracking_uri)
    parent = client.get_run(run_id).data.tags.get(TAG_PARENT)
    hint = "pass the dataset explicitly (export_run(..., data=DataConfig(...)))"
    if parent is None:
        raise UserError(f"run {run_id} has no parent search run to read its dataset from: {hint}")
    names = {f.path for f in client.list_artifacts(parent)}
    if "spec_resolved.yaml" not in names:
        raise UserError(f"search run {parent} has no spec_resolved.yaml artifact: {hint}")
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load(Path(client.download_artifacts(parent, "spec_resolved.yaml", tmp)).read_text())
    return _data_config(spec, missing=f"search run {parent}'s spec_resolved.yaml has no data "
                        f"section: {hint}", invalid=f"search run {parent}'s recorded data")


def export_int8(model: nn.Module, arch: ArchConfig, data: DataConfig, out: str | Path, *,
                calibration: int = 256) -> Int8Result:
    """Quantize ``model`` to int8 ONNX at ``out`` with ``calibration`` training images of ``data``;
    also writes ``<out>.json`` (the :class:`~trainables.deploy.quantize.Int8Result`)."""
    import json

    from trainables.arch import ArchError
    from trainables.data import load_dataset
    from trainables.deploy.quantize import quantize_int8
    from trainables.trial import check_compatible

    splits = load_dataset(data)
    try:
        check_compatible(arch, splits)
    except ArchError as e:
        raise UserError(str(e)) from None
    out = Path(out)
    result = quantize_int8(model, splits, out, calibration=calibration)
    Path(f"{out}.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result


def rebuild(arch: ArchConfig, weights: str | Path) -> nn.Module:
    """``build_model(arch)`` with the state_dict at ``weights`` (pruning masks folded in)."""
    import torch

    from trainables.models import build_model
    from trainables.pruning import apply_masks, finalize

    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = build_model(arch)
    apply_masks(model, state)  # no-op for an unpruned state_dict
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights} does not fit the architecture {arch.canonical()}: {e}") from None
    finalize(model)
    return model.eval()


def export_model(model: nn.Module, arch: ArchConfig, fmt: str, out: str | Path) -> Path:
    """Write ``model`` as ``fmt``; TorchScript and ONNX take inputs (N, C, H, W), any N.

    ``onnx-int8`` needs calibration data: use :func:`export_int8`."""
    import torch

    if fmt == "onnx-int8":
        raise UserError("--format onnx-int8 needs calibration data: use export_int8 or export_run")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is invalid: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, arch.in_channels, *arch.input_size)
    model = model.eval()
    if fmt == "state_dict":
        torch.save(model.state_dict(), out)
    elif fmt == "torchscript":
        # Deprecated for torch.export, but still what C++/mobile runtimes load: asked for by name.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.trace(model, example).save(str(out))
    else:
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},),
                                    verbose=False)
        program.save(str(out))
    return out


def load_trial_model(run_dir: str | Path, trial_key: str) -> tuple[nn.Module, ArchConfig]:
    """Trial ``trial_key``'s network from a run dir (local or a URI): trials/<key>/arch.yaml
    and model.pt (only TERMINATED trials have weights); ``final/<member>-s<seed>``: that
    retraining of ``sparse-search finalize`` (the weights final-pareto.csv's figures are of)."""
    from search.rundir.layout import ARCH_YAML, FINAL_DIR, MODEL_FILE, TRIALS_DIR
    from search.rundir.storage import read_file
    from trainables.arch import ArchConfig

    key = str(trial_key)
    final = key.startswith(f"{FINAL_DIR}/")
    folder = key if final else f"{TRIALS_DIR}/{key}"
    if final and (key.count("/") != 1 or key.endswith(("/", "/.", "/.."))):
        raise UserError(f"{key!r} is invalid: expected {FINAL_DIR}/<member>-s<seed>, a folder "
                        f"of {run_dir}/{FINAL_DIR}/")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in (ARCH_YAML, MODEL_FILE):
            try:
                data = read_file(run_dir, f"{folder}/{name}")
            except UserError as e:
                if final:
                    raise UserError(f"{e} ({key!r}: {FINAL_DIR}/ holds a folder per finished "
                                    "retraining of `sparse-search finalize`)") from None
                raise UserError(f"{e} (trial {key!r}: results.csv lists the trial keys; only a "
                                "trial that finished all its epochs has model.pt)") from None
            paths[name] = Path(tmp) / name
            paths[name].write_bytes(data)
        arch = ArchConfig.load(paths[ARCH_YAML])
        model = rebuild(arch, paths[MODEL_FILE])
    return model, arch


def run_dir_data(run_dir: str | Path) -> DataConfig:
    """The DataConfig of a run dir's search (its spec.yaml ``data:`` section)."""
    import yaml

    from search.rundir.layout import SPEC_FILE
    from search.rundir.storage import read_file

    spec = yaml.safe_load(read_file(run_dir, SPEC_FILE))
    return _data_config(spec, missing=f"{run_dir}: spec.yaml has no data section",
                        invalid=f"{run_dir}: spec.yaml's data section")


def _data_config(spec: Any, *, missing: str, invalid: str) -> DataConfig:
    """The DataConfig of a recorded spec's ``data:`` section (keys it does not know ignored);
    a UserError saying ``missing`` without one, ``invalid is invalid: ...`` for a bad one."""
    from trainables.data import DataConfig, DataError

    data = spec.get("data") if isinstance(spec, dict) else None
    if not isinstance(data, dict) or "name" not in data:
        raise UserError(missing)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    try:
        return DataConfig(**{k: v for k, v in data.items() if k in known})
    except DataError as e:
        raise UserError(f"{invalid} is invalid: {e}") from None


def export_trial(run_dir: str | Path, trial_key: str, *, fmt: str, out: str | Path,
                 data: DataConfig | None = None, calibration: int = 256) -> Path:
    """`sparse-search export RUN_DIR TRIAL_KEY`: as :func:`export_run`, from the run dir."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is invalid: expected one of {', '.join(FORMATS)}")
    model, arch = load_trial_model(run_dir, trial_key)
    if fmt == "onnx-int8":
        data = data if data is not None else run_dir_data(run_dir)
        return export_int8(model, arch, data, out, calibration=calibration).path
    return export_model(model, arch, fmt, out)


def export_run(run_id: str, *, fmt: str, out: str | Path, tracking_uri: str,
               data: DataConfig | None = None, calibration: int = 256) -> Path:
    """`sparse-search export`: download, rebuild, write. ``onnx-int8`` calibrates on ``data``
    (default: the dataset the run's search recorded) and writes ``<out>.json`` beside ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is invalid: expected one of {', '.join(FORMATS)}")
    model, arch = load_run_model(run_id, tracking_uri)
    if fmt == "onnx-int8":
        data = data if data is not None else recorded_data(run_id, tracking_uri)
        return export_int8(model, arch, data, out, calibration=calibration).path
    return export_model(model, arch, fmt, out)
