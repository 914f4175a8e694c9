"""A package's lazy public face: each name of its ``_PUBLIC`` map (name -> the module that
defines it) is imported on first use, so importing the package imports none of them.

A leaf: the faces of ``trainables`` and ``search`` (and their folders) all use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, public: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``'s face (PEP 562)."""
    def __getattr__(name: str) -> Any:
        if name in public:
            return getattr(importlib.import_module(public[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
