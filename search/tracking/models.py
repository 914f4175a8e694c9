"""Pareto-front members as MLflow 3 logged models: the experiment's Models tab.

:class:`FrontModels` keeps one logged model per front member of one search (keyed by its trial
key: tags ``sparse_search.trial_key`` and ``sparse_search.parent``), created the first time the
trial reaches the front and never deleted: a member that leaves the front is tagged
``on_front=false`` (``true`` again if it comes back), so a registered version never loses its
source. A re-attached tracker (``resume``, ``sync``) finds the models of its parent run by those
tags and creates no duplicate; one left PENDING by a killed driver is completed.

A model carries (``MlflowClient.create_logged_model``, ``source_run_id`` = the trial's child run):

- metrics: the front row of ``pareto.csv`` (val/test accuracy, nonzero_params, macs,
  flash_bytes, sram_bytes, the int8 accuracies when measured...), linked to the child run as
  ``mlflow.<flavor>.log_model`` links them (a value the run already holds is re-logged with
  its own timestamp and step, so the run's history gains no entry);
- params: ``arch`` (``ArchConfig.canonical()``), ``trial_key`` and the flat ``arch/...`` config;
- artifacts: an MLflow ONNX model (``MLmodel``, fp32 ``model.onnx``: masks baked in, BatchNorm
  folded, input "images" float32 (N, C, H, W) normalised with the dataset's mean/std, output
  "logits"), ``model-int8.onnx`` (static per-channel int8) when the trial was quantized,
  ``model.pt`` (a tensor-only state_dict: ``torch.load(..., weights_only=True)``) and
  ``arch.yaml``. The ONNX files are the trial's own (``trials/<key>/``) when it wrote them;
  otherwise the fp32 one is exported here from the weights and int8 is left out.

``mlflow.register_model(f"models:/{model_id}", name)`` registers one; ``mlflow.onnx.load_model``
or ``mlflow.pyfunc.load_model`` on ``models:/<model_id>`` loads it (onnxruntime).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from search.rundir.layout import ARCH_YAML, MODEL_FILE, PARETO_FILE, TRIALS_DIR
from search.schema import METRICS
from search.tracking.store import TAG_ON_FRONT, TAG_PARENT, TAG_RANK, TAG_ROLE, TAG_TRIAL_KEY

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from trainables.arch import ArchConfig

__all__ = ["MODEL_TYPE", "ROLE_FRONT_MODEL", "TAG_OBJECTIVES", "TAG_ONNX_ERROR", "TAG_ONNX_SOURCE",
           "FrontModels", "onnx_file_names", "upload_weights"]

log = logging.getLogger("sparse_search.tracking")

MODEL_TYPE = "sparse-search-front"  # the logged models' model_type (a Models tab column)
ROLE_FRONT_MODEL = "front_model"  # their TAG_ROLE
# On the parent run: "metric:mode,..." in the spec's order (params list them sorted).
TAG_OBJECTIVES = "sparse_search.objectives"
TAG_ONNX_SOURCE = "sparse_search.onnx"  # "trial": the trial's own files; "exported": made here
TAG_ONNX_ERROR = "sparse_search.onnx_error"  # why the model has no ONNX files
_NOT_METRICS = ("trial_key", "trial_id", "pareto_rank", "model", "arch", "initial", "on_front")
_BAD_NAME = re.compile(r"[/:.%\"']")  # characters MLflow refuses in a logged model's name


def onnx_file_names() -> tuple[str, str]:
    """(fp32, int8) ONNX file names a finished trial writes beside model.pt."""
    from trainables.deploy import quantize

    # getattr: the names predate no release; a tree without them still gets its fp32 export.
    return (getattr(quantize, "FP32_ONNX_FILE", "model.onnx"),
            getattr(quantize, "INT8_ONNX_FILE", "model-int8.onnx"))


def upload_weights(client: MlflowClient, run_id: str, path: Path) -> bool:
    """``path`` as the child run's ``model.pt`` artifact, whatever its local name; False: no file."""
    from search.tracking.store import TAG_MODEL, log_tags

    if not path.is_file():
        return False
    if path.name == MODEL_FILE:
        client.log_artifact(run_id, str(path))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(path, Path(tmp) / MODEL_FILE)
            client.log_artifact(run_id, str(Path(tmp) / MODEL_FILE))
    log_tags(client, run_id, {TAG_MODEL: "true"})
    return True


