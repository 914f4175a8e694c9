"""The packages state their public API: every name in ``__all__`` resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["search", "trainables"])
def test_every_public_name_resolves(package):
    mod = __import__(package)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018


def test_importing_the_packages_imports_no_torch_ray_or_mlflow():
    code = ("import sys, search, trainables; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
