"""What the run page shows: the method x metric table (mean, bootstrap 95 % interval, counts,
cells shaded from worst to best within each metric by that metric's direction: the heat table),
sorted as asked, and the mean deletion / insertion curves as inline SVG.

Means and intervals come from :func:`salience.evaluate.summary.summarise` with the run's seed, so
they equal ``salience runs show``; curves from :func:`salience.evaluate.plots.mean_curves`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from salience.errors import ParameterError
from salience.evaluate.plots import mean_curves
from salience.evaluate.store import RunInfo
from salience.evaluate.summary import SummaryRow, summarise
from salience.serve.database import ReadOnlyStore
from salience.serve.svg import curve_svg

ARROWS = {True: "↑ higher is better", False: "↓ lower is better", None: "direction unknown"}


@dataclass(frozen=True)
class Cell:
    """One (method, metric) cell: its summary row (None: no row), its shade in [0, 1] (1 = best
    of its column, None: not comparable) and whether it is the column's best mean."""

    row: SummaryRow | None
    shade: float | None
    best: bool

    @property
    def text(self) -> str:
        if self.row is None:
            return ""
        if self.row.n == 0:
            return "n/a"
        return f"{self.row.mean:.3f}"

    @property
    def interval(self) -> str:
        if self.row is None or self.row.n == 0:
            return ""
        return f"[{self.row.ci_low:.3f}, {self.row.ci_high:.3f}]"

    @property
    def style(self) -> str:
        """Background from white (worst) to green (best); a fixed string built from a number only."""
        if self.shade is None:
            return ""
        alpha = 0.08 + 0.62 * self.shade
        return f"background: rgba(34,139,34,{alpha:.3f})"


@dataclass
class RunPage:
    info: RunInfo
    methods: list[str]
    metrics: list[str]
    directions: dict[str, bool | None]
    table: list[tuple[str, list[Cell]]]
    sort: str
    order: str
    curves: list[tuple[str, str]] = field(default_factory=list)  # (metric, svg markup)
    notes: list[str] = field(default_factory=list)


def _labels(items: Sequence[Any]) -> list[str]:
    return [str(item["label"]) for item in items if isinstance(item, dict) and "label" in item]


def _shades(rows: Sequence[SummaryRow | None], higher_is_better: bool | None) -> list[float | None]:
    """Each mean's place between the column's worst (0) and best (1) mean, as printed (3 decimals,
    so differences too small to show are ties); 0.5 for all when they tie; None when unknown."""
    means = [round(r.mean, 3) if r is not None and r.n and math.isfinite(r.mean) else None for r in rows]
    known = [m for m in means if m is not None]
    if not known or higher_is_better is None:
        return [None] * len(rows)
    low, high = min(known), max(known)
    out: list[float | None] = []
    for mean in means:
        if mean is None:
            out.append(None)
        elif high == low:
            out.append(0.5)
        else:
            scaled = (mean - low) / (high - low)
            out.append(scaled if higher_is_better else 1 - scaled)
    return out


@dataclass(frozen=True)
class RunData:
    """What the run page computes from the database, whatever its order: the summary (the costly
    part: a 2,000-resample bootstrap per cell) and the curves' SVG. Cached by the viewer."""

    methods: list[str]
    metrics: list[str]
    summary: list[SummaryRow]
    curves: list[tuple[str, str]]


def run_data(store: ReadOnlyStore, info: RunInfo) -> RunData:
    """Summary (:func:`summarise` with the run's seed, rows in example order, as ``salience runs
    show``) and mean curves of every curve metric of the run."""
    rows = store.metric_rows(info.run_id)
    methods = _labels(info.config.get("methods", [])) or list(dict.fromkeys(r["method"] for r in rows))
    metrics = _labels(info.config.get("metrics", [])) or list(dict.fromkeys(r["metric"] for r in rows))
    summary = summarise(rows, methods=methods, metrics=metrics, seed=int(info.config.get("seed", 0) or 0))
    curve_metrics = [m for m in store.curve_metric_names(info.run_id) if m in metrics]
    curve_rows = store.curve_rows(info.run_id, curve_metrics)
    curves = []
    for metric in curve_metrics:
        means = mean_curves(curve_rows, metric)
        if means:
            curves.append((metric, curve_svg(means, metric, methods)))
    return RunData(methods, metrics, summary, curves)


def build_run_page(data: RunData, info: RunInfo, *, sort: str = "", order: str = "") -> RunPage:
    """The run page of ``info``. ``sort``: "" (the run's method order), "method" (by name) or a
    metric label (by mean, best first unless ``order`` says "asc" / "desc"); anything else is a
    ParameterError (HTTP 400)."""
    methods, metrics, summary = data.methods, data.metrics, data.summary
    if sort not in ("", "method", *metrics):
        raise ParameterError(f"cannot sort by {sort[:60]!r}: choose method or one of the metrics {', '.join(metrics)}")
    if order not in ("", "asc", "desc"):
        raise ParameterError(f"order must be asc or desc, not {order[:40]!r}")
    found = {(r.method, r.metric): r for r in summary}
    directions = {metric: next((r.higher_is_better for r in summary if r.metric == metric), None) for metric in metrics}
    columns: dict[str, list[float | None]] = {}
    for metric in metrics:
        columns[metric] = _shades([found.get((m, metric)) for m in methods], directions[metric])
    table = []
    for i, method in enumerate(methods):
        cells = [Cell(found.get((method, metric)), columns[metric][i], columns[metric][i] == 1.0) for metric in metrics]
        table.append((method, cells))
    table = _sorted(table, metrics, directions, sort, order)
    page = RunPage(info, methods, metrics, directions, table, sort, order or _default_order(sort, directions),
                   curves=list(data.curves))
    page.notes = [f"{r.metric} / {r.method}: {r.n_errors} example(s) without a value, e.g. {r.first_error}"
                  for r in summary if r.n_errors]
    return page


def _default_order(sort: str, directions: dict[str, bool | None]) -> str:
    if sort in ("", "method"):
        return "asc"
    return "asc" if directions.get(sort) is False else "desc"  # best first


def _sorted(table: list[tuple[str, list[Cell]]], metrics: list[str], directions: dict[str, bool | None], sort: str,
            order: str) -> list[tuple[str, list[Cell]]]:
    if not sort:
        return table if order != "desc" else table[::-1]
    descending = (order or _default_order(sort, directions)) == "desc"
    if sort == "method":
        return sorted(table, key=lambda item: item[0], reverse=descending)
    column = metrics.index(sort)

    def key(item: tuple[str, list[Cell]]) -> float:
        row = item[1][column].row
        return row.mean if row is not None and row.n and math.isfinite(row.mean) else math.nan

    known = [item for item in table if not math.isnan(key(item))]
    missing = [item for item in table if math.isnan(key(item))]
    return sorted(known, key=key, reverse=descending) + missing  # methods without a value last either way
