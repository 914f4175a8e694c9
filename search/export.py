"""Export a trial's model from MLflow: state_dict, TorchScript or ONNX.

The tracker uploads ``model.pt`` (a state_dict) and ``arch.yaml`` to the child run of every
Pareto-front member; the network is rebuilt from the ArchConfig with
``trainables.models.build_model`` and the weights loaded with ``torch.load(weights_only=True)``
(tensors only: a downloaded file never runs code). A pruned state_dict (``*_orig`` and
``*_mask`` keys) is folded into plain weights with the zeros baked in.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from search.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from trainables.arch import ArchConfig

FORMATS = ("state_dict", "torchscript", "onnx")


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
    """Write ``model`` as ``fmt``; TorchScript and ONNX take inputs (N, C, H, W), any N."""
    import torch

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


def export_run(run_id: str, *, fmt: str, out: str | Path, tracking_uri: str) -> Path:
    """`sparse-search export`: download, rebuild, write."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is invalid: expected one of {', '.join(FORMATS)}")
    model, arch = load_run_model(run_id, tracking_uri)
    return export_model(model, arch, fmt, out)
