"""Post-training static int8 quantization with ONNX Runtime, and evaluation of the int8 model.

:func:`quantize_int8` takes a trained model and a dataset's :class:`~trainables.data.Splits`:

1. :func:`deploy_model`: a copy as an int8 runtime stores it: pruning masks baked in, each
   SparseLinear a Linear with its masked weight, every BatchNorm that :mod:`trainables.accounting`
   counts as folded folded into the conv/linear before it, every other BatchNorm2d a depthwise
   1x1 conv (its per-channel scale + shift);
2. :func:`export_onnx`: fp32 ONNX (torch's dynamo exporter, input "images" (N, C, H, W), any N);
3. ``onnxruntime.quantization.quantize_static``: per-output-channel symmetric int8 weights,
   int8 activations (S8S8) with MinMax ranges from ``calibration`` training images, **QOperator**
   format (QLinearConv, QGemm, QLinearAdd, ...). QOperator, not QDQ, because its initializers
   are the tensors an int8 runtime stores (int8 weights, fp32 per-channel scales, int32
   biases), so :func:`onnx_weight_bytes` checks the flash prediction against the file: QDQ
   keeps the same int8 weights but adds a per-channel fp32 scale and int32 zero point per bias.
   Signed activations (as TFLite and CMSIS-NN use), not ORT's default uint8: on x86 CPUs
   without VNNI (this project's AMD EPYC box) U8S8 runs on VPMADDUBSW, whose int16 sums
   saturate: a digits net lost 9.7 points with U8S8 and 0.0 with S8S8 (same file otherwise).
4. both files evaluated with ONNX Runtime on a split, images normalised exactly as
   ``trainables.train`` evaluates them (uint8 x * 1/(255 std) - mean/std, float32).

Overhead of the int8 file over ``Accounting.flash_bytes_dense`` (see :func:`onnx_weight_bytes`):
one int8 weight zero point per output channel of each quantized conv/linear (all zero:
symmetric), one fp32 scale + one int8 zero point per quantized activation tensor, and int64
shape constants (Reshape, Slice). Activations ONNX Runtime leaves in fp32 (GELU, SiLU,
Hardswish, global pools) add no initializers.

Per finished trial (:func:`trial_int8`, called by :mod:`trainables.trial` unless
``train.int8_eval: false``): the trained model as :data:`FP32_ONNX_FILE` and
:data:`INT8_ONNX_FILE` in its checkpoint (the run dir keeps both beside ``model.pt``),
calibrated on :data:`CALIBRATION_IMAGES` training images drawn with :data:`CALIBRATION_SEED`
(the same images for every trial of a dataset), evaluated as int8 on val and test. A failure
there never fails the trial: it is reported as ``int8_error`` and the int8 metrics stay absent.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from trainables import pruning
from trainables.accounting import bn_folding
from trainables.layers import SparseLinear

__all__ = [
    "CALIBRATION_IMAGES",
    "CALIBRATION_SEED",
    "FP32_ONNX_FILE",
    "INT8_ONNX_FILE",
    "Int8Result",
    "OnnxWeightBytes",
    "calibration_batches",
    "deploy_model",
    "evaluate_onnx",
    "export_onnx",
    "normalize",
    "onnx_weight_bytes",
    "quantize_file",
    "quantize_int8",
    "trial_int8",
]

# A finished trial's ONNX files, beside its model.pt (checkpoint and run dir); the MLflow
# logged model attaches them by these names.
FP32_ONNX_FILE = "model.onnx"  # fp32, as deployed: masks baked in, BatchNorm folded
INT8_ONNX_FILE = "model-int8.onnx"  # its static per-channel int8 QOperator quantization
CALIBRATION_IMAGES = 256  # training images a trial's activation ranges come from
CALIBRATION_SEED = 0  # fixed, not the trial's seed: every trial calibrates on the same images


def deploy_model(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """An eval-mode CPU copy of ``model`` as an int8 runtime stores it (see the module docstring).

    Outputs equal ``model``'s in eval mode up to float rounding; ``model`` is not changed.
    """
    for m, name in pruning.pruned_tensors(model):
        # A stale non-leaf ``weight`` (after a forward with autograd) cannot be deep-copied.
        with torch.no_grad():
            setattr(m, name, getattr(m, name + "_orig") * getattr(m, name + "_mask"))
    # Contiguous: a channels_last training copy would export extra layout constants.
    net = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
    pruning.finalize(net)
    for name, m in list(net.named_modules()):
        if isinstance(m, SparseLinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(m.weight * m.mask)
                if m.bias is not None:
                    plain.bias.copy_(m.bias)
            _replace(net, name, plain)
    names = {m: n for n, m in net.named_modules()}
    with torch.no_grad():
        for bn, prod in bn_folding(net, input_shape).items():
            bias = prod.bias if prod.bias is not None else torch.zeros(prod.weight.shape[0])
            fuse = fuse_conv_bn_weights if isinstance(prod, nn.Conv2d) else fuse_linear_bn_weights
            args = (prod.weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            w, b = fuse(*args)
            prod.weight = nn.Parameter(w.detach().clone())
            prod.bias = nn.Parameter(b.detach().clone())
            _replace(net, names[bn], nn.Identity())
        for name, m in list(net.named_modules()):
            if isinstance(m, nn.BatchNorm2d):
                _replace(net, name, _affine_conv(m))
    return net.eval()


def _affine_conv(bn: _BatchNorm) -> nn.Conv2d:
    """A BatchNorm2d in eval mode as a depthwise 1x1 conv: y = x * scale + shift per channel."""
    c = bn.num_features
    var = bn.running_var if bn.running_var is not None else torch.ones(c)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(c)
    gamma = bn.weight if bn.weight is not None else torch.ones(c)
    beta = bn.bias if bn.bias is not None else torch.zeros(c)
    scale = gamma / torch.sqrt(var + bn.eps)
    conv = nn.Conv2d(c, c, 1, groups=c, bias=True)
    conv.weight.copy_(scale.view(c, 1, 1, 1))
    conv.bias.copy_(beta - mean * scale)
    return conv


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], out: str | Path, *,
                fast: bool = False) -> Path:
    """fp32 ONNX of an eval-mode CPU model: input "images" (N, C, H, W) with any N, "logits".

    ``fast``: TorchScript's exporter first, ~10x faster than dynamo for a small net (0.3 s vs
    3-9 s on a busy 2-core box) with the same graph for ONNX Runtime; for an fp32 file only:
    ONNX Runtime's static quantizer cannot read its biases (the int8 path keeps dynamo)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fast:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its deprecation notice
                torch.onnx.export(model.eval(), (torch.randn(2, *input_shape),), str(out),
                                  dynamo=False, input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            return out
        except Exception:  # removed in a later torch, or a module it cannot script
            pass  # the dynamo export below
    example = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(out))
    return out


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 as ``trainables.train`` evaluates: x / (255 std) - mean / std."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return torch.addcmul(-m / s, x.float(), 1.0 / (255.0 * s)).numpy()


