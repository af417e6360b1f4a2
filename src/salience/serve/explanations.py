"""A stored unit (one example, one method) as HTML, through the existing renderer
(:func:`salience.render.html.explanation_html`, which escapes every text). Image explanations are
drawn over their picture when the stored reference still resolves (an image file that exists, an
``imagenet-photos:ID`` or ``fashion-mnist:SPLIT:INDEX`` reference), else as the heatmap alone.

Rendered HTML is kept in a small LRU cache: a stored explanation never changes (its row is
written once), and an image overlay costs a matplotlib figure (~0.2 s).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from html import escape
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np

CACHE_SIZE = 256


def _image_file(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return np.asarray(opened.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError):
        return None


@lru_cache(maxsize=2)
def _fashion(split: str) -> Any:
    from salience.datasets.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(split)[0]


def picture(reference: Any) -> np.ndarray | None:
    """The pixels behind a stored image reference, or None when they cannot be found any more."""
    if not isinstance(reference, str):
        return None
    try:
        if reference.startswith("imagenet-photos:"):
            from salience.datasets.photos import load_photos

            wanted = reference.split(":", 1)[1]
            path = next((p.path for p in load_photos() if p.id == wanted), None)
            return None if path is None else _image_file(Path(path))
        if reference.startswith("fashion-mnist:"):
            _, split, index = reference.split(":")
            images = _fashion(split)
            return np.asarray(images[int(index)]) if 0 <= int(index) < len(images) else None
        path = Path(reference)
        return _image_file(path) if path.is_file() else None
    except Exception:  # a reference that no longer resolves is drawn without its picture, never an error page
        return None


class UnitRenderer:
    """Callable (run_id, entry, method, unit) -> HTML of one stored unit, cached per (run, example, method) of one database."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.cache: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self.lock = Lock()

    def __call__(self, run_id: str, entry: Any, method: str, unit: dict[str, Any] | None) -> str:
        if unit is None:
            return '<div class="missing">not computed yet</div>'
        if unit.get("explanation") is None:
            return f'<div class="failed">no explanation: {escape(str(unit.get("error") or "unknown error"))}</div>'
        key = (run_id, entry.example_id, method)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        html = render_explanation(unit["explanation"], entry.input)
        with self.lock:
            self.cache[key] = html
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return html


def render_explanation(text: str, stored_input: Any) -> str:
    """The explanation JSON ``text`` as an HTML fragment (legend included; the page's CSS hides
    repeated legends); a document that does not load gives a one-line escaped message."""
    import salience.render  # noqa: F401  (registers the renderers)
    from salience.core.explanation import Explanation
    from salience.render.html import explanation_html

    try:
        explanation = Explanation.from_json(text)
    except (ValueError, KeyError, TypeError) as error:
        return f'<div class="failed">stored explanation cannot be read: {escape(str(error))}</div>'
    if explanation.kind == "image":
        pixels = picture(stored_input)
        if pixels is not None:
            explanation.extras["_image"] = pixels
    try:
        return explanation_html([explanation], standalone=False)
    except Exception as error:  # a renderer failure shows in its cell, the page still renders
        return f'<div class="failed">cannot render: {escape(type(error).__name__)}: {escape(str(error))}</div>'
