"""Transfer backbones: real torchvision trunks at tiny inputs, real files, nothing downloaded."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tv

from trainables.arch import BACKBONE_STAGES, ArchConfig, ArchError, BackboneConfig, HeadLayer
from trainables.models import build_model
from trainables.models.transfer import (
    RandomInitWarning,
    TransferNet,
    build_transfer_model,
    build_trunk,
    feature_shape,
    imagenet_cache_file,
    stage_module,
)

pytestmark = pytest.mark.slow  # many seconds of real work without Ray


@pytest.fixture(autouse=True)
def _empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may read a real torchvision cache; each starts with an empty one.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _arch(
    name: str = "resnet18",
    *,
    trainable: str = "none",
    weights: str | None = None,
    size: int | tuple[int, int] = 32,
    pooling: str = "gap",
    head: tuple[HeadLayer, ...] = (),
) -> ArchConfig:
    return ArchConfig(
        stem=None,
        stages=(),
        backbone=BackboneConfig(name=name, trainable=trainable, weights=weights),
        input_size=(size, size) if isinstance(size, int) else size,
        num_classes=6,
        pooling=pooling,
        head=head,
    )


def _build(arch: ArchConfig) -> TransferNet:
    """Build where random init is expected (the warning itself is tested below)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        return build_transfer_model(arch)


