"""``salience report``: one run's page (method x metric table with intervals and shading, curves
as inline SVG) as a single self-contained HTML file: inline CSS, no script, no link to the viewer
and no external resource, so it can be mailed or archived as it is."""

from __future__ import annotations

import time
from pathlib import Path

from salience.serve.database import ReadOnlyStore
from salience.serve.pages import render
from salience.serve.runpage import ARROWS, build_run_page, run_data


def report_html(database: str | Path, run: str, *, sort: str = "", order: str = "") -> str:
    """The report of run ``run`` (an id or a unique prefix) in ``database`` (read-only)."""
    with ReadOnlyStore(database) as store:
        info = store.run(store.find_run(run))
        page = build_run_page(run_data(store, info), info, sort=sort, order=order)
    return render("run.html", title=f"run {info.run_id}", database=str(Path(database).name), page=page, arrows=ARROWS,
                  report=True, now=time.time())


def write_report(database: str | Path, run: str, out: str | Path, *, sort: str = "", order: str = "") -> Path:
    """Write :func:`report_html` to ``out`` (folders created); returns the path."""
    path = Path(out).expanduser()
    html = report_html(database, run, sort=sort, order=order)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
