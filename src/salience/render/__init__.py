"""Renderers of Explanations: terminal (rich), HTML (self-contained, escaped); registered with the
core on import so that ``Explanation.to_html()`` and friends find them."""

from salience.core.explanation import register_renderer
from salience.render.html import explanation_html
from salience.render.terminal import explanation_renderable, print_explanations

register_renderer("html", explanation_html)
register_renderer("terminal", explanation_renderable)
register_renderer("print", print_explanations)

__all__ = ["explanation_html", "explanation_renderable", "print_explanations"]
