"""Transfer backbones (study 002): a torchvision resnet18 / densenet121 trunk replaces stem and
stages; then dropout, pooling, the head and the classifier, as for every other family.

The trunk is torchvision's network without its ImageNet classifier, with torchvision's module
names, so a torchvision ``state_dict`` loads into it as is (its ``fc.*`` / ``classifier.*`` keys
dropped). Weights come from ``backbone.weights`` (a local file), else from torchvision's cache
(``torch.hub.get_dir()/checkpoints``, the IMAGENET1K_V1 file names) when present, else the trunk
stays randomly initialised and one :class:`RandomInitWarning` says so. Nothing is downloaded.

Freezing: ``backbone.trainable`` is ``none`` (whole trunk frozen), one stage (resnet18
``layer1``..``layer4``, densenet121 ``denseblock1``..``denseblock4``: that stage's parameters
train, the rest stay frozen) or ``all``. The head and classifier always train.

Frozen BatchNorm stays in eval mode: :meth:`TransferNet.train` puts every BatchNorm whose
affine parameters are all frozen back into eval mode, so ``model.train()`` does not update its
running mean/var. Otherwise those statistics would drift towards the new dataset (and, with
small batches, towards noise) although the weights around them never change, and the frozen
features the head learned on would shift between training and evaluation.

Built inside ``with torch.device("meta"):`` (the budget screen), nothing is loaded and no file
is touched: only shapes and the ``requires_grad`` flags matter there.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from trainables.arch import ArchConfig, ArchError, BackboneConfig
from trainables.models.network import FeatureMap, build_head, build_pool

# Channels of each trunk's last feature map.
FEATURE_CHANNELS: dict[str, int] = {"resnet18": 512, "densenet121": 1024}

# torchvision's ImageNet classifier: not part of the trunk, dropped from a full state_dict.
_HEAD_PREFIX: dict[str, str] = {"resnet18": "fc.", "densenet121": "classifier."}

# Where a named stage lives inside the trunk (densenet's blocks sit in its `features`).
_STAGE_PATH: dict[str, str] = {"resnet18": "{}", "densenet121": "features.{}"}

# torchvision's densenet checkpoints predate '.'-free module names: they store
# 'denselayer1.norm.1.weight' for today's 'denselayer1.norm1.weight' (torchvision remaps the same way).
_LEGACY_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class RandomInitWarning(UserWarning):
    """A backbone had no weights to load and was left randomly initialised."""


class TransferNet(nn.Module):
    """trunk -> dropout -> pool + flatten -> head -> classifier.

    ``x`` (N, 3, H, W) -> ``backbone`` (N, C, h, w) -> ``pool`` (N, C), or (N, C*h*w) for
    ``flatten`` -> ``head`` -> ``classifier`` (N, num_classes). Dropout (``arch.dropout``) follows
    the trunk as it follows every stage in the other families.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dropout: float,
        pool: nn.Sequential,
        head: nn.Sequential,
        classifier: nn.Linear,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.pool = pool
        self.head = head
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.pool(self.dropout(self.backbone(x)))))

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if mode:
            # Decided per call, not at build time, so it follows later requires_grad changes.
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)
                ):
                    m.eval()
        return self


def feature_shape(name: str, input_size: tuple[int, int]) -> FeatureMap:
    """(C, h, w) of the trunk's output for an (H, W) input, without building anything.

    resnet18 halves the size five times rounding up (7x7/2 conv, 3x3/2 max pool, three stride-2
    stages); densenet121 twice rounding up (conv, max pool), then three 2x2 average-pool
    transitions rounding down, so it needs at least 29x29.
    """
    if name not in FEATURE_CHANNELS:
        raise ArchError(f"backbone.name={name!r} is invalid: expected one of "
                        + ", ".join(FEATURE_CHANNELS))
    ups, downs = (5, 0) if name == "resnet18" else (2, 3)
    h, w = input_size
    for _ in range(ups):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    for _ in range(downs):
        h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise ArchError(
            f"input_size={list(input_size)} is too small for {name}: its trunk shrinks it to "
            f"{h}x{w}; use a larger image_size"
        )
    return FeatureMap(FEATURE_CHANNELS[name], h, w)


