"""Deployment figures checked against reality: flash against the int8 ONNX file's initializers,
peak SRAM against an independent liveness trace of the torch.fx graph on sampled search-space
networks, int8 accuracy on a really trained digits net, and the latency machinery."""

from __future__ import annotations

import json
import operator
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from trainables.accounting import count, count_built
from trainables.arch import ArchConfig, HeadLayer, StageConfig, StemConfig
from trainables.deploy.budgets import (
    ALLOC,
    ELEMENTWISE,
    VIEW,
    FlowOp,
    bn_bytes,
    peak_activation,
    weight_bytes,
)
from trainables.models import build_model
from trainables.pruning import prune_step

pytestmark = pytest.mark.slow  # many seconds of real work without Ray

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ pure arithmetic, by hand
@pytest.mark.parametrize(("numel", "nonzero", "out", "bias", "expected"), [
    # dense: numel + 4 * out scales (+ 4 * out biases); fp32: 4 * numel (+ 4 * out)
    (864, 864, 32, True, (864 + 128 + 128, 4 * 864 + 128, 864 + 256, "dense")),
    (864, 864, 32, False, (864 + 128, 4 * 864, 864 + 128, "dense")),
    # 10% dense: bitmask 1000/8 = 125 bytes + 100 values; fp32 125 + 400 < 4000
    (1000, 100, 10, True, (125 + 100 + 80, 125 + 400 + 40, 1000 + 80, "bitmask")),
    # 7/8 dense: bitmask 125 + 875 = 1000 = dense: a tie stays dense; fp32 bitmask 125 + 3500
    (1000, 875, 10, False, (1000 + 40, 125 + 3500, 1000 + 40, "dense")),
    (9, 0, 1, False, (2 + 4, 2, 9 + 4, "bitmask")),  # ceil(9 / 8) = 2
])
def test_weight_bytes_table(numel, nonzero, out, bias, expected) -> None:
    t = weight_bytes(numel, nonzero, out, bias=bias)
    assert (t.int8, t.fp32, t.int8_dense, t.fmt) == expected


def test_bn_bytes_and_bad_input() -> None:
    assert bn_bytes(16, folded=True).int8 == 0
    t = bn_bytes(16, folded=False)
    assert (t.int8, t.fp32, t.fmt) == (16 * 9, 16 * 8, "dense")
    with pytest.raises(ValueError, match="nonzero=5"):
        weight_bytes(4, 5, 1, bias=False)


def test_peak_activation_by_hand() -> None:
    # x(10) -conv-> a(20) -relu-> b(20) -conv-> c(5); add(c, ...) not here: a chain.
    ops = [FlowOp(ALLOC, (0,), 1), FlowOp(ELEMENTWISE, (1,), 2), FlowOp(ALLOC, (2,), 3)]
    p = peak_activation(ops, [10, 20, 20, 5], output=3)
    assert p.per_op == (30, 20, 25) and (p.elements, p.op) == (30, 0)  # relu in place
    # residual: x(8) -conv-> a(8) -conv-> b(8); add(b, x) -> c: x held for the skip
    ops = [FlowOp(ALLOC, (0,), 1), FlowOp(ALLOC, (1,), 2), FlowOp(ELEMENTWISE, (2, 0), 3)]
    p = peak_activation(ops, [8, 8, 8, 8], output=3)
    assert p.per_op == (16, 24, 16)  # the add writes over a dying input
    # a pre-activation BN over a tensor read again later cannot write in place
    ops = [FlowOp(ELEMENTWISE, (0,), 1), FlowOp(ALLOC, (1,), 2), FlowOp(ALLOC, (0, 2), 3)]
    p = peak_activation(ops, [4, 4, 2, 6], output=3)
    assert p.per_op == (8, 10, 12)
    # a view shares its input's buffer, which lives as long as the view is read
    ops = [FlowOp(VIEW, (0,), 1), FlowOp(ALLOC, (1,), 2)]
    assert peak_activation(ops, [6, 6, 1], output=2).per_op == (6, 7)


# ------------------------------------------------------------------ SRAM vs an fx liveness trace
class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not m._modules


_VIEWS = (nn.Identity, nn.Flatten, nn.Dropout, nn.Sequential)
_ELEMENTWISE = (_BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)