def _build_silently(arch: ArchConfig) -> TransferNet:
    """Build where weights must be found: a RandomInitWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomInitWarning)
        return build_transfer_model(arch)


@pytest.mark.parametrize(
    ("name", "size", "pooling", "head", "in_features"),
    [
        ("resnet18", 32, "gap", (), 512),
        ("resnet18", 150, "flatten", (HeadLayer(16),), 512 * 5 * 5),  # 150 -> 5x5 (Intel scenes)
        ("densenet121", 32, "gmp", (HeadLayer(8, density=0.5),), 1024),
    ],
)
def test_forward_shape_and_head_input(
    name: str, size: int, pooling: str, head: tuple[HeadLayer, ...], in_features: int
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        model = build_model(_arch(name, size=size, pooling=pooling, head=head))
    assert isinstance(model, TransferNet)
    assert isinstance(model.classifier, nn.Linear)
    assert isinstance(model.head, nn.Sequential)
    first_linear = next(m for m in [*model.head.modules(), model.classifier] if isinstance(m, nn.Linear))
    assert first_linear.in_features == in_features

    out = model.eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, 6)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_feature_shape_matches_the_real_trunk(name: str) -> None:
    with torch.device("meta"):
        trunk = build_trunk(BackboneConfig(name=name)).eval()  # eval: BN accepts 1x1 maps
        for size in [(29, 29), (32, 32), (33, 47), (150, 150)]:
            out = trunk(torch.empty(1, 3, *size))
            fm = feature_shape(name, size)
            assert tuple(out.shape[1:]) == (fm.channels, fm.height, fm.width), size


def test_too_small_input_is_refused_before_building() -> None:
    with pytest.raises(ArchError, match=r"input_size=\[28, 28\] is invalid: expected at least 29x29 for densenet121"):
        build_transfer_model(_arch("densenet121", size=28))


@pytest.mark.parametrize(
    ("name", "trainable"),
    [(n, t) for n, stages in BACKBONE_STAGES.items() for t in stages],
)
def test_only_the_named_stage_and_the_head_train(name: str, trainable: str) -> None:
    with torch.device("meta"):
        model = build_transfer_model(_arch(name, trainable=trainable, head=(HeadLayer(8),)))
    trunk = model.backbone
    stages = [s for s in BACKBONE_STAGES[name] if s not in ("none", "all")]
    in_stages = 0
    for stage in stages:
        params = list(stage_module(trunk, name, stage).parameters())
        in_stages += sum(p.numel() for p in params)
        trained = sum(p.numel() for p in params if p.requires_grad)
        expected = sum(p.numel() for p in params) if trainable in (stage, "all") else 0
        assert trained == expected, stage
    outside = sum(p.numel() for p in trunk.parameters()) - in_stages
    trained_outside = sum(p.numel() for p in trunk.parameters() if p.requires_grad) - sum(
        p.numel() for s in stages for p in stage_module(trunk, name, s).parameters() if p.requires_grad
    )
    assert outside > 0  # the stem (and densenet's transitions / norm5) exist outside the stages
    assert trained_outside == (outside if trainable == "all" else 0)
    assert all(p.requires_grad for p in [*model.head.parameters(), *model.classifier.parameters()])


def test_resnet18_layer3_trains_its_hand_counted_parameters() -> None:
    with torch.device("meta"):
        model = build_transfer_model(_arch(trainable="layer3"))
    # Two basic blocks, 128 -> 256 channels: 3x3 convs 294,912 + 3 x 589,824, the 1x1 shortcut
    # 32,768, five BatchNorms 5 x 512 = 2,099,712.
    assert sum(p.numel() for p in model.backbone.parameters() if p.requires_grad) == 2_099_712


@pytest.mark.parametrize(("name", "stage"), [("resnet18", "layer3"), ("densenet121", "denseblock4")])
def test_frozen_batchnorm_keeps_its_running_stats_in_train_mode(name: str, stage: str) -> None:
    model = _build(_arch(name, trainable=stage))
    trained_bns = {id(m) for m in stage_module(model.backbone, name, stage).modules()}
    bns = {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}

    model.eval()
    model.train()  # after an eval round trip, as the training loop does every epoch
    assert model.training and model.classifier.training
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()

    for n, m in bns.items():
        trained = id(m) in trained_bns
        assert m.training == trained, n
        unchanged = torch.equal(m.running_mean, before[n][0]) and torch.equal(m.running_var, before[n][1])
        assert unchanged != trained, n
    for n, p in model.backbone.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_all_trains_every_batchnorm() -> None:
    model = _build(_arch(trainable="all")).train()
    assert all(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def _assert_trunk_equals(model: TransferNet, reference: dict[str, torch.Tensor]) -> None:
    loaded = model.backbone.state_dict()
    assert loaded.keys() <= reference.keys()
    for k, v in loaded.items():
        assert torch.equal(v, reference[k]), k


def test_loads_a_full_torchvision_state_dict_and_matches_its_forward(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = tv.resnet18(weights=None, num_classes=1000).eval()
    # Distinct running stats, so a trunk left at its init could not match by accident.
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)

    model = _build_silently(_arch(weights=str(path))).eval()
    _assert_trunk_equals(model, ref.state_dict())
    ref.fc = nn.Identity()  # torchvision's pooled 512 features: what the head sees
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.pool(model.backbone(x)).flatten(1), ref(x))


def test_loads_densenet_checkpoints_with_legacy_key_names(tmp_path: Path) -> None:
    # torchvision's own densenet files say 'denselayer1.norm.1.weight' and lack num_batches_tracked.
    ref = tv.densenet121(weights=None).state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in ref.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "d121.pth"
    torch.save(legacy, path)

    model = _build_silently(_arch("densenet121", weights=str(path)))
    _assert_trunk_equals(model, ref)


def test_uses_torchvisions_cache_when_weights_is_null(tmp_path: Path) -> None:
    cached = imagenet_cache_file("resnet18")
    assert cached == tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    ref = tv.resnet18(weights=None).state_dict()
    cached.parent.mkdir(parents=True)
    torch.save(ref, cached)

    _assert_trunk_equals(_build_silently(_arch()), ref)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_random_init_warns_once_when_no_weights_exist(name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_transfer_model(_arch(name))
    ours = [w for w in caught if issubclass(w.category, RandomInitWarning)]
    assert len(ours) == 1
    assert str(imagenet_cache_file(name)) in str(ours[0].message)
    assert "randomly initialised" in str(ours[0].message)


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "r18.pth"
    with pytest.raises(ArchError, match=re.escape(f"backbone.weights={str(missing)!r}")):
        build_transfer_model(_arch(weights=str(missing)))


def test_unusable_weights_files_are_refused_with_their_path(tmp_path: Path) -> None:
    other_net = tmp_path / "r18.pth"
    torch.save(tv.resnet18(weights=None).state_dict(), other_net)
    with pytest.raises(ArchError, match=r"r18\.pth.* is not a densenet121 state_dict"):
        build_transfer_model(_arch("densenet121", weights=str(other_net)))

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ArchError, match=r"list\.pth.* holds a list, expected a state_dict"):
        build_transfer_model(_arch(weights=str(not_a_dict)))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ArchError, match=r"garbage\.pth.* cannot be loaded as a state_dict"):
        build_transfer_model(_arch(weights=str(garbage)))


def test_meta_build_loads_nothing_and_warns_nothing(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            # The budget screen may run where the weights file is not (yet): no file is opened.
            absent = build_transfer_model(_arch(weights=str(tmp_path / "absent.pth")))
            uncached = build_transfer_model(_arch("densenet121"))
    for model in (absent, uncached):
        assert all(p.is_meta for p in model.parameters())


def test_a_trained_frozen_trunk_reports_every_weight_it_ships() -> None:
    """deploy_params (what ships) = the trained nonzeros + the frozen trunk; nonzero_params
    (what trains) is the head alone: a real epoch of a frozen resnet18 on 24 random images."""
    from trainables.data import Splits
    from trainables.train import TrainConfig, fit

    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
                torch.randint(0, 6, (n,), generator=gen))

    (xt, yt), (xv, yv), (xs, ys) = images(24), images(8), images(8)
    splits = Splits("random", xt, yt, xv, yv, xs, ys, 6, tuple("abcdef"), (0.5,) * 3, (0.25,) * 3)
    trunk = sum(p.numel() for p in tv.resnet18().parameters()) - (512 * 1000 + 1000)
    result = fit(_build(_arch()), splits, TrainConfig(epochs=1, batch_size=8, threads=1))
    report = result.metrics
    assert report["nonzero_params"] == 512 * 6 + 6  # the head trains, nothing else
    assert report["deploy_params"] == trunk + 512 * 6 + 6 > 11_000_000
