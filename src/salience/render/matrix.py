"""Lay a generation's scores out as a matrix for renderers: one row per explained (generated)
token, one column per feature, cells scaled by one power of ten, and the columns that fit a width."""

from __future__ import annotations

import math

import numpy as np

from salience.core.explanation import Explanation
from salience.render.layout import scale

OUTPUT_HEADERS = {"probability": "p", "logit": "logit", "log_probability": "log p"}
CELL_WIDTH = 5  # "+9.99"
LABEL_WIDTH = 12


def visible(text: str, limit: int | None = None) -> str:
    """Token text with spaces and line breaks made visible (``␣``, ``\\n``), cut to ``limit`` chars with ``…``."""
    shown = text.replace(" ", "␣").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") or "∅"
    if limit is not None and len(shown) > limit:
        return shown[: limit - 1] + "…"
    return shown


def unit(explanation: Explanation) -> float:
    """The power of ten that brings the largest |score| into [1, 10) (1 when every score is 0 or NaN)."""
    return 10.0 ** math.floor(math.log10(scale(explanation)))


def cell(score: float, scale: float) -> str:
    """A score in units of ``scale`` with two decimals; blank for NaN (a feature that cannot
    influence the target)."""
    return "" if math.isnan(score) else f"{score / scale:+.2f}"


def unit_note(scale: float) -> str:
    """How to read the cells (empty when they are plain scores)."""
    return "" if scale == 1.0 else f"cells are scores / {scale:.0e}"


def output_values(explanation: Explanation) -> list[float] | None:
    """The explained output of each target at the input (None when the method did not report it)."""
    if explanation.output_value is None:
        return None
    return [float(v) for v in np.atleast_1d(np.asarray(explanation.output_value, dtype=float))]


def fitting_columns(explanation: Explanation, widths: list[int], room: int) -> list[int]:
    """Indices of the feature columns to show, in order, within ``room`` characters (each column
    takes its width plus one space): all when they fit, else those with the largest |score|."""
    if sum(w + 1 for w in widths) <= room:
        return list(range(len(widths)))
    scores = np.abs(np.atleast_2d(np.asarray(explanation.scores, dtype=float)))
    importance = np.nan_to_num(np.max(np.nan_to_num(scores, nan=-1.0), axis=0), nan=-1.0)
    chosen: list[int] = []
    used = 0
    for index in np.argsort(-importance, kind="stable"):
        if used + widths[index] + 1 <= room:
            chosen.append(int(index))
            used += widths[index] + 1
    return sorted(chosen)
