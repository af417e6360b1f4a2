"""Importing the reference implementations the tests compare against (Captum, tint, lime, shap,
scipy, scikit-learn).

A missing oracle skips its tests on a developer's machine, but in CI (environment variable ``CI``
set to ``true``, as GitHub Actions and most CI services set it) it fails the run: a reference test
that silently skips proves nothing, and a green CI run must mean that every comparison ran.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(module: str) -> ModuleType:
    """Import and return ``module``; if it cannot be imported, skip (locally) or fail (in CI).

    Usable at module level (like ``pytest.importorskip``) and inside a test.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        reason = f"test oracle {module!r} cannot be imported ({type(error).__name__}: {error})"
        if in_ci():
            pytest.fail(f"{reason}; CI=true requires every oracle (pip install -e '.[test]')", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
