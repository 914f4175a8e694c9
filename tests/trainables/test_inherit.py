"""Weight inheritance (trainables/models/inherit.py): a lamarckian child starts from its parent."""

from __future__ import annotations

import dataclasses

import torch

from trainables.arch import ArchConfig, HeadLayer, StageConfig, StemConfig
from trainables.models import build_model
from trainables.models.inherit import inherit


def arch(widths: tuple[int, int], *, kernel: int = 3, layers: int = 1,
         head: tuple[HeadLayer, ...] = ()) -> ArchConfig:
    """Two plain stages (the second max-pooled) on 1x12x12 images, BatchNorm after each conv."""
    stages = (StageConfig(block="plain", width=widths[0], layers=1),
              StageConfig(block="plain", width=widths[1], layers=layers, kernel=kernel,
                          downsample="maxpool"))
    return ArchConfig(in_channels=1, input_size=(12, 12), num_classes=4, stem=StemConfig(width=5),
                      stages=stages, head=head)


def trained_like(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights and BatchNorm statistics set to arbitrary values (as training
    leaves them), as its plain state_dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not name.endswith("mask"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g))
    return model.state_dict()


def test_a_wider_deeper_child_with_a_larger_kernel_computes_what_its_parent_computed() -> None:
    torch.manual_seed(0)
    parent = build_model(arch((6, 8)))
    state = trained_like(parent, 1)
    # Stage 0 wider (6 -> 9 channels); stage 1 wider (8 -> 11), a 5x5 kernel and a second layer:
    # the new channels' weights into the inherited outputs are zero, the 3x3 sits in the 5x5's
    # centre, the new layer starts as the identity.
    child = build_model(arch((9, 11), kernel=5, layers=2))
    fraction = inherit(child, state)
    x = torch.randn(3, 1, 12, 12)
    parent.eval(), child.eval()
    # (rtol: the new layer's BatchNorm divides by sqrt(1 + eps), eps = 1e-5)
    torch.testing.assert_close(child(x), parent(x), rtol=1e-4, atol=1e-5)
    assert 0.05 < fraction < 0.5  # the new channels, the kernels' rims and the new layer: its own


def test_a_narrower_child_keeps_the_first_channels_and_its_own_masks() -> None:
    torch.manual_seed(0)
    parent = build_model(arch((6, 8), head=(HeadLayer(16),)))
    state = trained_like(parent, 2)
    same = build_model(arch((6, 8), head=(HeadLayer(16),)))
    assert inherit(same, state) == 1.0
    for name, t in same.state_dict().items():
        torch.testing.assert_close(t, state[name], msg=name)
    # A narrower stage 0 and a randomly sparse head: the head keeps its own mask (its nonzero
    # count is what the budget screen counted), stage 0 its parent's first 4 channels.
    child = build_model(arch((4, 8), head=(HeadLayer(16, density=0.25),)))
    assert inherit(child, state) == 1.0  # every value of a narrower child is its parent's
    sd = child.state_dict()
    name = "stages.0.blocks.0.conv.weight"
    torch.testing.assert_close(sd[name], state[name][:4])
    torch.testing.assert_close(sd["stages.1.blocks.0.conv.weight"],
                               state["stages.1.blocks.0.conv.weight"][:, :4])
    mask = sd["head.0.linear.mask"]
    assert 0 < int(mask.sum()) < mask.numel()
    weight = sd["head.0.linear.weight"]
    assert int((weight * (1 - mask)).count_nonzero()) == 0
    torch.testing.assert_close(weight, state["head.0.linear.weight"] * mask)


def test_a_widened_child_reports_the_params_it_delivers_once_trained() -> None:
    """Its zero-started weights (new inputs into inherited outputs, a larger kernel's rim) are
    not structural zeros: after an epoch the trial reports the count the budget screen made."""
    from trainables.accounting import count, count_built
    from trainables.data import DataConfig, load_dataset
    from trainables.train import TrainConfig, fit

    digits = load_dataset(DataConfig(name="digits", subset=200))
    big = arch((9, 11), kernel=5)
    shape = dataclasses.replace(big, input_size=(8, 8), num_classes=10)
    small = dataclasses.replace(arch((6, 8)), input_size=(8, 8), num_classes=10)
    torch.manual_seed(0)
    child = build_model(shape)
    # (a freshly built parent: trained_like's random BatchNorm shifts leave some units dead,
    # whose weights no epoch moves off zero)
    inherit(child, build_model(small).state_dict())
    assert count_built(child, (1, 8, 8)).nonzero_params < count(shape).nonzero_params
    result = fit(child, digits, TrainConfig(epochs=1, batch_size=64, threads=1))
    assert result.metrics["nonzero_params"] == count(shape).nonzero_params