def fx_peak(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Peak live activation elements by reference counting over the fx graph (independent of
    accounting's recorder): every node's buffer has one pending read per user; views share a
    buffer; an elementwise node writes over an input buffer whose only pending read is its own."""
    model.eval()  # batch 1: BatchNorm refuses one value per channel in train mode
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    ShapeProp(gm).propagate(torch.empty((1, *input_shape), device="meta"))
    modules = dict(gm.named_modules())
    buf: dict[fx.Node, int] = {}
    size: dict[int, int] = {}
    pending: dict[int, int] = {}
    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]

    def tensor_inputs(n: fx.Node) -> list[fx.Node]:
        flat = fx.node.map_arg((n.args, n.kwargs), lambda a: a)
        found: list[fx.Node] = []
        fx.node.map_arg(flat, lambda a: found.append(a) if a in buf else None)
        return list(dict.fromkeys(found))

    def numel(n: fx.Node) -> int:
        return int(np.prod(n.meta["tensor_meta"].shape))

    def reads(n: fx.Node) -> int:
        return len(n.users)  # the output node's read never completes

    peak = 0
    for n in nodes:
        if n.op == "placeholder":
            buf[n] = 0
            size[0], pending[0] = numel(n), reads(n)
            peak = size[0]
            continue
        ins = tensor_inputs(n)
        kind = ALLOC
        if n.op == "call_module":
            m = modules[n.target]
            kind = VIEW if isinstance(m, _VIEWS) else ELEMENTWISE if isinstance(m, _ELEMENTWISE) else ALLOC
        elif n.target is torch.cat:
            kind = VIEW if len(n.args[0]) == 1 else ALLOC
        elif n.target in (operator.add, operator.iadd, torch.add):
            kind = ELEMENTWISE
        live = sum(size[b] for b, k in pending.items() if k > 0)
        target = None
        if kind == VIEW:
            target = buf[ins[0]]
        elif kind == ELEMENTWISE:
            target = next((buf[i] for i in ins if pending[buf[i]] == 1 and size[buf[i]] == numel(n)), None)
        if target is None:
            target = len(size)
            size[target], pending[target] = numel(n), 0
            peak = max(peak, live + size[target])
        else:
            peak = max(peak, live)
        buf[n] = target
        pending[target] += reads(n)
        for i in ins:
            pending[buf[i]] -= 1
    return peak


def sampled_archs() -> list[ArchConfig]:
    from search.space import dry_run
    from search.spec import load_spec

    spaces = {"quickstart.yaml": ((1, 8, 8), 10), "mnist.yaml": ((1, 28, 28), 10),
              "cifar10.yaml": ((3, 32, 32), 10), "cifar100.yaml": ((3, 32, 32), 100)}
    archs = []
    for name, (shape, classes) in spaces.items():
        archs += [p.arch for p in dry_run(load_spec(ROOT / "spaces" / name), 30,
                                          input_shape=shape, num_classes=classes).proposals]
    return archs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sram_equals_an_fx_liveness_trace_on_sampled_networks() -> None:
    archs = sampled_archs()
    assert len(archs) >= 100
    published = [ArchConfig.load(p) for p in sorted((ROOT / "spaces" / "archs").glob("*.yaml"))]
    for arch in archs + published:
        acc = count(arch)
        with torch.device("meta"):
            model = build_model(arch)
        assert acc.sram_bytes == fx_peak(model, (arch.in_channels, *arch.input_size)), arch.canonical()
        assert acc.sram_bytes_fp32 == 4 * acc.sram_bytes
        assert max(r.sram_bytes for r in acc.layers) <= acc.sram_bytes


def test_resnet8_figures() -> None:
    acc = count(ArchConfig.load(ROOT / "spaces" / "archs" / "resnet8-mlperf-tiny.yaml"))
    # 78,186 params - 480 BN scales/shifts (folded) = 77,706 weights and biases over 346 output
    # channels (9 convs, the classifier): 77,360 int8 weights + 346 x (fp32 scale + int32 bias)
    # = 80,128 B (78.2 KiB; MLPerf Tiny's int8 .tflite, flatbuffer and graph included, ~96 KB).
    assert acc.flash_bytes == acc.flash_bytes_dense == 77360 + 8 * 346 == 80128
    # input (16x32x32, for the skip) + conv1 out + conv2 out, in stage 0's basic block
    assert acc.sram_bytes == 3 * 16 * 32 * 32 and acc.sram_peak_op == "stages.0.blocks.0.conv2.conv"


# ------------------------------------------------------------------ flash vs the int8 ONNX file
DEPLOY_ARCHS = {
    "resnet8": ArchConfig.load(ROOT / "spaces" / "archs" / "resnet8-mlperf-tiny.yaml"),
    "sparse-pre": ArchConfig(
        in_channels=1, input_size=(12, 12), stem=StemConfig(width=6),
        stages=(StageConfig(block="residual", conv="separable", width=8),
                StageConfig(block="sparsenet", width=4, layers=3, downsample="maxpool", order="pre",
                            compression=0.5)),
        head=(HeadLayer(16, density=0.3),), head_batch_norm=True, final_bn_act=True, pooling="flatten"),
    "dense-bottleneck": ArchConfig(
        in_channels=1, input_size=(12, 12), stem=StemConfig(width=6, bias=False),
        stages=(StageConfig(block="densenet", width=4, layers=3, bottleneck=4, order="pre",
                            transition="always", bias=False),
                StageConfig(block="plain", width=8, layers=2, downsample="avgpool", conv="separable")),
        head=(HeadLayer(16),), activation="gelu", pooling="gmp"),
}


def _trained(arch: ArchConfig, *, prune: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    shape = (arch.in_channels, *arch.input_size)
    for _ in range(3):  # BN running statistics move off their defaults
        loss = model(torch.randn(8, *shape)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if prune:
        prune_step(model, rate=0.5)
    return model.eval()


@pytest.mark.parametrize("prune", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("name", list(DEPLOY_ARCHS))
def test_flash_equals_the_int8_onnx_initializers(name: str, prune: bool, tmp_path: Path) -> None:
    from trainables.deploy.quantize import (
        deploy_model,
        export_onnx,
        onnx_weight_bytes,
        quantize_file,
    )

    arch = DEPLOY_ARCHS[name]
    shape = (arch.in_channels, *arch.input_size)
    model = _trained(arch, prune=prune)
    acc = count_built(model, shape)
    net = deploy_model(model, shape)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)
    fp32 = export_onnx(net, shape, tmp_path / "m.fp32.onnx")
    rng = np.random.default_rng(0)
    int8 = quantize_file(fp32, tmp_path / "m.onnx", [rng.standard_normal((4, *shape), dtype=np.float32)])
    got = onnx_weight_bytes(int8)
    # The prediction, exactly: int8 weights + fp32 per-channel scales + int32 biases.
    assert got.weights == acc.flash_bytes_dense
    # The stated overhead: one int8 zero point per output channel of each conv/linear
    # (BatchNorms stored as depthwise 1x1 convs included), 4 + 1 bytes per quantized
    # activation tensor (fp32 scale, int8 zero point), int64 shape constants.
    channels = sum(m.weight.shape[0] for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert got.zero_points == got.weight_zero_point_elements == channels
    assert got.activation_qparams == 5 * (got.activation_qparam_tensors // 2)
    assert got.other <= 8 * 16  # a few int64 shape vectors (Reshape, Slice)
    if not prune and name != "sparse-pre":  # every weight dense: the fp32 file is the fp32 figure
        assert onnx_weight_bytes(fp32).weights == acc.flash_bytes_fp32
        assert acc.flash_bytes == acc.flash_bytes_dense
    else:  # the masked weights are stored as bitmasks
        assert acc.flash_bytes < acc.flash_bytes_dense
        assert any(r.weight_format == "bitmask" for r in acc.layers)


def test_meta_flash_equals_the_built_count() -> None:
    for arch in DEPLOY_ARCHS.values():
        torch.manual_seed(0)
        real = count_built(build_model(arch), (arch.in_channels, *arch.input_size))
        assert count(arch) == real


# ------------------------------------------------------------------ int8 accuracy, really trained
def test_int8_accuracy_of_a_trained_digits_net(tmp_path: Path) -> None:
    from trainables.data import DataConfig, load_dataset
    from trainables.deploy.quantize import quantize_int8
    from trainables.train import TrainConfig, fit

    splits = load_dataset(DataConfig(name="digits"))
    arch = ArchConfig(in_channels=1, input_size=(8, 8), stem=StemConfig(width=8),
                      stages=(StageConfig(block="residual", width=12, layers=1),), head=(HeadLayer(32, density=0.5),))
    torch.manual_seed(0)
    model = build_model(arch)
    result = fit(model, splits, TrainConfig(epochs=20, threads=1, seed=0), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_int8(model, splits, tmp_path / "digits.int8.onnx", calibration=256)
    assert q.path.is_file() and q.fp32_path.is_file() and q.calibration_images == 256
    assert q.split == "test" and q.images == len(splits.y_test)
    # ONNX Runtime fp32 agrees with torch's own evaluation (same normalisation) to 1 image
    assert abs(q.accuracy_fp32 - result.metrics["test_accuracy"]) <= 1 / q.images + 1e-9
    assert q.accuracy_fp32 > 0.8
    assert q.accuracy_drop < 0.03, q.to_dict()  # measured: see bench/deploy.py
    assert q.weight_bytes == count_built(model, (1, 8, 8)).flash_bytes_dense
    json.dumps(q.to_dict())


# ------------------------------------------------------------------ latency machinery
def test_latency_is_measured_then_cached(tmp_path: Path) -> None:
    from trainables.deploy.latency import cpu_model, measure_latency

    arch = DEPLOY_ARCHS["sparse-pre"]
    first = measure_latency(arch, cache_dir=tmp_path, repeats=3, warmup=2, min_sample_s=0.001)
    assert not first.cached and first.median_ms > 0 and first.cv >= 0
    assert first.cpu == cpu_model() and first.onnxruntime and first.threads == 1
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["arch_key"] == arch.key()
    again = measure_latency(arch, cache_dir=tmp_path, repeats=3)
    assert again.cached and again.median_ms == first.median_ms
    int8 = measure_latency(arch, precision="int8", cache_dir=tmp_path, repeats=3, warmup=2,
                           min_sample_s=0.001)
    assert not int8.cached and len(list(tmp_path.glob("*.json"))) == 2
    files[0].write_text("{not json")
    assert not measure_latency(arch, cache_dir=tmp_path, repeats=3, warmup=1, min_sample_s=0.001).cached
    with pytest.raises(ValueError, match="precision='int4'"):
        measure_latency(arch, precision="int4", cache_dir=tmp_path)
