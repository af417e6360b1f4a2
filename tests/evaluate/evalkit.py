"""Helpers shared by the evaluation tests.

A plain module, not a conftest.py: a second module named conftest would shadow tests/conftest.py
for the `from conftest import ...` of the other test folders."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from toy import NEGATIVE, POSITIVE, sentence


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One JSON document a line (strings are written as they are, to make malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def toy_records(n: int, seed: int = 1, *, rationale: bool = True) -> list[dict[str, Any]]:
    """Toy sentences with their label and, as rationale, the indices of the planted sentiment words."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text, label = sentence(rng)
        record: dict[str, Any] = {"id": f"ex{i}", "text": text, "label": label}
        if rationale:
            record["rationale"] = [j for j, w in enumerate(text.split()) if w in POSITIVE + NEGATIVE]
        records.append(record)
    return records
