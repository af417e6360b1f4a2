"""Terminal rendering with rich: words on a green (pushes the target up) / red (pushes it down)
background, followed by a signed bar chart so the sign reads without colour too."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from salience.core.explanation import Explanation
from salience.render.layout import describe, scale, segments

BAR_WIDTH = 20


def _style(score: float, largest: float) -> str:
    strength = min(1.0, abs(score) / largest)
    level = int(40 + 180 * strength)
    return f"black on rgb({255 - level},255,{255 - level})" if score > 0 else f"black on rgb(255,{255 - level},{255 - level})"


def explanation_renderable(explanation: Explanation) -> Group:
    """Header line, coloured text, and a table of every feature with its signed score and bar."""
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


def print_explanations(explanations: Sequence[Explanation], console: Console | None = None) -> None:
    """Print each explanation, separated by a blank line."""
    console = console or Console()
    for index, explanation in enumerate(explanations):
        if index:
            console.print()
        console.print(explanation_renderable(explanation))