@dataclass
class _Known:
    model_id: str
    on_front: str | None  # the TAG_ON_FRONT value last set
    rank: str | None
    ready: bool  # False: PENDING (a driver died while uploading): complete it


class FrontModels:
    """The logged models of one search's front; :meth:`update` after each front change.

    ``run_dir``: the search's run directory (pareto.csv, trials/<key>/); ``objectives``: the
    spec's metric -> "max"/"min", in its order.
    """

    def __init__(self, client: MlflowClient, *, experiment_id: str, parent_run_id: str,
                 run_dir: Path, search_name: str, objectives: Mapping[str, str]) -> None:
        self.client, self.experiment_id, self.parent_run_id = client, experiment_id, parent_run_id
        self.run_dir, self.search_name = Path(run_dir), search_name
        self.objectives = dict(objectives)
        self._known: dict[str, _Known] | None = None  # trial key -> its model (read on first use)

    def load(self) -> dict[str, _Known]:
        """This search's logged models by trial key, read from the store (paged)."""
        known: dict[str, _Known] = {}
        token = None
        while True:
            page = self.client.search_logged_models(
                [self.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
                page_token=token)
            for m in page:
                key = m.tags.get(TAG_TRIAL_KEY)
                ready = str(getattr(m.status, "value", m.status)) == "READY"
                if key is not None and (key not in known or (ready and not known[key].ready)):
                    known[key] = _Known(m.model_id, m.tags.get(TAG_ON_FRONT), m.tags.get(TAG_RANK),
                                        ready)
            token = page.token
            if not token:
                return known

    def update(self, ranked: pd.DataFrame, front: set[str], children: Mapping[str, str],
               weights: Mapping[str, Path] | None = None) -> None:
        """Create the models of new front members; tag ``on_front``/``pareto_rank`` of the rest.

        ``ranked``: the tracker's ranked rows (``trial_key``, ``pareto_rank``, metrics);
        ``children``: trial key -> child run id (a member without one waits for the next
        update); ``weights``: trial key -> its model.pt where not ``trials/<key>/model.pt``.
        """
        if self._known is None:
            self._known = self.load()
            self._tag_objectives()
        rows = {str(r["trial_key"]): r for r in ranked.to_dict("records")}
        pareto = self._pareto_rows()
        for key in sorted(front):
            run_id = children.get(key)
            rank = _rank(rows.get(key))
            known = self._known.get(key)
            if known is None or not known.ready:
                if run_id is None or not (self.run_dir / TRIALS_DIR / key / ARCH_YAML).is_file():
                    continue  # no child run or no record yet: the next update creates it
                row = pareto.get(key) or rows.get(key) or {}
                self._known[key] = self._create(key, run_id, row, rank, known, weights or {})
            elif (known.on_front, known.rank) != ("true", rank):
                self._set_tags(known, "true", rank)
        for key, known in self._known.items():
            if key not in front and known.on_front != "false":
                self._set_tags(known, "false", _rank(rows.get(key)) or known.rank)

    # ------------------------------------------------------------------ internals
    def _tag_objectives(self) -> None:
        value = ",".join(f"{m}:{mode}" for m, mode in self.objectives.items())
        self.client.set_tag(self.parent_run_id, TAG_OBJECTIVES, value)

    def _set_tags(self, known: _Known, on_front: str, rank: str | None) -> None:
        tags = {TAG_ON_FRONT: on_front, **({TAG_RANK: rank} if rank is not None else {})}
        self.client.set_logged_model_tags(known.model_id, tags)
        known.on_front, known.rank = on_front, rank

    def _pareto_rows(self) -> dict[str, dict[str, Any]]:
        """pareto.csv's rows by trial key: the front's own values (a pruning round's point
        where the trial's last report is another); {} when absent or unreadable."""
        path = self.run_dir / PARETO_FILE
        try:
            df = pd.read_csv(path, dtype={"trial_key": str})
        except (OSError, ValueError):
            return {}
        return {str(r["trial_key"]): r for r in df.to_dict("records")} if "trial_key" in df else {}

    def _create(self, key: str, run_id: str, row: Mapping[str, Any], rank: str | None,
                pending: _Known | None, weights: Mapping[str, Path]) -> _Known:
        from trainables.arch import ArchConfig

        trial_dir = self.run_dir / TRIALS_DIR / key
        arch = ArchConfig.load(trial_dir / ARCH_YAML)
        metrics = _metrics(row)
        if pending is None:
            params = {"arch": arch.canonical(), "trial_key": key,
                      **{k: str(v) for k, v in arch.to_flat().items()}}
            tags = {TAG_PARENT: self.parent_run_id, TAG_TRIAL_KEY: key, TAG_ROLE: ROLE_FRONT_MODEL,
                    TAG_ON_FRONT: "true", **({TAG_RANK: rank} if rank is not None else {})}
            name = _BAD_NAME.sub("-", f"{self.search_name}-trial{key}")
            model = self.client.create_logged_model(
                self.experiment_id, name=name, source_run_id=run_id, tags=tags, params=params,
                model_type=MODEL_TYPE)
            model_id = model.model_id
        else:
            model_id = pending.model_id
            self._set_tags(pending, "true", rank)
        path = _weights_file(self.run_dir, trial_dir, row, weights.get(key))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model"
            extra = self._artifacts(out, arch, path, model_id, run_id)
            self.client.log_model_artifacts(model_id, str(out))
        if extra:
            self.client.set_logged_model_tags(model_id, extra)
        step = self._link_metrics(model_id, run_id, metrics)
        self._link_output(run_id, model_id, step)
        self.client.finalize_logged_model(model_id, "READY")
        return _Known(model_id, "true", rank, True)

    def _artifacts(self, out: Path, arch: ArchConfig, weights: Path | None, model_id: str,
                   run_id: str) -> dict[str, str]:
        """Write the model's folder ``out``; returns tags saying where the ONNX came from."""
        fp32_name, int8_name = onnx_file_names()
        tags: dict[str, str] = {}
        fp32 = int8 = None
        with tempfile.TemporaryDirectory() as tmp:
            if weights is not None and weights.name == MODEL_FILE and (
                    weights.parent / fp32_name).is_file():
                fp32, tags[TAG_ONNX_SOURCE] = weights.parent / fp32_name, "trial"
                if (weights.parent / int8_name).is_file():
                    int8 = weights.parent / int8_name
            elif weights is not None:
                try:
                    fp32 = _export_fp32(arch, weights, Path(tmp) / fp32_name)
                    tags[TAG_ONNX_SOURCE] = "exported"
                except Exception as e:  # an export failure must not stop tracking
                    tags[TAG_ONNX_ERROR] = f"{type(e).__name__}: {e}"[:500]
                    log.warning("front model of trial %s: no ONNX (%s)", arch.canonical(), e)
            else:
                tags[TAG_ONNX_ERROR] = "no weights file in the run directory"
            if fp32 is not None:
                _save_onnx_model(fp32, out, arch, model_id=model_id, run_id=run_id)
            else:
                out.mkdir(parents=True)
        if int8 is not None:
            shutil.copyfile(int8, out / int8_name)
        if weights is not None and weights.is_file():
            shutil.copyfile(weights, out / MODEL_FILE)
        (out / ARCH_YAML).write_text(arch.to_yaml())
        return tags

    def _link_metrics(self, model_id: str, run_id: str, metrics: Mapping[str, float]) -> int:
        """Log ``metrics`` to the model through its child run; returns the step (final epoch).

        A value already in the run's history is re-sent with its own timestamp and step (the
        store keeps one entry per key, timestamp, step and value); another value (a pruning
        round's point the run reported under a different step) goes in at the final step."""
        import time

        from mlflow.entities import Metric

        if (existing := self.client.get_logged_model(model_id).metrics):
            done = {m.key for m in existing}  # completing a PENDING model: no second copy
            metrics = {k: v for k, v in metrics.items() if k not in done}
        run = self.client.get_run(run_id)
        step = int(run.data.metrics.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            same = [h for h in self.client.get_metric_history(run_id, key)
                    if math.isclose(h.value, value, rel_tol=1e-12, abs_tol=0.0)]
            h = same[-1] if same else None
            batch.append(Metric(key, h.value if h else value, h.timestamp if h else now,
                                h.step if h else step, model_id=model_id))
        for i in range(0, len(batch), 1000):  # log_batch's limit
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])
        return step

    def _link_output(self, run_id: str, model_id: str, step: int) -> None:
        """The child run lists the model among its outputs (the run page's Logged models)."""
        from mlflow.entities import LoggedModelOutput

        outputs = self.client.get_run(run_id).outputs
        if outputs is None or all(o.model_id != model_id for o in outputs.model_outputs):
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])


