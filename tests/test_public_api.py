"""The packages state their public API: every name in ``__all__`` resolves, lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["search", "trainables"])
def test_every_public_name_resolves(package):
    # In a fresh interpreter from the repo root (the tests/ folders share the packages' names).
    code = (f"import {package} as m; assert m.__all__ == sorted(m.__all__); "
            "[getattr(m, n) for n in m.__all__]; print(len(m.__all__))\n"
            "try:\n    m.no_such_name\nexcept AttributeError:\n    print('refused')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    count, refused = out.stdout.split()
    assert int(count) >= 15 and refused == "refused"


def test_importing_the_packages_imports_no_torch_ray_or_mlflow():
    code = ("import sys, search, trainables; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO)
    assert out.stdout.strip() == "[]"
