"""Flat ``prefix/field`` dicts of scalar config dataclasses (Ray Tune configs, MLflow params)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def to_flat(config: Any, prefix: str) -> dict[str, Any]:
    """``{"prefix/field": value}`` for every field of a dataclass whose fields are scalars."""
    return {f"{prefix}/{f.name}": getattr(config, f.name) for f in fields(config)}


def from_flat(cls: type[T], flat: Mapping[str, Any], prefix: str, error: type[Exception]) -> T:
    """Inverse of :func:`to_flat`: keys under other prefixes are ignored, unknown fields under
    ``prefix/`` raise ``error`` naming the key and the known fields."""
    pre = prefix + "/"
    sub = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(sub) - names)
    if unknown:
        raise error(f"{pre}{unknown[0]} is not a known field: expected one of "
                    + ", ".join(sorted(names)))
    return cls(**sub)