def _rank(row: Mapping[str, Any] | None) -> str | None:
    if row is None or not _finite(row.get("pareto_rank")):
        return None
    return str(int(row["pareto_rank"]))


def _finite(v: Any) -> bool:
    """A finite number (numpy scalars too: pandas rows hold them), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's measured values: search.schema's metrics, int8 ones, the pruning round."""
    return {k: float(v) for k, v in row.items()
            if k not in _NOT_METRICS and (k in METRICS or k.startswith("int8_")
                                          or k == "prune_round") and _finite(v)}


def _weights_file(run_dir: Path, trial_dir: Path, row: Mapping[str, Any],
                  given: Path | None) -> Path | None:
    """The weights of the front point: pareto.csv's ``model`` (a round's file where the front
    point is an earlier pruning round), else the tracker's, else trials/<key>/model.pt."""
    rel = row.get("model")
    for path in ((run_dir / rel) if isinstance(rel, str) and rel else None, given,
                 trial_dir / MODEL_FILE):
        if path is not None and Path(path).is_file():
            return Path(path)
    return None


def _export_fp32(arch: ArchConfig, weights: Path, out: Path) -> Path:
    """fp32 ONNX of the trained net as deployed (trainables.deploy.quantize: masks and BN folded)."""
    import torch

    from trainables.deploy.quantize import deploy_model, export_onnx
    from trainables.models import build_model
    from trainables.pruning import apply_masks, finalize

    state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only
    model = build_model(arch)
    apply_masks(model, state)  # no-op for an unpruned state_dict
    model.load_state_dict(state)
    finalize(model)
    shape = (arch.in_channels, *arch.input_size)
    return export_onnx(deploy_model(model.eval(), shape), shape, out, fast=True)  # fp32 only


def _save_onnx_model(fp32: Path, out: Path, arch: ArchConfig, *, model_id: str,
                     run_id: str) -> None:
    """An MLflow ONNX-flavor model folder (MLmodel, model.onnx, environment files) at ``out``."""
    import onnx
    import onnxruntime
    from mlflow import onnx as mlflow_onnx
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    c, (h, w) = arch.in_channels, arch.input_size
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, arch.num_classes), "logits")]))
    # Pinned requirements: MLflow's inference would load the model in a subprocess (seconds).
    reqs = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    mlflow_onnx.save_model(
        onnx.load(str(fp32)), str(out), signature=signature, pip_requirements=reqs,
        save_as_external_data=False,  # one self-contained file (these nets are far below 2 GB)
        onnx_execution_providers=["CPUExecutionProvider"],
        mlflow_model=Model(model_uuid=model_id, model_id=model_id, run_id=run_id))
