"""PNG figures of a run: mean deletion/insertion curves per method, and a method x metric heat table.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch, no display).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salience.errors import SalienceError
from salience.evaluate.summary import SummaryRow

GRID = np.linspace(0.0, 1.0, 101)


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SalienceError("plots need matplotlib (pip install matplotlib)") from None
    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def mean_curves(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per method: the curves of ``metric`` (details x, y) interpolated on a 0..1 grid of 101
    points and averaged over examples. Returns method -> (grid, mean y, number of curves)."""
    curves: dict[str, list[np.ndarray]] = {}
    for row in rows:
        details = row.get("details") or {}
        if row["metric"] != metric or row.get("value") is None or "x" not in details or "y" not in details:
            continue
        curves.setdefault(row["method"], []).append(np.interp(GRID, details["x"], details["y"]))
    return {method: (GRID, np.mean(ys, axis=0), len(ys)) for method, ys in curves.items()}


def curve_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metrics whose rows carry curves (details with x and y), in order of appearance."""
    found: list[str] = []
    for row in rows:
        details = row.get("details") or {}
        if row["metric"] not in found and "x" in details and "y" in details:
            found.append(row["metric"])
    return found


def plot_curves(rows: Sequence[dict[str, Any]], metric: str, path: Path, *, title: str | None = None,
                methods: Sequence[str] = ()) -> Path:
    """Mean curve of ``metric`` per method (legend in the order of ``methods``, then of appearance),
    with its area in the legend; returns ``path``."""
    figure = _figure(6.4, 4.4)
    axes = figure.add_subplot()
    curves = mean_curves(rows, metric)
    order = [m for m in methods if m in curves] + [m for m in curves if m not in methods]
    for method in order:
        x, y, n = curves[method]
        area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
        axes.plot(x, y, label=f"{method} (area {area:.3f}, n={n})", linewidth=1.6)
    removing = "deletion" in metric
    axes.set_xlabel("fraction of features removed" if removing else "fraction of features inserted")
    axes.set_ylabel("probability of the explained class")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title(title or f"{metric}: mean curve per method")
    axes.legend(fontsize=7, loc="upper right" if removing else "lower right")
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_heat_table(summary: Sequence[SummaryRow], path: Path, *, title: str = "mean per method and metric") -> Path:
    """Methods x metrics table of means (95 % interval below), each column coloured from worst (light)
    to best (dark green) by that metric's direction; returns ``path``."""
    methods = list(dict.fromkeys(r.method for r in summary))
    metrics = list(dict.fromkeys(r.metric for r in summary))
    cell = {(r.method, r.metric): r for r in summary}
    goodness = np.full((len(methods), len(metrics)), np.nan)
    for j, metric in enumerate(metrics):
        # coloured by the values as printed (3 decimals): differences too small to show are ties
        column = np.round([cell[(m, metric)].mean if (m, metric) in cell else np.nan for m in methods], 3)
        finite = np.isfinite(column)
        if not finite.any():
            continue
        low, high = np.nanmin(column), np.nanmax(column)
        scaled = np.where(finite, (column - low) / (high - low), np.nan) if high > low else np.where(finite, 0.5, np.nan)
        first = next((cell[(m, metric)] for m in methods if (m, metric) in cell), None)
        goodness[:, j] = 1 - scaled if first is not None and first.higher_is_better is False else scaled
    figure = _figure(2.0 + 1.45 * len(metrics), 1.7 + 0.5 * len(methods))
    axes = figure.add_subplot()
    axes.imshow(np.ma.masked_invalid(goodness), cmap="Greens", vmin=-0.15, vmax=1.15, aspect="auto")
    for i, method in enumerate(methods):
        for j, metric in enumerate(metrics):
            row = cell.get((method, metric))
            if row is None or row.n == 0:
                text = "n/a"
            else:
                text = f"{row.mean:.3f}\n[{row.ci_low:.3f}, {row.ci_high:.3f}]"
            dark = np.isfinite(goodness[i, j]) and goodness[i, j] > 0.6
            axes.text(j, i, text, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    arrows = {True: " ↑", False: " ↓", None: ""}
    directions = {r.metric: r.higher_is_better for r in summary}
    axes.set_xticks(range(len(metrics)), [m + arrows[directions.get(m)] for m in metrics], rotation=30, ha="right", fontsize=7)
    axes.set_yticks(range(len(methods)), methods, fontsize=7)
    axes.set_title(f"{title} (darker = better in its column)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path
