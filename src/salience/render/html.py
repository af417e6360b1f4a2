"""Self-contained HTML (inline CSS, no scripts, no external resources). Every piece of input text,
model name and label is escaped with ``html.escape`` before it is written."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from salience.core.explanation import Explanation
from salience.render.layout import describe, scale, segments

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.explanation { margin-bottom: 2em; }
.meta { color: #666; font-size: 0.85em; margin-bottom: 0.5em; }
.text { font-size: 1.2em; line-height: 2.1; }
.f { padding: 0.15em 0.1em; border-radius: 0.2em; }
.sep { color: #999; margin: 0 0.6em; }
.legend { font-size: 0.8em; color: #666; }
.warning { color: #a60; font-size: 0.85em; }
"""


def _colour(score: float, largest: float) -> str:
    alpha = min(1.0, abs(score) / largest)
    rgb = "34,139,34" if score > 0 else "220,20,60"
    return f"background: rgba({rgb},{alpha:.3f})"


def _one(explanation: Explanation) -> str:
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


def explanation_html(explanations: Sequence[Explanation], *, standalone: bool = True) -> str:
    """HTML for one or more explanations; ``standalone`` wraps it in a full page."""
    body = "\n".join(_one(e) for e in explanations)
    legend = ('<p class="legend">Green: the word pushes the explained output up; red: down. '
              "Hover a word for its score.</p>")
    if not standalone:
        return f"<div><style>{STYLE}</style>{legend}{body}</div>"
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Salience explanation</title>'
            f"<style>{STYLE}</style></head><body>{legend}{body}</body></html>")
