"""A run's summary: terminal table, CSV and Markdown files, and the PNG figures."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salience.evaluate.export import markdown_table, write_csv
from salience.evaluate.plots import curve_metrics, plot_curves, plot_heat_table
from salience.evaluate.summary import SummaryRow

ARROWS = {True: "↑", False: "↓", None: ""}
SUMMARY_COLUMNS = ("method", "metric", "higher_is_better", "n", "n_errors", "mean", "ci_low", "ci_high", "first_error")


def _cell(row: SummaryRow | None) -> str:
    if row is None:
        return ""
    if row.n == 0:
        return f"n/a ({row.n_errors} errors)"
    text = f"{row.mean:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"
    return text + (f" ({row.n_errors} err)" if row.n_errors else "")


def _grid(summary: Sequence[SummaryRow]) -> tuple[list[str], list[str], dict[tuple[str, str], SummaryRow]]:
    methods = list(dict.fromkeys(r.method for r in summary))
    metrics = list(dict.fromkeys(r.metric for r in summary))
    return methods, metrics, {(r.method, r.metric): r for r in summary}


def summary_header(summary: Sequence[SummaryRow]) -> list[str]:
    directions = {r.metric: r.higher_is_better for r in summary}
    _, metrics, _ = _grid(summary)
    return ["method"] + [f"{m} {ARROWS[directions.get(m)]}".strip() for m in metrics]


def print_summary(summary: Sequence[SummaryRow], console: Any, *, title: str) -> None:
    """Methods as rows, metrics as columns: mean [95 % bootstrap interval], error counts."""
    from rich.table import Table
    from rich.text import Text

    methods, metrics, cell = _grid(summary)
    table = Table(title=Text(title), title_justify="left")
    for header in summary_header(summary):
        table.add_column(Text(header), overflow="fold")
    for method in methods:
        table.add_row(Text(method), *(Text(_cell(cell.get((method, m)))) for m in metrics))
    console.print(table)
    counts = {r.n + r.n_errors for r in summary}
    console.print(f"mean [bootstrap 95 % interval] over {', '.join(map(str, sorted(counts)))} examples; "
                  "↑ higher is better, ↓ lower is better", markup=False)
    for row in summary:
        if row.n_errors:
            console.print(Text(f"{row.method} / {row.metric}: {row.n_errors} example(s) without a value, "
                               f"e.g. {row.first_error}", style="yellow"))


def summary_markdown(summary: Sequence[SummaryRow]) -> str:
    methods, metrics, cell = _grid(summary)
    return markdown_table(summary_header(summary), [[m, *(_cell(cell.get((m, k))) for k in metrics)] for m in methods])


def write_outputs(summary: Sequence[SummaryRow], rows: Sequence[dict[str, Any]], out: Path, *, title: str) -> list[Path]:
    """summary.csv (long form), summary.md (wide), one PNG per curve metric and heat_table.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv([_clean(r.to_dict()) for r in summary], out / "summary.csv", SUMMARY_COLUMNS)]
    markdown = out / "summary.md"
    markdown.write_text(f"# {title}\n\nmean [bootstrap 95 % interval]; ↑ higher is better, ↓ lower is better\n\n"
                        + summary_markdown(summary), encoding="utf-8")
    written.append(markdown)
    for metric in curve_metrics(rows):
        written.append(plot_curves(rows, metric, out / f"{_file_name(metric)}_curve.png", title=f"{title}: {metric}"))
    if summary:
        written.append(plot_heat_table(summary, out / "heat_table.png", title=title))
    return written


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "metric"


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
