"""Self-contained HTML (inline CSS, no scripts, no external resources). Every piece of input text,
model name and label is escaped with ``html.escape`` before it is written."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape

import numpy as np

from salience.core.explanation import Explanation
from salience.render.layout import describe, scale, segments
from salience.render.matrix import OUTPUT_HEADERS, cell, output_values, unit, unit_note, visible

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.explanation { margin-bottom: 2em; }
.meta { color: #666; font-size: 0.85em; margin-bottom: 0.5em; }
.text { font-size: 1.2em; line-height: 2.1; }
.f { padding: 0.15em 0.1em; border-radius: 0.2em; }
.sep { color: #999; margin: 0 0.6em; }
.legend { font-size: 0.8em; color: #666; }
.warning { color: #a60; font-size: 0.85em; }
.overlay { max-width: 100%; }
.matrix { border-collapse: collapse; font-size: 0.85em; margin-top: 0.5em; }
.matrix th, .matrix td { padding: 0.2em 0.45em; text-align: right; font-family: ui-monospace, monospace; white-space: pre; }
.matrix tbody th { text-align: left; }
.prompt { font-family: ui-monospace, monospace; white-space: pre-wrap; }
"""


def _colour(score: float, largest: float) -> str:
    alpha = min(1.0, abs(score) / largest)
    rgb = "34,139,34" if score > 0 else "220,20,60"
    return f"background: rgba({rgb},{alpha:.3f})"


def _one(explanation: Explanation) -> str:
    if explanation.kind == "generation":
        return _generation(explanation)
    if explanation.kind == "image":
        return _image(explanation)
    largest = scale(explanation)
    parts: list[str] = []
    for segment, pieces in segments(explanation):
        if segment:
            parts.append('<span class="sep">‖</span>')
        for text, score in pieces:
            if score is None:
                parts.append(escape(text))
            else:
                parts.append(f'<span class="f" style="{_colour(score, largest)}" title="{score:+.4g}">{escape(text)}</span>')
    warnings = "".join(f'<div class="warning">warning: {escape(w)}</div>' for w in explanation.warnings)
    return (
        f'<div class="explanation"><div class="meta">{escape(describe(explanation))}</div>'
        f'<div class="text">{"".join(parts)}</div>{warnings}</div>'
    )


def _generation(explanation: Explanation) -> str:
    """A generation as a heat table: one row per explained token (and its output at the input where
    the method reports it), one column per feature; blank cells: the feature cannot influence the token."""
    e = explanation
    scores = np.atleast_2d(np.asarray(e.scores, dtype=float))
    largest, factor = scale(e), unit(e)
    values = output_values(e)
    output_header = f"<th>{escape(OUTPUT_HEADERS.get(e.target.output, 'output'))}</th>" if values is not None else ""
    header = "".join(f"<th>{escape(visible(f.text))}</th>" for f in e.features)
    rows = []
    for t, target in enumerate(e.targets):
        cells = []
        for score in scores[t]:
            if np.isnan(score):
                cells.append("<td></td>")
            else:
                cells.append(f'<td style="{_colour(float(score), largest)}" title="{score:+.4g}">{escape(cell(float(score), factor))}</td>')
        output = f"<td>{float(values[t]):.3g}</td>" if values is not None else ""
        rows.append(f"<tr><th>{escape(visible(target.label))}</th>{output}{''.join(cells)}</tr>")
    texts = ""
    if "prompt" in e.extras:
        how = "generated" if e.extras.get("generated") else "given"
        texts = (f'<div class="prompt"><b>prompt:</b> {escape(str(e.extras["prompt"]))}</div>'
                 f'<div class="prompt"><b>continuation ({how}):</b> {escape(str(e.extras.get("continuation", "")))}</div>')
    note = f'<div class="meta">{escape(unit_note(factor))}</div>' if unit_note(factor) else ""
    warnings = "".join(f'<div class="warning">warning: {escape(w)}</div>' for w in e.warnings)
    return (
        f'<div class="explanation"><div class="meta">{escape(describe(e))}</div>{texts}'
        f'<table class="matrix"><thead><tr><th>target</th>{output_header}{header}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>{note}{warnings}</div>'
    )


def _image(explanation: Explanation) -> str:
    """An image explanation: the PNG overlay (heatmap over the picture, colour bar with its sign
    convention) embedded as a data: URI, under the escaped provenance line."""
    from salience.render.png import overlay_png_bytes

    data = base64.b64encode(overlay_png_bytes([explanation])).decode("ascii")
    alt = f"{explanation.method} heatmap for {explanation.target.label}"
    warnings = "".join(f'<div class="warning">warning: {escape(w)}</div>' for w in explanation.warnings)
    return (f'<div class="explanation"><div class="meta">{escape(describe(explanation))}</div>'
            f'<img class="overlay" alt="{escape(alt)}" src="data:image/png;base64,{data}">{warnings}</div>')


def explanation_html(explanations: Sequence[Explanation], *, standalone: bool = True) -> str:
    """HTML for one or more explanations; ``standalone`` wraps it in a full page."""
    body = "\n".join(_one(e) for e in explanations)
    legend = ('<p class="legend">Green: the word pushes the explained output up; red: down. '
              "Hover a word for its score.</p>")
    if explanations and all(e.kind == "image" for e in explanations):
        legend = '<p class="legend">Each heatmap is drawn over the image; its colour bar states the sign convention.</p>'
    if not standalone:
        return f"<div><style>{STYLE}</style>{legend}{body}</div>"
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Salience explanation</title>'
            f"<style>{STYLE}</style></head><body>{legend}{body}</body></html>")