def _session(path: str | Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def evaluate_onnx(path: str | Path, x: torch.Tensor, y: torch.Tensor, mean: tuple[float, ...],
                  std: tuple[float, ...], *, batch_size: int = 256, threads: int = 1) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on uint8 images ``x`` with labels ``y``."""
    sess = _session(path, threads)
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = sess.run(["logits"], {"images": normalize(x[i:i + batch_size], mean, std)})[0]
        correct += int((logits.argmax(1) == y[i:i + batch_size].numpy()).sum())
    return correct / max(1, len(y))


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over normalised float32 batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {"images": batch}


def quantize_file(fp32: str | Path, out: str | Path, calibration: list[np.ndarray]) -> Path:
    """Static int8 QOperator quantization of the fp32 ONNX at ``fp32`` (see the module docstring)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "please consider pre-processing" on every call
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints value_info protos
            quantize_static(str(fp32), str(out), _Calibration(calibration),
                            quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)
    return out


@dataclass(frozen=True)
class Int8Result:
    """What :func:`quantize_int8` measured; ``to_dict`` is JSON-ready (paths as strings)."""

    path: Path  # the int8 ONNX file (QOperator)
    fp32_path: Path  # the fp32 ONNX file it was quantized from (BN folded)
    split: str  # "val" | "test": where the accuracies were measured
    images: int  # images in that split
    accuracy_fp32: float  # the fp32 ONNX model (ONNX Runtime)
    accuracy_int8: float  # the int8 ONNX model (ONNX Runtime)
    calibration_images: int  # training images the activation ranges came from
    int8_file_bytes: int  # size of the int8 file on disk
    weight_bytes: int  # int8 weight initializers (weights + per-channel scales + biases)

    @property
    def accuracy_drop(self) -> float:
        return self.accuracy_fp32 - self.accuracy_int8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(path=str(self.path), fp32_path=str(self.fp32_path), accuracy_drop=self.accuracy_drop)
        return d


def quantize_int8(
    model: nn.Module,
    splits: Any,
    out: str | Path,
    *,
    split: str = "test",
    calibration: int = 256,
    seed: int = 0,
    batch_size: int = 32,
    threads: int = 1,
) -> Int8Result:
    """Post-training static int8 of a trained ``model`` on ``splits`` (a trainables.data.Splits).

    Writes the int8 ONNX to ``out`` (kept) and the fp32 one beside it (``<stem>.fp32.onnx``);
    calibrates on ``calibration`` training images drawn with ``seed`` (in batches of
    ``batch_size``) and evaluates both on ``split``.
    """
    if split not in ("val", "test"):
        raise ValueError(f"{split=} is invalid: expected val or test")
    if not (isinstance(calibration, int) and calibration >= 1):
        raise ValueError(f"{calibration=} must be an integer >= 1")
    out = Path(out)
    input_shape = splits.input_shape
    fp32 = export_onnx(deploy_model(model, input_shape), input_shape, out.with_suffix(".fp32.onnx"))
    batches = calibration_batches(splits, calibration, seed, batch_size)
    n = sum(len(b) for b in batches)
    quantize_file(fp32, out, batches)
    x, y = (splits.x_val, splits.y_val) if split == "val" else (splits.x_test, splits.y_test)
    return Int8Result(
        path=out, fp32_path=fp32, split=split, images=len(y),
        accuracy_fp32=evaluate_onnx(fp32, x, y, splits.mean, splits.std, threads=threads),
        accuracy_int8=evaluate_onnx(out, x, y, splits.mean, splits.std, threads=threads),
        calibration_images=n, int8_file_bytes=out.stat().st_size,
        weight_bytes=onnx_weight_bytes(out).weights,
    )


def calibration_batches(splits: Any, images: int, seed: int, batch_size: int = 32) -> list[np.ndarray]:
    """``images`` training images (all of them if fewer) drawn without replacement with
    ``seed``, normalised as evaluation does, in batches of ``batch_size``."""
    gen = torch.Generator().manual_seed(seed)
    n = min(images, len(splits.y_train))
    picked = splits.x_train[torch.randperm(len(splits.y_train), generator=gen)[:n]]
    return [normalize(picked[i:i + batch_size], splits.mean, splits.std)
            for i in range(0, n, batch_size)]


def trial_int8(model: nn.Module, splits: Any, out_dir: str | Path, *, val_accuracy: float,
               threads: int = 1) -> dict[str, Any]:
    """The int8 step of a finished trial: the report keys it adds (see the module docstring).

    Writes :data:`FP32_ONNX_FILE` and :data:`INT8_ONNX_FILE` into ``out_dir``; returns
    ``int8_val_accuracy`` (also as ``int8_accuracy``, the objective's name),
    ``int8_test_accuracy``, ``int8_drop`` (``val_accuracy`` - int8 val: the trial's own fp32
    val figure, in accuracy as a fraction), ``int8_calibration_images`` and ``int8_seconds``;
    on any failure only ``int8_error`` ("Type: message") and ``int8_seconds``, without an int8
    file (a complete fp32 file stays).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    int8 = out_dir / INT8_ONNX_FILE
    try:
        shape = splits.input_shape
        fp32 = export_onnx(deploy_model(model, shape), shape, out_dir / FP32_ONNX_FILE)
        batches = calibration_batches(splits, CALIBRATION_IMAGES, CALIBRATION_SEED)
        quantize_file(fp32, int8, batches)
        val = evaluate_onnx(int8, splits.x_val, splits.y_val, splits.mean, splits.std,
                            threads=threads)
        test = evaluate_onnx(int8, splits.x_test, splits.y_test, splits.mean, splits.std,
                             threads=threads)
    except Exception as e:  # any failure here is the trial's int8_error, never its end
        if out_dir.is_dir():
            int8.unlink(missing_ok=True)  # a half-written int8 file is no model
        return {"int8_error": f"{type(e).__name__}: {e}".strip(),
                "int8_seconds": time.perf_counter() - t0}
    return {"int8_val_accuracy": val, "int8_accuracy": val, "int8_test_accuracy": test,
            "int8_drop": val_accuracy - val,
            "int8_calibration_images": sum(len(b) for b in batches),
            "int8_seconds": time.perf_counter() - t0}


# Initializer roles per quantized op: input slot -> role.
_W, _ZP, _ACT = "weights", "zero_points", "activation_qparams"
_SLOTS: dict[str, dict[int, str]] = {
    "QLinearConv": {1: _ACT, 2: _ACT, 3: _W, 4: _W, 5: _ZP, 6: _ACT, 7: _ACT, 8: _W},
    "QGemm": {1: _ACT, 2: _ACT, 3: _W, 4: _W, 5: _ZP, 6: _W, 7: _ACT, 8: _ACT},
    "QLinearMatMul": {1: _ACT, 2: _ACT, 3: _W, 4: _W, 5: _ZP, 6: _ACT, 7: _ACT},
    "Conv": {1: _W, 2: _W},
    "Gemm": {1: _W, 2: _W},
}


@dataclass(frozen=True)
class OnnxWeightBytes:
    """An ONNX file's initializer bytes by role (each initializer counted once)."""

    weights: int  # conv/linear weights, per-channel weight scales, biases: what flash predicts
    zero_points: int  # int8 per-channel weight zero points (quantized files; all zero)
    activation_qparams: int  # scalar scales and zero points of quantized activations
    other: int  # everything else (int64 shape constants of Reshape/Slice, ...)
    weight_zero_point_elements: int  # elements of the weight zero points (= output channels)
    activation_qparam_tensors: int

    @property
    def total(self) -> int:
        return self.weights + self.zero_points + self.activation_qparams + self.other


def onnx_weight_bytes(path: str | Path) -> OnnxWeightBytes:
    """Sum an ONNX file's initializers by the role their consumer gives them (see _SLOTS);
    a scalar float/uint8/int8 initializer elsewhere (QLinearAdd's, QLinearConcat's, Q/DQ's
    scales and zero points) is an activation quantization parameter."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    role: dict[str, str] = {}
    for node in graph.node:
        slots = _SLOTS.get(node.op_type, {})
        for k, name in enumerate(node.input):
            if name in inits and k in slots:
                role.setdefault(name, slots[k])
    sums = {_W: 0, _ZP: 0, _ACT: 0, "other": 0}
    zp_elems = act_tensors = 0
    for name, a in inits.items():
        r = role.get(name)
        if r is None:
            scalar_qparam = a.size == 1 and a.dtype in (np.float32, np.uint8, np.int8)
            r = _ACT if scalar_qparam else "other"
        sums[r] += a.nbytes
        zp_elems += a.size if r == _ZP else 0
        act_tensors += r == _ACT
    return OnnxWeightBytes(sums[_W], sums[_ZP], sums[_ACT], sums["other"], zp_elems, act_tensors)
