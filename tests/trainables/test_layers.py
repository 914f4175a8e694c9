from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.layers import (
    SeparableConv2d,
    SparseLinear,
    SubsampledConv2d,
    conv_output_size,
    create_activation,
    create_conv2d,
    layer_seed,
    mask_ones,
)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(("in_ch", "out_ch", "k", "bias"), [(3, 32, 3, True), (32, 64, 3, True), (8, 4, 5, False)])
def test_standard_conv_params(in_ch: int, out_ch: int, k: int, bias: bool) -> None:
    conv = create_conv2d(in_ch, out_ch, k, bias=bias)
    assert type(conv) is nn.Conv2d
    assert n_params(conv) == in_ch * out_ch * k * k + (out_ch if bias else 0)


def test_separable_conv_is_keras_separable() -> None:
    # 004's Model 2: SeparableConv2D(64, 3) on 32 channels has 2400 params, 64 -> 128 has 8896.
    conv = create_conv2d(32, 64, 3, conv="separable", stride=2)
    assert isinstance(conv, SeparableConv2d)
    assert n_params(conv) == 2400
    assert n_params(create_conv2d(64, 128, 3, conv="separable")) == 8896
    # depthwise: groups = in channels, no bias, carries the stride; pointwise: 1x1 with bias.
    assert conv.depthwise.groups == 32 and conv.depthwise.bias is None
    assert conv.depthwise.stride == (2, 2) and conv.pointwise.stride == (1, 1)
    assert conv.pointwise.kernel_size == (1, 1) and conv.pointwise.bias is not None
    assert n_params(create_conv2d(32, 64, 3, conv="separable", bias=False)) == 2400 - 64


@pytest.mark.parametrize("conv", ["standard", "separable"])
@pytest.mark.parametrize(("size", "k", "stride", "padding", "expected"), [
    (32, 3, 1, "same", 32), (32, 3, 2, "same", 16), (31, 3, 2, "same", 16), (9, 5, 4, "same", 3),
    (28, 3, 1, "valid", 26), (28, 5, 1, "valid", 24), (28, 3, 2, "valid", 13), (7, 1, 1, "valid", 7),
])
def test_output_size(conv: str, size: int, k: int, stride: int, padding: str, expected: int) -> None:
    m = create_conv2d(2, 3, k, stride=stride, conv=conv, padding=padding)
    out = m(torch.zeros(1, 2, size, size + 1))
    assert conv_output_size(size, k, stride=stride, padding=padding) == expected
    assert out.shape == (1, 3, expected, conv_output_size(size + 1, k, stride=stride, padding=padding))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kernel": 4}, "kernel=4 is invalid with padding='same'"),
    ({"conv": "dilated"}, "conv='dilated' is invalid"),
    ({"padding": "full"}, "padding='full' is invalid"),
    ({"stride": 0}, "stride=0 must be >= 1"),
    ({"in_ch": 0}, "in_ch=0 must be >= 1"),
])
def test_conv_factory_errors_name_the_value(kwargs: dict, message: str) -> None:
    args = {"in_ch": 2, "out_ch": 2, "kernel": 3} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        create_conv2d(args.pop("in_ch"), args.pop("out_ch"), args.pop("kernel"), **args)



