from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from trainables.accounting import count_module
from trainables.arch import ArchConfig, HeadLayer, StageConfig, StemConfig
from trainables.layers import SparseLinear
from trainables.models import build_model
from trainables.pruning import (
    apply_masks,
    finalize,
    nonzero_fraction,
    output_layer,
    prunable,
    prune_step,
    rewind,
    snapshot,
)

pytestmark = pytest.mark.slow  # many seconds of real work without Ray


class TinyNet(nn.Module):
    """conv(1->6, 3x3) + BN -> conv(6->8, 3x3) -> flatten -> hidden Linear -> ``classifier``."""

    def __init__(self, *, hidden: nn.Module | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Flatten(), hidden or nn.Linear(8 * 4 * 4, 24), nn.ReLU())
        self.classifier = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 8, 8)
        return self.classifier(self.head(self.features(x)))


def tiny(seed: int = 0, **kw: nn.Module) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw)


def kept(m: nn.Module) -> int:
    """Surviving weights of one layer: nonzero entries of the effective weight."""
    w = m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
    return int(torch.count_nonzero(w.detach()))


def batch(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    model.train()
    x, y = batch()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------------- prunable
def test_prunable_lists_conv_and_linear_weights_with_the_output_layer_last() -> None:
    net = tiny()
    params = prunable(net)
    assert [m for m, _ in params] == [net.features[0], net.features[3], net.head[1], net.classifier]
    assert {n for _, n in params} == {"weight"}
    assert output_layer(net) is net.classifier


def test_output_layer_falls_back_to_the_last_linear_and_frozen_layers_are_skipped() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert output_layer(net) is net[2]
    net[0].weight.requires_grad_(False)
    assert [m for m, _ in prunable(net)] == [net[2]]
    assert output_layer(nn.Sequential(nn.Conv2d(1, 2, 3))) is None


# ---------------------------------------------------------------------- exact counts
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_three_rounds_remove_exact_counts_per_group(scope: str) -> None:
    net = tiny()
    body = [m for m, _ in prunable(net)][:-1]
    total_body = sum(m.weight.numel() for m in body)
    expect_layers = {id(m): m.weight.numel() for m in body}
    expect_body, expect_out = total_body, net.classifier.weight.numel()
    for target in (0.8, 0.64, 0.512):
        prune_step(net, rate=0.2, scope=scope)
        if scope == "global":  # one group: round(survivors * 0.8) over all non-output layers
            expect_body = round(expect_body * 0.8)
        else:  # one group per layer
            for m in body:
                expect_layers[id(m)] = round(expect_layers[id(m)] * 0.8)
                assert kept(m) == expect_layers[id(m)]
            expect_body = sum(expect_layers.values())
        expect_out = round(expect_out * 0.9)  # output layer at half the rate
        assert sum(kept(m) for m in body) == expect_body
        assert kept(net.classifier) == expect_out
        assert abs(expect_body / total_body - target) < 1e-3
    assert nonzero_fraction(net) == pytest.approx(
        (expect_body + expect_out) / (total_body + net.classifier.weight.numel())
    )


def test_global_scope_ranks_across_layers() -> None:
    net = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False), nn.Linear(10, 2))
    with torch.no_grad():
        net[0].weight.fill_(0.01)  # all of the 20 smallest magnitudes live in layer 0
        net[1].weight.fill_(1.0)
    prune_step(net, rate=0.1, scope="global", output_rate_factor=0.0)
    assert (kept(net[0]), kept(net[1]), kept(net[2])) == (80, 100, 20)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_equal_magnitudes_do_not_make_counts_drift(scope: str) -> None:
    net = tiny()
    with torch.no_grad():
        for m, _ in prunable(net):
            m.weight.copy_(torch.where(torch.rand_like(m.weight) < 0.5, -0.25, 0.25))
    sizes = {id(m): m.weight.numel() for m, _ in prunable(net)}
    for _ in range(4):
        prune_step(net, rate=0.3, scope=scope, output_rate_factor=1.0)
        if scope == "layer":
            for m, _ in prunable(net):
                sizes[id(m)] = round(sizes[id(m)] * 0.7)
                assert kept(m) == sizes[id(m)]
    if scope == "global":
        total = sum(m.weight_orig.numel() for m, _ in prunable(net)[:-1])
        for _ in range(4):
            total = round(total * 0.7)
        assert sum(kept(m) for m, _ in prunable(net)[:-1]) == total