def build_trunk(cfg: BackboneConfig) -> nn.Module:
    """torchvision's network minus its classifier, state_dict keys unchanged; randomly initialised."""
    # Imported here: torchvision costs ~1 s to import and only transfer trials need it.
    from torchvision import models

    if cfg.name == "resnet18":
        net = models.resnet18(weights=None)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    net = models.densenet121(weights=None)
    # torchvision applies this ReLU in forward(), after `features` ends with norm5.
    return nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU(inplace=True)))


def stage_module(trunk: nn.Module, name: str, stage: str) -> nn.Module:
    """The trunk's submodule for a named stage ("layer3", "denseblock2", ...)."""
    return trunk.get_submodule(_STAGE_PATH[name].format(stage))


def freeze(trunk: nn.Module, cfg: BackboneConfig) -> None:
    """Set requires_grad: nothing (none), one named stage, or everything (all) trains."""
    trunk.requires_grad_(cfg.trainable == "all")
    if cfg.trainable not in ("none", "all"):
        stage_module(trunk, cfg.name, cfg.trainable).requires_grad_(True)


def imagenet_cache_file(name: str) -> Path:
    """Where torchvision keeps its IMAGENET1K_V1 weights for ``name`` (may not exist)."""
    from torchvision.models import DenseNet121_Weights, ResNet18_Weights

    url = {"resnet18": ResNet18_Weights, "densenet121": DenseNet121_Weights}[name].IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_weights(trunk: nn.Module, cfg: BackboneConfig) -> Path | None:
    """Load ``cfg.weights`` or the cached ImageNet file into ``trunk``; the path loaded, or None.

    Never downloads. With no file, warns once (:class:`RandomInitWarning`) and leaves the trunk
    randomly initialised.
    """
    if cfg.weights is not None:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise ArchError(f"backbone.weights={cfg.weights!r} is invalid: no such file")
    else:
        path = imagenet_cache_file(cfg.name)
        if not path.is_file():
            warnings.warn(
                f"{cfg.name}: backbone.weights is null and {path} does not exist, so the backbone "
                "is randomly initialised (nothing is downloaded: set backbone.weights to a "
                "state_dict file or place torchvision's ImageNet weights there)",
                RandomInitWarning,
                stacklevel=2,
            )
            return None
    where = f"backbone.weights={str(path)!r}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not a state_dict
        raise ArchError(f"{where} cannot be loaded as a state_dict: {e}") from e
    if not isinstance(state, Mapping):
        raise ArchError(f"{where} holds a {type(state).__name__}, expected a state_dict (name -> tensor)")
    state = {
        _LEGACY_DENSE_KEY.sub(r"\1\2", k): v
        for k, v in state.items()
        if not k.startswith(_HEAD_PREFIX[cfg.name])
    }
    try:
        result = trunk.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise ArchError(f"{where} does not fit {cfg.name}: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ArchError(
            f"{where} is not a {cfg.name} state_dict: {len(result.missing_keys)} keys missing "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    return path


def build_transfer_model(arch: ArchConfig) -> TransferNet:
    """The network for an ``arch`` with a ``backbone`` (see the module docstring)."""
    cfg = arch.backbone
    if cfg is None:
        raise ArchError("backbone=None is invalid here: build_transfer_model needs a backbone")
    fm = feature_shape(cfg.name, arch.input_size)
    trunk = build_trunk(cfg)
    if not next(trunk.parameters()).is_meta:
        load_weights(trunk, cfg)
    freeze(trunk, cfg)
    pool, in_features = build_pool(arch.pooling, fm)
    head, classifier = build_head(arch, in_features)
    return TransferNet(trunk, dropout=arch.dropout, pool=pool, head=head, classifier=classifier)
