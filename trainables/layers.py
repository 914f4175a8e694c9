"""Layer factories shared by every model family.

- :func:`create_conv2d` is the ONE conv factory: every conv of every family comes from it, so
  "standard" vs "separable" means the same everywhere and accounting sees one module type each.
- :class:`SparseLinear` is a dense layer with a fixed, seeded random 0/1 mask (study 000's
  randomly sparse head layers): its nonzero weight count is known from the density alone, so the
  budget screen can count it on the meta device without drawing the mask.
- :func:`create_activation` maps ``ArchConfig.activation`` names to modules.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
}


def create_activation(name: str) -> nn.Module:
    """A fresh activation module for an ``ArchConfig.activation`` name."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation={name!r} is invalid: expected one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def conv_padding(kernel: int, padding: str) -> int:
    """Symmetric zero padding (pixels per side) for ``padding`` "same" or "valid".

    "same" is k//2, which keeps HxW at stride 1 and gives ceil(H/stride) otherwise (Keras' output
    size) only for odd kernels; an even kernel would need asymmetric padding, so it is refused.
    """
    if padding == "valid":
        return 0
    if padding != "same":
        raise ValueError(f"padding={padding!r} is invalid: expected same or valid")
    if kernel % 2 == 0:
        raise ValueError(f"kernel={kernel} is invalid with padding='same': expected an odd kernel")
    return kernel // 2


def conv_output_size(size: int, kernel: int, *, stride: int = 1, padding: str = "same") -> int:
    """Output height (or width) in pixels of a conv from :func:`create_conv2d`."""
    return (size + 2 * conv_padding(kernel, padding) - kernel) // stride + 1


class SubsampledConv2d(nn.Conv2d):
    """A strided 1x1 conv computed as "take every stride-th pixel, then a 1x1 conv".

    The same weights, outputs, parameter and MAC counts as ``nn.Conv2d(k=1, stride=s)``
    (a 1x1 kernel at stride s reads exactly the pixels x[..., ::s, ::s]), but it never runs
    torch's strided 1x1 kernel: on CPU in channels_last with fewer than 8 input channels, its
    backward corrupts the heap in torch 2.14.1 ("free(): invalid next size", then SIGABRT; a
    residual shortcut 5 -> 11 channels at stride 2 is enough).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias, 1, 0, self.dilation, self.groups)


def _conv(in_ch: int, out_ch: int, kernel: int, *, stride: int, padding: int, groups: int = 1,
          bias: bool) -> nn.Conv2d:
    cls = SubsampledConv2d if kernel == 1 and stride > 1 and padding == 0 else nn.Conv2d
    return cls(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=bias)


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D``: depthwise kxk (groups=in, no bias) then pointwise 1x1 (bias).

    (N, C_in, H, W) -> depthwise (N, C_in, H', W') -> pointwise (N, C_out, H', W'); the stride
    applies in the depthwise conv, so the pointwise conv runs at the output resolution.
    Params: C_in*k*k + C_in*C_out (+ C_out bias).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, *, stride: int, padding: int, bias: bool
    ) -> None:
        super().__init__()
        self.depthwise = _conv(in_ch, in_ch, kernel, stride=stride, padding=padding, groups=in_ch,
                               bias=False)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def create_conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    conv: str = "standard",
    bias: bool = True,
    padding: str = "same",
) -> nn.Module:
    """A ``conv`` ("standard" | "separable") conv; see :class:`SeparableConv2d` for separable."""
    for name, value in (("in_ch", in_ch), ("out_ch", out_ch), ("kernel", kernel), ("stride", stride)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    pad = conv_padding(kernel, padding)
    if conv == "standard":
        return _conv(in_ch, out_ch, kernel, stride=stride, padding=pad, bias=bias)
    if conv == "separable":
        return SeparableConv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, bias=bias)
    raise ValueError(f"conv={conv!r} is invalid: expected standard or separable")


def mask_ones(density: float, numel: int) -> int:
    """Kept weights of a :class:`SparseLinear`: round(density * numel), at least 1.

    The single rule for both the real mask and the meta-device count, so they always agree.
    """
    return max(1, round(density * numel))


def layer_seed(mask_seed: int, layer_index: int) -> int:
    """A 63-bit mask seed per (``ArchConfig.mask_seed``, head layer index).

    Hashed rather than added so that (seed 0, layer 1) and (seed 1, layer 0) draw unrelated masks.
    """
    digest = hashlib.sha256(f"{mask_seed}/{layer_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SparseLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed random 0/1 ``mask`` buffer.

    The mask (out_features, in_features) has exactly :func:`mask_ones` ones, drawn from a CPU
    generator seeded with ``seed`` (the same mask on every device and run). The weight is zeroed
    at masked positions on init and the forward uses ``weight * mask``, so those weights get zero
    gradient and stay exactly 0 under any optimizer, weight decay included. Built on the meta
    device the mask is shape only (nothing is drawn); :attr:`nonzero_weights` still holds.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        density: float,
        seed: int,
        bias: bool = True,
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"{density=} must be in (0, 1]")
        super().__init__(in_features, out_features, bias=bias)
        self.density = density
        self.seed = seed
        if self.weight.is_meta:
            mask = torch.empty_like(self.weight)
        else:
            numel = self.weight.numel()
            generator = torch.Generator(device="cpu").manual_seed(seed)
            kept = torch.randperm(numel, generator=generator, device="cpu")[: self.nonzero_weights]
            flat = torch.zeros(numel, dtype=self.weight.dtype, device="cpu")
            flat[kept] = 1.0
            mask = flat.view(out_features, in_features).to(self.weight.device)
        self.register_buffer("mask", mask)
        self._apply_mask()

    @property
    def nonzero_weights(self) -> int:
        return mask_ones(self.density, self.in_features * self.out_features)

    def _apply_mask(self) -> None:
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # nn.Linear.__init__ calls this before the mask exists; later calls must re-zero.
        if hasattr(self, "mask"):
            self._apply_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density}, seed={self.seed}"
