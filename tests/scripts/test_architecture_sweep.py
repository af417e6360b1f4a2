"""scripts/architecture_sweep.py on one causal-LM and one classifier family: its table rows are there
and hold numbers (the sweep's own checks within their documented bounds), not caught errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import architecture_sweep as sweep  # noqa: E402


def numbers(line: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d\.\d*e[+-]\d+|\de[+-]\d+", line)]


def test_sweep_rows_for_gpt2_and_bert(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["architecture_sweep.py", "--only", "gpt2", "bert"])
    sweep.main()
    out = capsys.readouterr().out
    gpt2 = next(line for line in out.splitlines() if line.startswith("| gpt2 |"))
    bert = next(line for line in out.splitlines() if line.startswith("| bert |"))
    assert "Error" not in gpt2 + bert
    conservation, cache, blocks, heads = numbers(gpt2)
    assert conservation < 1e-9 and cache < 1e-12 and blocks < 1e-12 and heads < 1e-5
    assert "alpha 0 = plain; alpha 50 changes it" in gpt2
    conservation, blocks, heads = numbers(bert)
    assert conservation < 1e-9 and blocks < 1e-12 and heads < 1e-3
