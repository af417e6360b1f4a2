"""The browser viewer (``salience serve``, ``salience report``): read-only pages over a results
database: the runs, a run's method x metric table with its curves, and an example browser with
each method's explanation side by side. See docs/viewer.md.

A leaf: nothing else in Salience imports it (an import-linter contract checks it). It needs the
``serve`` extra (Starlette, uvicorn, Jinja2): ``pip install 'salience[serve]'``.
"""

from __future__ import annotations

from typing import Any

from salience.errors import SalienceError

__all__ = ["create_app", "require_server", "write_report"]


def require_server() -> None:
    """A one-line error when the ``serve`` extra is not installed."""
    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as error:
        raise SalienceError(f"the viewer needs the serve extra ({error.name} is missing): "
                            "pip install 'salience[serve]'") from None


def create_app(database: Any, **options: Any) -> Any:
    """The Starlette application over ``database`` (see :func:`salience.serve.app.create_app`)."""
    require_server()
    from salience.serve.app import create_app as create

    return create(database, **options)


def write_report(database: Any, run: str, out: Any, **options: Any) -> Any:
    """Write one run's page as a self-contained HTML file (see :func:`salience.serve.report.write_report`)."""
    require_server()
    from salience.serve.report import write_report as write

    return write(database, run, out, **options)