def test_bad_options_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"rate=1\.0"):
        prune_step(tiny(), rate=1.0)
    with pytest.raises(ValueError, match="scope='net'"):
        prune_step(tiny(), rate=0.2, scope="net")
    with pytest.raises(ValueError, match="output_rate_factor=-1"):
        prune_step(tiny(), rate=0.2, output_rate_factor=-1)
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable Conv/Linear"):
        prune_step(frozen, rate=0.2)


# ---------------------------------------------------------------------- optimizers
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_optimizer_steps_do_not_resurrect_pruned_weights(make_opt) -> None:
    net = tiny()
    # Built before pruning and stepped once, so momentum/moments are nonzero at positions that
    # get pruned: the optimizer keeps moving weight_orig there, the mask keeps the weight at 0.
    opt = make_opt(net.parameters())
    train_steps(net, opt, steps=2)
    prune_step(net, rate=0.5, scope="layer")
    masks = {id(m): m.weight_mask.clone() for m, _ in prunable(net)}
    frac = nonzero_fraction(net)
    before = net.head[1].weight_orig.detach().clone()
    train_steps(net, opt, steps=5)
    assert not torch.equal(before[masks[id(net.head[1])] == 0],
                           net.head[1].weight_orig.detach()[masks[id(net.head[1])] == 0])
    net(batch()[0])  # the forward pre-hook refreshes module.weight
    for m, _ in prunable(net):
        assert torch.equal(m.weight_mask, masks[id(m)])
        assert torch.count_nonzero(m.weight[masks[id(m)] == 0]) == 0
    assert nonzero_fraction(net) == frac


# ---------------------------------------------------------------------- rewind
def test_rewind_restores_survivors_bn_and_biases_exactly() -> None:
    net = tiny()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    train_steps(net, opt, steps=2)
    snap = snapshot(net)  # the "early iteration" to rewind to
    assert "features.0.weight" in snap and "features.1.running_mean" in snap
    train_steps(net, opt, steps=5)
    prune_step(net, rate=0.2)
    masks = {id(m): m.weight_mask.clone() for m, _ in prunable(net)}
    rewind(net, snap)
    for name, m in [("features.0", net.features[0]), ("head.1", net.head[1]),
                    ("classifier", net.classifier)]:
        assert torch.equal(m.weight_orig * m.weight_mask, snap[f"{name}.weight"] * masks[id(m)])
        assert torch.equal(m.weight, snap[f"{name}.weight"] * masks[id(m)])
        assert torch.equal(m.bias, snap[f"{name}.bias"])
        assert torch.equal(m.weight_mask, masks[id(m)])
    bn = net.features[1]
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, key), snap[f"features.1.{key}"])
    # A snapshot of the pruned model uses the same plain keys and holds the masked zeros.
    assert set(snapshot(net)) == set(snap)
    assert torch.count_nonzero(snapshot(net)["head.1.weight"]) == kept(net.head[1])


def test_rewind_refuses_a_snapshot_of_another_model() -> None:
    snap = snapshot(tiny())
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="missing"):
        rewind(other, snap)
    del snap["classifier.bias"]
    with pytest.raises(ValueError, match=r"missing \['classifier.bias'\]"):
        rewind(tiny(), snap)
    bad = snapshot(tiny())
    bad["classifier.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        rewind(tiny(), bad)


# ---------------------------------------------------------------------- fixed random masks
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparse_linear_zeros_count_as_removed(scope: str) -> None:
    sparse = SparseLinear(8 * 4 * 4, 24, density=0.25, seed=3)
    net = tiny(hidden=sparse)
    fixed = sparse.mask.clone()
    ones = int(fixed.sum())
    assert ones == round(0.25 * fixed.numel())
    dense_total = sum(m.weight.numel() for m, _ in prunable(net))
    assert nonzero_fraction(net) == pytest.approx((dense_total - fixed.numel() + ones) / dense_total)
    body_alive = sum(m.weight.numel() for m, _ in prunable(net)[:-1]) - fixed.numel() + ones
    for _ in range(3):
        prune_step(net, rate=0.2, scope=scope)
        body_alive = round(body_alive * 0.8)
        if scope == "layer":
            ones = round(ones * 0.8)
            assert kept(sparse) == ones
        assert sum(kept(m) for m, _ in prunable(net)[:-1]) == body_alive
        assert torch.all(sparse.weight_mask <= fixed)  # never revives a fixed zero
    net(batch()[0])
    assert torch.count_nonzero(sparse.weight[fixed == 0]) == 0


# ---------------------------------------------------------------------- save / load
def test_finalize_gives_a_plain_state_dict_with_the_zeros() -> None:
    net = tiny()
    prune_step(net, rate=0.5)
    prune_step(net, rate=0.5)
    x = batch()[0]
    net.eval()
    expected = net(x)
    alive = [kept(m) for m, _ in prunable(net)]
    finalize(net)
    sd = net.state_dict()
    assert not [k for k in sd if k.endswith(("_orig", "_mask"))]
    assert all(isinstance(m.weight, nn.Parameter) for m, _ in prunable(net))
    assert [int(torch.count_nonzero(m.weight)) for m, _ in prunable(net)] == alive
    fresh = tiny(seed=9).eval()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), expected)


