"""Renderers of Explanations: terminal (rich), HTML (self-contained, escaped), PNG overlays of image
explanations (matplotlib); registered with the core on import so that ``Explanation.to_html()`` and
friends find them."""

from salience.core.explanation import register_renderer
from salience.render.html import explanation_html
from salience.render.png import explanation_png
from salience.render.terminal import explanation_renderable, print_explanations

register_renderer("html", explanation_html)
register_renderer("terminal", explanation_renderable)
register_renderer("print", print_explanations)
register_renderer("png", explanation_png)

__all__ = ["explanation_html", "explanation_png", "explanation_renderable", "print_explanations"]
