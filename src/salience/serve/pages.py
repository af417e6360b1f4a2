"""The Jinja2 environment of the viewer: templates in ``serve/templates``, autoescape on for every
template (so every stored or typed text, label, method or model name is escaped), undefined
variables are errors, and the CSS is inlined into each page (no external resource, no script)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib.resources import files
from typing import Any
from urllib.parse import quote, urlencode

from markupsafe import Markup

INPUT_CHARS = 600  # the stored input shown above an example's explanations, cut to this many characters


@lru_cache(maxsize=1)
def environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("salience.serve", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.globals.update(url=url, when=when, labels=labels, shown_input=shown_input, flip=flip)
    return env


@lru_cache(maxsize=1)
def css() -> Markup:
    """The page CSS: the explanation renderer's and the viewer's own (trusted, committed files)."""
    from salience.render.html import STYLE

    own = files("salience.serve").joinpath("static/style.css").read_text(encoding="utf-8")
    return Markup(STYLE + own)  # the viewer's rules come last and win


def render(template: str, **context: Any) -> str:
    """A full page; ``context`` needs ``title`` and ``database`` (``report`` defaults to False)."""
    context.setdefault("report", False)
    context.setdefault("live_model", False)
    return str(environment().get_template(template).render(css=css(), **context))


def url(path: str, params: Mapping[str, Any] | None = None) -> str:
    """``path`` with each segment percent-encoded (run and example ids are data) and the query string."""
    quoted = quote(path, safe="/")
    query = urlencode({k: str(v) for k, v in (params or {}).items() if v not in ("", None)})
    return f"{quoted}?{query}" if query else quoted


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def labels(specs: Sequence[Any]) -> list[str]:
    """The labels of a run configuration's method or metric specs."""
    return [str(s["label"]) for s in specs if isinstance(s, dict) and "label" in s]


def shown_input(stored: Any) -> str:
    """A stored input as one line of text: a text, a pair joined by ' ‖ ', an image's reference."""
    text = " ‖ ".join(map(str, stored)) if isinstance(stored, list) else str(stored)
    return text if len(text) <= INPUT_CHARS else text[: INPUT_CHARS - 1] + "…"


def flip(page: Any, metric: str) -> str:
    """The order a click on ``metric``'s header asks for: the other one when it is already sorted on it."""
    if page.sort != metric:
        return ""
    return "asc" if page.order == "desc" else "desc"
