"""Inline SVG line charts of a run's mean deletion / insertion curves (no script, no external
resource: the markup goes straight into the page or the report file). Every text is escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
WIDTH, HEIGHT = 560, 330
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 28, 44


def trapezoid_area(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the polyline (x, y) by the trapezoid rule (the value the legend shows)."""
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def curve_svg(curves: Mapping[str, tuple[np.ndarray, np.ndarray, int]], metric: str, methods: Sequence[str] = ()) -> str:
    """One chart: a polyline per method (legend: name, area under the mean curve, number of
    curves), x = fraction of features removed (deletion) or inserted, y = the explained output.
    ``curves`` as :func:`salience.evaluate.plots.mean_curves` returns them; ``methods`` fixes the
    legend order (others follow in their order)."""
    order = [m for m in methods if m in curves] + [m for m in curves if m not in methods]
    values = [v for m in order for v in curves[m][1] if np.isfinite(v)]
    low = min(0.0, min(values, default=0.0))
    high = max(1.0, max(values, default=1.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + plot_w * x

    def py(y: float) -> float:
        return TOP + plot_h * (1 - (y - low) / (high - low))

    removing = "deletion" in metric
    parts = [f'<svg class="curve" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(metric)} mean curves">',
             f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(metric)}: mean curve per method</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for tick in np.linspace(0, 1, 6):
        parts.append(f'<line x1="{px(tick):.1f}" y1="{TOP + plot_h}" x2="{px(tick):.1f}" y2="{TOP + plot_h + 4}" stroke="#999"/>'
                     f'<text x="{px(tick):.1f}" y="{TOP + plot_h + 16}" font-size="10" text-anchor="middle">{tick:.1f}</text>')
        value = low + tick * (high - low)
        parts.append(f'<line x1="{LEFT}" y1="{py(value):.1f}" x2="{LEFT + plot_w}" y2="{py(value):.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 6}" y="{py(value) + 3:.1f}" font-size="10" text-anchor="end">{value:.2f}</text>')
    axis = "fraction of features removed" if removing else "fraction of features inserted"
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 8}" font-size="11" text-anchor="middle">{axis}</text>')
    parts.append(f'<text transform="translate(12 {TOP + plot_h / 2}) rotate(-90)" font-size="11" text-anchor="middle">'
                 "explained output</text>")
    for index, method in enumerate(order):
        x, y, n = curves[method]
        colour = PALETTE[index % len(PALETTE)]
        points = " ".join(f"{px(float(a)):.1f},{py(float(b)):.1f}" for a, b in zip(x, y) if np.isfinite(b))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{points}"/>')
        legend_y = TOP + 14 + 14 * index if removing else TOP + plot_h - 8 - 14 * (len(order) - 1 - index)
        parts.append(f'<line x1="{LEFT + plot_w - 200}" y1="{legend_y - 4}" x2="{LEFT + plot_w - 184}" y2="{legend_y - 4}" '
                     f'stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{LEFT + plot_w - 180}" y="{legend_y}" font-size="10">'
                     f"{escape(method)} (area {trapezoid_area(x, y):.3f}, n={n})</text>")
    parts.append("</svg>")
    return "".join(parts)
