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


def _cell(row: SummaryRow | None, separator: str = " ") -> str:
    if row is None:
        return ""
    if row.n == 0:
        return f"n/a ({row.n_errors} errors)"
    text = f"{row.mean:.3f}{separator}[{row.ci_low:.3f}, {row.ci_high:.3f}]"
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
    rows = [[method, *(_cell(cell.get((method, m)), "\n") for m in metrics)] for method in methods]
    table = Table(title=Text(title), title_justify="left")
    for index, header in enumerate(summary_header(summary)):
        widest = max((len(line) for row in rows for line in row[index].splitlines()), default=0)
        table.add_column(Text(header), overflow="fold", min_width=widest if index else None)
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    console.print(table)
    counts = {r.n + r.n_errors for r in summary}
    console.print(f"mean [bootstrap 95 % interval] over {', '.join(map(str, sorted(counts)))} examples; "
                  "↑ higher is better, ↓ lower is better", markup=False)
    for note in error_notes(summary):
        console.print(Text(note, style="yellow"))


def error_notes(summary: Sequence[SummaryRow]) -> list[str]:
    """One line per metric with missing values (per method when the methods differ)."""
    notes = []
    for metric in dict.fromkeys(r.metric for r in summary):
        rows = [r for r in summary if r.metric == metric]
        failing = [r for r in rows if r.n_errors]
        if not failing:
            continue
        if len(failing) == len(rows) and len({r.n_errors for r in rows}) == 1:
            notes.append(f"{metric}: {failing[0].n_errors} example(s) without a value for every method, "
                         f"e.g. {failing[0].first_error}")
        else:
            notes.extend(f"{metric} / {r.method}: {r.n_errors} example(s) without a value, e.g. {r.first_error}"
                         for r in failing)
    return notes


def summary_markdown(summary: Sequence[SummaryRow]) -> str:
    methods, metrics, cell = _grid(summary)
    return markdown_table(summary_header(summary), [[m, *(_cell(cell.get((m, k))) for k in metrics)] for m in methods])


def write_outputs(summary: Sequence[SummaryRow], rows: Sequence[dict[str, Any]], out: Path, *, title: str) -> list[Path]:
    """summary.csv (long form), summary.md (wide), one PNG per curve metric and heat_table.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_csv([_clean(r.to_dict()) for r in summary], out / "summary.csv", SUMMARY_COLUMNS)]
    markdown = out / "summary.md"
    markdown.write_text(f"# {title}\n\nmean [bootstrap 95 % interval]; ↑ higher is better, ↓ lower is better\n\n"
                        + summary_markdown(summary)
                        + "".join(f"\n- {note}" for note in error_notes(summary)) + "\n", encoding="utf-8")
    written.append(markdown)
    for metric in curve_metrics(rows):
        written.append(plot_curves(rows, metric, out / f"{_file_name(metric)}_curve.png", title=f"{title}: {metric}",
                                   methods=list(dict.fromkeys(r.method for r in summary))))
    if summary:
        written.append(plot_heat_table(summary, out / "heat_table.png", title=title))
    return written


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "metric"


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