def test_apply_masks_reloads_a_pruned_model_that_keeps_its_masks() -> None:
    net = tiny()
    prune_step(net, rate=0.4, scope="layer")
    sd = net.state_dict()
    fresh = tiny(seed=5)
    with pytest.raises(RuntimeError, match="weight_orig"):
        fresh.load_state_dict(sd)  # why apply_masks exists
    apply_masks(fresh, sd)
    fresh.load_state_dict(sd)
    x = batch()[0]
    assert torch.equal(fresh.eval()(x), net.eval()(x))
    assert nonzero_fraction(fresh) == nonzero_fraction(net)
    train_steps(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    assert nonzero_fraction(fresh) == nonzero_fraction(net)
    prune_step(fresh, rate=0.4, scope="layer")  # continues from the loaded masks
    assert kept(fresh.classifier) == round(round(120 * 0.8) * 0.8)
    with pytest.raises(ValueError, match=r"nope\.weight_mask"):
        apply_masks(tiny(), {"nope.weight_orig": torch.ones(1), "nope.weight_mask": torch.ones(1)})


def test_pruning_leaves_optimizer_parameters_attached() -> None:
    net = tiny()
    params = list(net.parameters())
    prune_step(net, rate=0.2)
    # torch renames the Parameter to weight_orig without copying it, so an optimizer built
    # before pruning (and rewind's in-place copies) keep training the live tensors.
    assert {id(p) for p in net.parameters()} == {id(p) for p in params}
    assert all(prune.is_pruned(m) for m, _ in prunable(net))


# ---------------------------------------------------------------------- the project's models
def test_build_model_network_prunes_with_exact_counts_and_accounting_agrees() -> None:
    arch = ArchConfig(
        in_channels=1, input_size=(12, 12), num_classes=4, stem=StemConfig(width=8),
        stages=(StageConfig(block="sparsenet", conv="separable", width=6, layers=3,
                            downsample="maxpool"),
                StageConfig(block="residual", width=12, layers=1)),
        head=(HeadLayer(width=32, density=0.3), HeadLayer(width=16)),
    )
    torch.manual_seed(0)
    model = build_model(arch)
    params = prunable(model)
    assert output_layer(model) is model.classifier and params[-1][0] is model.classifier
    assert any(isinstance(m, SparseLinear) for m, _ in params)
    assert sum(isinstance(m, nn.Conv2d) for m, _ in params) == 10  # stem, 3 x (dw + pw), 3 in res
    before = count_module(model, (1, 12, 12)).nonzero_params
    body_alive = sum(kept(m) for m, _ in params[:-1])  # SparseLinear's fixed zeros not counted
    out_alive = kept(model.classifier)
    for _ in range(2):
        prune_step(model, rate=0.2)
        body_alive, out_alive = round(body_alive * 0.8), round(out_alive * 0.9)
    assert sum(kept(m) for m, _ in params[:-1]) == body_alive
    assert kept(model.classifier) == out_alive
    removed = sum(m.weight_orig.numel() - kept(m) for m, _ in params)
    fixed_zeros = sum(int((m.mask == 0).sum()) for m, _ in params if isinstance(m, SparseLinear))
    assert count_module(model, (1, 12, 12)).nonzero_params == before - (removed - fixed_zeros)
    out = model.eval()(torch.randn(2, 1, 12, 12))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
