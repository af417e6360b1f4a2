"""The package layering is checked, not hoped for: import-linter's contracts in pyproject.toml
(core imports nothing above it; methods import no concrete adapter; models import nothing from
evaluation, metrics or rendering; the viewer is a leaf only the CLI imports; the engines are leaves
only the evaluation commands import; the layers from the CLI down to the core)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from oracles import require

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    require("importlinter")
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([command], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert f"{contracts} kept, 0 broken" in result.stdout  # every contract of pyproject.toml was checked
