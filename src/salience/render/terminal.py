"""Terminal rendering with rich: words on a green (pushes the target up) / red (pushes it down)
background, followed by a signed bar chart so the sign reads without colour too."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from salience.core.explanation import Explanation
from salience.render.layout import describe, scale, segments
from salience.render.matrix import (
    CELL_WIDTH,
    LABEL_WIDTH,
    OUTPUT_HEADERS,
    cell,
    fitting_columns,
    output_values,
    unit,
    unit_note,
    visible,
)

BAR_WIDTH = 20


def _style(score: float, largest: float) -> str:
    strength = min(1.0, abs(score) / largest)
    level = int(40 + 180 * strength)
    return f"black on rgb({255 - level},255,{255 - level})" if score > 0 else f"black on rgb(255,{255 - level},{255 - level})"


def explanation_renderable(explanation: Explanation) -> RenderableType:
    """Header line, coloured text, and a table of every feature with its signed score and bar; a
    generation as a :class:`GenerationMatrix`."""
    if explanation.kind == "generation":
        return GenerationMatrix(explanation)
    if explanation.kind == "image":
        return _image_summary(explanation)
    largest = scale(explanation)
    body = Text()
    for segment, pieces in segments(explanation):
        if segment:
            body.append("  ||  ", style="dim")
        for text, score in pieces:
            body.append(text, style=_style(score, largest) if score is not None and score != 0 else "")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("feature")
    table.add_column("score", justify="right")
    table.add_column("", no_wrap=True)
    for feature, score in zip(explanation.features, explanation.scores):
        length = round(BAR_WIDTH * abs(score) / largest)
        bar = Text(("+" if score > 0 else "-" if score < 0 else " ") + "█" * length,
                   style="green" if score > 0 else "red")
        table.add_row(feature.text, f"{score:+.4f}", bar)
    parts: list[Text | Table] = [Text(describe(explanation), style="dim"), body, table]
    parts += [Text(f"warning: {w}", style="yellow") for w in explanation.warnings]
    return Group(*parts)


class GenerationMatrix:
    """A generation's scores as a coloured matrix: one row per explained token (with its output at
    the input where the method reports it), one column per feature; blank cells are features that
    cannot influence the token. Columns that do not fit the width are dropped, keeping those with
    the largest |score|, and a note says how many."""

    def __init__(self, explanation: Explanation) -> None:
        self.explanation = explanation

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        e = self.explanation
        scores = np.atleast_2d(np.asarray(e.scores, dtype=float))
        largest, factor = scale(e), unit(e)
        labels = [visible(t.label, LABEL_WIDTH) for t in e.targets]
        values = output_values(e)
        outputs = [f"{v:.3g}" for v in values] if values is not None else []
        headers = [visible(f.text, CELL_WIDTH + 3) for f in e.features]
        widths = [max(CELL_WIDTH, len(h)) for h in headers]
        fixed = max(len(label) for label in [*labels, "target"]) + 1
        if outputs:
            fixed += max(len(o) for o in [*outputs, OUTPUT_HEADERS.get(e.target.output, "output")]) + 1
        shown = fitting_columns(e, widths, options.max_width - fixed)
        table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), show_header=True, header_style="bold")
        table.add_column("target", no_wrap=True)
        if outputs:
            table.add_column(OUTPUT_HEADERS.get(e.target.output, "output"), justify="right", no_wrap=True)
        for i in shown:
            table.add_column(Text(headers[i]), justify="right", no_wrap=True, min_width=widths[i], max_width=widths[i])
        for t, label in enumerate(labels):
            row = [Text(label)] + ([Text(outputs[t])] if outputs else [])
            for i in shown:
                score = float(scores[t, i])
                coloured = not np.isnan(score) and score != 0
                row.append(Text(cell(score, factor), style=_style(score, largest) if coloured else ""))
            table.add_row(*row)
        yield Text(describe(e), style="dim")
        if "prompt" in e.extras:
            yield Text("prompt: ", style="bold") + Text(str(e.extras["prompt"]))
            how = "generated" if e.extras.get("generated") else "given"
            yield Text(f"continuation ({how}): ", style="bold") + Text(str(e.extras.get("continuation", "")))
        yield table
        notes = [unit_note(factor)] if unit_note(factor) else []
        if len(shown) < len(headers):
            notes.append(f"{len(headers) - len(shown)} of {len(headers)} feature columns not shown (too narrow; "
                         "those with the largest |score| are kept); the HTML output shows all")
        yield from (Text(note, style="dim") for note in notes)
        yield from (Text(f"warning: {w}", style="yellow") for w in e.warnings)


def _image_summary(explanation: Explanation) -> Group:
    """An image explanation in a few lines: provenance, the heatmap's size and range, the top
    feature, and the PNG's path once one was written (``to_png``)."""
    e = explanation
    heat = e.heatmap()
    finite = heat[np.isfinite(heat)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (float("nan"), float("nan"))
    feature, score = e.top(1)[0]
    summary = (f"image {e.input}: heatmap {heat.shape[1]}x{heat.shape[0]} (W x H), range [{low:+.3g}, {high:+.3g}]; "
               f"{len(e.features)} {e.level} features, top: {feature.text} ({score:+.3g})")
    png = e.extras.get("_png")
    parts = [Text(describe(e), style="dim"), Text(summary),
             Text(f"PNG: {png}" if png else "PNG: not written (Explanation.to_png(path), CLI --png)", style="dim")]
    parts += [Text(f"warning: {w}", style="yellow") for w in e.warnings]
    return Group(*parts)


def print_explanations(explanations: Sequence[Explanation], console: Console | None = None) -> None:
    """Print each explanation, separated by a blank line."""
    console = console or Console()
    for index, explanation in enumerate(explanations):
        if index:
            console.print()
        console.print(explanation_renderable(explanation))