@pytest.mark.parametrize("conv", ["standard", "separable"])
def test_strided_1x1_conv_equals_torchs_strided_conv(conv: str) -> None:
    torch.manual_seed(0)
    ours = create_conv2d(5, 11, 1, stride=2, conv=conv, bias=True)
    strided = [m for m in ours.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 1 and isinstance(strided[0], SubsampledConv2d)
    ref = nn.Conv2d(strided[0].in_channels, strided[0].out_channels, 1, stride=2,
                    groups=strided[0].groups, bias=strided[0].bias is not None)
    ref.load_state_dict(strided[0].state_dict())
    x = torch.randn(3, strided[0].in_channels, 9, 7, requires_grad=True)
    out, out_ref = strided[0](x), ref(x)  # NCHW: torch's own strided kernel is safe here
    assert out.shape == out_ref.shape == (3, strided[0].out_channels, 5, 4)
    torch.testing.assert_close(out, out_ref)
    g, g_ref = (torch.autograd.grad(o.square().sum(), [x, m.weight])
                for o, m in ((out, strided[0]), (out_ref, ref)))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_a_strided_shortcut_trains_in_channels_last_on_cpu() -> None:
    """torch 2.14.1 aborts (heap corruption) in the backward of a strided 1x1 conv with < 8
    input channels in channels_last on CPU; a residual stage 5 -> 11 channels at stride 2 has
    one. Run in a child process: the bug kills the process, not a test."""
    code = """
import torch
from trainables.arch import ArchConfig, StageConfig, StemConfig
from trainables.models import build_model
torch.manual_seed(0)
arch = ArchConfig(stem=StemConfig(width=5), stages=(StageConfig(block="residual", width=11,
                  downsample="stride", bias=False),))
model = build_model(arch).to(memory_format=torch.channels_last)
x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
for _ in range(3):
    model(x).sum().backward()
print("trained")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "trained", done.stderr[-2000:]


def test_activation_factory() -> None:
    names = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU}
    for name, cls in names.items():
        assert type(create_activation(name)) is cls
    assert create_activation("relu") is not create_activation("relu")  # fresh modules
    with pytest.raises(ValueError, match="activation='tanh' is invalid"):
        create_activation("tanh")


@pytest.mark.parametrize(("density", "shape", "ones"), [
    (0.25, (128, 512), 16384), (0.3, (10, 7), 21), (0.5, (3, 3), 4), (1e-6, (4, 4), 1), (1.0, (5, 6), 30),
])
def test_sparse_linear_exact_mask(density: float, shape: tuple[int, int], ones: int) -> None:
    out_f, in_f = shape
    layer = SparseLinear(in_f, out_f, density=density, seed=7)
    assert mask_ones(density, in_f * out_f) == ones == layer.nonzero_weights
    assert int(layer.mask.sum()) == ones
    assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(layer.weight[layer.mask == 0] == 0)
    assert torch.count_nonzero(layer.weight) == ones
    x = torch.randn(4, in_f)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * layer.mask, layer.bias))


def test_sparse_linear_mask_is_seeded() -> None:
    a, b, c = (SparseLinear(64, 32, density=0.1, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)
    assert layer_seed(0, 1) != layer_seed(1, 0)
    assert layer_seed(5, 2) == layer_seed(5, 2)


def test_sparse_linear_refuses_bad_density() -> None:
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"density={density}"):
            SparseLinear(4, 4, density=density, seed=0)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.5),
    lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
])
def test_masked_weights_stay_exactly_zero_under_training(make_opt) -> None:
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, density=0.3, seed=1)
    before = layer.weight.detach().clone()
    opt = make_opt(layer.parameters())
    for _ in range(5):
        opt.zero_grad()
        loss = (layer(torch.randn(32, 16)) - 1).pow(2).mean()
        loss.backward()
        opt.step()
    masked = layer.mask == 0
    assert torch.all(layer.weight[masked] == 0)
    assert torch.all(layer.weight.grad[masked] == 0)
    # the kept weights did train
    assert not torch.equal(layer.weight[~masked], before[~masked])


def test_sparse_linear_reset_parameters_rezeroes() -> None:
    layer = SparseLinear(10, 10, density=0.2, seed=0)
    layer.reset_parameters()
    assert torch.count_nonzero(layer.weight) == 20


def test_sparse_linear_on_meta_draws_nothing() -> None:
    with torch.device("meta"):
        layer = SparseLinear(2048, 512, density=0.05, seed=0)
    assert layer.mask.is_meta and layer.weight.is_meta
    assert layer.nonzero_weights == round(0.05 * 2048 * 512)
