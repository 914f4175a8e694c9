"""Lottery-ticket iterative magnitude pruning (IMP) with rewinding.

One IMP round, as the training loop in ``trainables.train`` drives it (Frankle & Carbin 2019;
Frankle et al. 2020 rewind to an early iteration k instead of to initialisation)::

    snap = snapshot(model)            # at iteration k (k=0: the lottery ticket's init)
    ... train to the end ...
    prune_step(model, rate=0.2)       # drop 20% of the surviving weights by |w|
    rewind(model, snap)               # survivors back to their iteration-k values
    ... retrain with a FRESH optimizer (momentum/Adam moments are not rewound) ...

Masks use ``torch.nn.utils.prune``'s reparametrisation: a pruned module holds the parameter
``weight_orig`` and the buffer ``weight_mask``, and a forward pre-hook sets the plain attribute
``weight = weight_orig * weight_mask``. The optimizer keeps updating ``weight_orig`` (the same
Parameter object the optimizer was given before pruning), but the effective weight is a product
with a 0/1 mask, so no optimizer step (momentum, weight decay, Adam moments) can resurrect a
pruned weight.

Saving and loading: ``state_dict()`` of a pruned model holds ``<layer>.weight_orig`` and
``<layer>.weight_mask``, which a fresh model cannot load (it has ``<layer>.weight``). Either
call :func:`apply_masks` on the fresh model first (re-creates the reparametrisation from the
``*_mask`` keys, then ``load_state_dict`` works and training can go on), or call
:func:`finalize` before saving (plain ``weight`` tensors with the zeros baked in, for export).

Do not ``copy.deepcopy`` a pruned model after a forward pass with autograd on: its ``weight``
attribute is then a non-leaf tensor, which torch refuses to deepcopy. Keep copies of weights
with :func:`snapshot` or ``state_dict()`` instead.

Weights that are zero because of a fixed random mask (``trainables.layers.SparseLinear`` keeps
a 0/1 buffer ``mask`` of the weight's shape and multiplies by it) count as already removed:
the first :func:`prune_step` registers that mask as the layer's initial pruning mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

SCOPES = ("global", "layer")
# Layers whose weights IMP prunes. Biases and BatchNorm parameters stay dense, as in Frankle &
# Carbin: they are a small share of the parameters, and BN scales are not magnitude-comparable.
_PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def output_layer(model: nn.Module) -> nn.Module | None:
    """The output (classifier) layer: ``model.classifier`` when present, else the last Linear.

    When ``classifier`` is a container (torchvision's VGG-style heads), its last Linear.
    None when the model has no Linear layer at all (a fully convolutional net).
    """
    head = getattr(model, "classifier", None)
    if isinstance(head, _PRUNABLE_TYPES):
        return head
    for scope in (head, model):
        if isinstance(scope, nn.Module):
            linears = [m for m in scope.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Conv and Linear weights IMP may prune, as ``(module, "weight")``; the output layer last.

    Frozen weights (``requires_grad=False``, e.g. a transfer backbone's frozen stages) are left
    out: they are not trainable parameters, and pruning them could not be recovered by retraining.
    """
    out = output_layer(model)
    body: list[tuple[nn.Module, str]] = []
    tail: list[tuple[nn.Module, str]] = []
    for m in model.modules():
        if isinstance(m, _PRUNABLE_TYPES) and _trainable_weight(m).requires_grad:
            (tail if m is out else body).append((m, "weight"))
    return body + tail


def prune_step(
    model: nn.Module,
    *,
    rate: float,
    scope: str = "global",
    output_rate_factor: float = 0.5,
) -> None:
    """Remove ``rate`` of the surviving (unmasked) prunable weights with the smallest |w|.

    Pruning groups: with ``scope="global"`` all layers but the output layer compete in one
    ranking (``prune.global_unstructured``); with ``scope="layer"`` each layer is ranked on its
    own (``prune.l1_unstructured``). The output layer is always its own group, pruned at
    ``rate * output_rate_factor`` (Frankle & Carbin prune it at half the rate; 0 keeps it dense).

    In every group exactly ``round(survivors * (1 - group_rate))`` weights survive: the amount is
    passed to torch as an integer count, and ``torch.topk`` picks exactly that many even among
    equal magnitudes, so ties cannot make the counts drift over rounds.
    """
    if not (isinstance(rate, (int, float)) and 0.0 < rate < 1.0):
        raise ValueError(f"{rate=} must be in (0, 1)")
    if scope not in SCOPES:
        raise ValueError(f"{scope=} must be one of {', '.join(SCOPES)}")
    if not (isinstance(output_rate_factor, (int, float)) and 0.0 <= output_rate_factor * rate < 1.0):
        raise ValueError(f"{output_rate_factor=} must be >= 0 with rate * output_rate_factor < 1 ({rate=})")
    params = prunable(model)
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable Conv/Linear weight to prune")
    for m, name in params:
        _adopt_fixed_mask(m, name)
    out = output_layer(model)
    body = [(m, n) for m, n in params if m is not out]
    tail = [(m, n) for m, n in params if m is out]
    if scope == "global" and body:
        _prune_global(body, rate)
    else:
        for m, n in body:
            _prune_layer(m, n, rate)
    if output_rate_factor > 0:
        for m, n in tail:
            _prune_layer(m, n, rate * output_rate_factor)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of every parameter and persistent buffer, keyed like a plain state_dict.

    A pruned weight is stored under its plain name (``conv.weight``, not ``conv.weight_orig``)
    with its effective value (``weight_orig * weight_mask``); pruning masks are not part of it.
    So a snapshot taken before pruning (the usual rewind point) rewinds the model pruned later.
    """
    return {key: value.detach().clone() for key, value, _ in _rewindable(model)}


def rewind(model: nn.Module, snap: Mapping[str, Tensor]) -> None:
    """Copy a :func:`snapshot` back into the model in place, keeping the pruning masks.

    A pruned weight's ``weight_orig`` gets the snapshot value; its masked entries stay 0 in the
    effective weight. Other parameters and buffers (biases, BatchNorm affine and running stats)
    are restored too. Copies are in place, so an optimizer built on the model stays attached;
    its state (momentum, Adam moments) is NOT rewound: build a fresh optimizer per round.
    """
    entries = list(_rewindable(model))
    names = {key for key, _, _ in entries}
    missing = sorted(names - set(snap))
    extra = sorted(set(snap) - names)
    if missing or extra:
        raise ValueError(
            f"snapshot does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for key, _, target in entries:
            if snap[key].shape != target.shape:
                raise ValueError(
                    f"snapshot[{key!r}] has shape {tuple(snap[key].shape)}, "
                    f"the model's is {tuple(target.shape)}"
                )
            target.copy_(snap[key])
        for m, name in pruned_tensors(model):
            # The forward pre-hook would refresh this on the next forward; refresh now so code
            # reading ``module.weight`` before that (a prune_step, a check) sees rewound values.
            setattr(m, name, getattr(m, name + "_orig") * getattr(m, name + "_mask"))


def nonzero_fraction(model: nn.Module) -> float:
    """Fraction of the prunable weights (see :func:`prunable`) that are nonzero in effect."""
    params = prunable(model)
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable Conv/Linear weight")
    total = sum(_trainable_weight(m).numel() for m, _ in params)
    nonzero = sum(int(torch.count_nonzero(_effective(m, n))) for m, n in params)
    return nonzero / total


@contextmanager
def copyable(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with each pruned tensor's computed attribute (``weight = weight_orig * mask``, a
    non-leaf that ``copy.deepcopy`` refuses) detached for the block, then put back. A copy made
    inside recomputes it in its own pruning pre-hook at its first forward."""
    computed = [(m, n, getattr(m, n)) for m, n in pruned_tensors(model)]
    for m, n, t in computed:
        setattr(m, n, t.detach())
    try:
        yield model
    finally:
        for m, n, t in computed:
            setattr(m, n, t)


def finalize(model: nn.Module) -> None:
    """Make pruning permanent: ``weight = weight_orig * weight_mask`` as a plain Parameter.

    Afterwards ``state_dict()`` has plain ``weight`` keys (no ``*_orig``/``*_mask``) holding the
    zeros, so any freshly built model loads it and exports it. Training after this no longer
    keeps the zeros.
    """
    for m, name in pruned_tensors(model):
        prune.remove(m, name)


def apply_masks(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Re-create the pruning reparametrisation described by a pruned model's ``state_dict``.

    For every ``<layer>.<name>_mask`` key (with its ``<layer>.<name>_orig`` beside it) the
    layer is reparametrised with that mask, so ``model.load_state_dict(state_dict)`` works
    afterwards and later :func:`prune_step` calls continue from these masks.
    """
    modules = dict(model.named_modules())
    for key, mask in state_dict.items():
        if not key.endswith("_mask") or key[: -len("_mask")] + "_orig" not in state_dict:
            continue
        path, _, attr = key.rpartition(".")
        name = attr[: -len("_mask")]
        m = modules.get(path)
        if m is None or not isinstance(getattr(m, name + "_orig", getattr(m, name, None)), Tensor):
            raise ValueError(f"state_dict key {key!r} names no parameter {name!r} in the model")
        if prune.is_pruned(m) and hasattr(m, name + "_mask"):
            continue  # already reparametrised: load_state_dict overwrites the mask buffer
        if getattr(m, name).shape != mask.shape:
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(mask.shape)}, "
                f"the model's {path}.{name} is {tuple(getattr(m, name).shape)}"
            )
        prune.custom_from_mask(m, name, mask.to(getattr(m, name).device))


# ---------------------------------------------------------------------- internals
def _trainable_weight(m: nn.Module, name: str = "weight") -> Tensor:
    """The Parameter the optimizer updates: ``weight_orig`` once pruned, else ``weight``."""
    return getattr(m, name + "_orig") if hasattr(m, name + "_orig") else getattr(m, name)


def _fixed_mask(m: nn.Module, name: str) -> Tensor | None:
    """A SparseLinear-style fixed 0/1 ``mask`` buffer of the weight's shape, if any."""
    mask = m._buffers.get("mask") if name == "weight" else None
    return mask if mask is not None and mask.shape == _trainable_weight(m, name).shape else None


def _mask(m: nn.Module, name: str) -> Tensor | None:
    """The current 0/1 keep-mask: the pruning mask, else the fixed mask, else None (dense)."""
    return getattr(m, name + "_mask") if hasattr(m, name + "_mask") else _fixed_mask(m, name)


def _effective(m: nn.Module, name: str) -> Tensor:
    """The weight the forward pass uses, recomputed (``module.weight`` can be one step stale)."""
    w = _trainable_weight(m, name).detach()
    mask = _mask(m, name)
    return w if mask is None else w * mask


def _survivors(m: nn.Module, name: str) -> int:
    mask = _mask(m, name)
    return _trainable_weight(m, name).numel() if mask is None else int(torch.count_nonzero(mask))


def _to_remove(survivors: int, rate: float) -> int:
    # Spec of a round: round(survivors * (1 - rate)) survive; the rest of the survivors go.
    return survivors - round(survivors * (1.0 - rate))


def _adopt_fixed_mask(m: nn.Module, name: str) -> None:
    """Register a fixed random mask as the initial pruning mask, so its zeros count as removed."""
    fixed = _fixed_mask(m, name)
    if fixed is not None and not hasattr(m, name + "_mask"):
        prune.custom_from_mask(m, name, fixed.detach().clone())


def _prune_global(params: list[tuple[nn.Module, str]], rate: float) -> None:
    survivors = sum(_survivors(m, n) for m, n in params)
    prune.global_unstructured(
        params,
        pruning_method=prune.L1Unstructured,
        # Fresh effective weights: the ``weight`` attribute torch would read is only refreshed by
        # the forward pre-hook, so it lags the last optimizer step.
        importance_scores={(m, n): _effective(m, n) for m, n in params},
        amount=_to_remove(survivors, rate),
    )


def _prune_layer(m: nn.Module, name: str, rate: float) -> None:
    prune.l1_unstructured(
        m, name, amount=_to_remove(_survivors(m, name), rate), importance_scores=_effective(m, name)
    )


def pruned_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(module, tensor_name)`` currently under a pruning reparametrisation."""
    return [
        (m, hook._tensor_name)
        for m in model.modules()
        for hook in list(m._forward_pre_hooks.values())
        if isinstance(hook, prune.BasePruningMethod)
    ]


def _rewindable(model: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
    """``(plain key, effective value, tensor to write on rewind)`` for params and buffers."""
    pruned = {(id(m), n) for m, n in pruned_tensors(model)}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        for pname, p in m._parameters.items():
            if p is None:
                continue
            base = pname[: -len("_orig")]
            if pname.endswith("_orig") and (id(m), base) in pruned:
                yield prefix + base, p * getattr(m, base + "_mask"), p
            else:
                yield prefix + pname, p, p
        for bname, b in m._buffers.items():
            if b is None or bname in m._non_persistent_buffers_set:
                continue
            if bname.endswith("_mask") and (id(m), bname[: -len("_mask")]) in pruned:
                continue
            yield prefix + bname, b, b
