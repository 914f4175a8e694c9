"""Searched values (dimensions), a leaf: what a spec field holds when it is searched.

Wherever a spec expects a value, ``{choice: [...]}``, ``{int: [lo, hi], step, log}`` or
``{float: [lo, hi], log}`` searches it instead; these are their frozen types
(:class:`Choice`, :class:`IntRange`, :class:`FloatRange`), plus the one set of number tests
the package uses (:func:`is_int`, :func:`is_number`, :func:`finite`).

This module imports nothing from ``search`` (``search.spec``, ``search.space`` and
``search.space.bands`` build on it). The classes are pickled inside a ``SearchSpec`` in a run
directory's experiment state; ``search.spec`` re-exports them under their old path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from search.pickled import public

__all__ = [
    "SEARCHED",
    "Choice",
    "FloatRange",
    "IntRange",
    "finite",
    "is_int",
    "is_number",
    "is_searched",
    "plain",
    "possible_values",
    "stage_value",
]


def is_int(v: Any) -> bool:
    """An ``int`` and not a ``bool`` (YAML's true is no integer here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite ``int`` or ``float``, not a ``bool``."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# A finite metric value (results, the searcher): the same test under the name those read by.
finite = is_number


@public("search.spec")
@dataclass(frozen=True)
class Choice:
    """``{choice: [...]}``: one of the listed values (lists are kept as tuples)."""

    values: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"choice": [plain(v) for v in self.values]}


@public("search.spec")
@dataclass(frozen=True)
class IntRange:
    """``{int: [lo, hi], step: s, log: bool}``: an integer in [lo, hi] (inclusive)."""

    lo: int
    hi: int
    step: int = 1
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"int": [self.lo, self.hi]}
        if self.step != 1:
            d["step"] = self.step
        if self.log:
            d["log"] = True
        return d


@public("search.spec")
@dataclass(frozen=True)
class FloatRange:
    """``{float: [lo, hi], log: bool}``: a real number in [lo, hi]."""

    lo: float
    hi: float
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"float": [self.lo, self.hi]}
        if self.log:
            d["log"] = True
        return d


SEARCHED = (Choice, IntRange, FloatRange)


def is_searched(value: Any) -> bool:
    return isinstance(value, SEARCHED)


def possible_values(value: Any) -> tuple[Any, ...]:
    """The values a dimension can take when it is fixed or a choice (ranges: both bounds)."""
    if isinstance(value, Choice):
        return value.values
    if isinstance(value, (IntRange, FloatRange)):
        return (value.lo, value.hi)
    return (value,)


def stage_value(dim: Any, i: int) -> Any:
    """The value (fixed or searched) of a ``space.stages`` dimension for stage ``i``."""
    return dim[i] if isinstance(dim, tuple) else dim


def plain(v: Any) -> Any:
    """Searched values, dataclasses and tuples as plain YAML data. A searched value, or a
    class that says ``WRITES_ITSELF = True`` (an initial point), is written by its own
    ``to_dict``; other dataclasses field by field."""
    if is_searched(v) or getattr(v, "WRITES_ITSELF", False):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    return v
