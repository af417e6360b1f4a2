"""The example browser: parse and check the query (filters, sort, page), select one page of a
run's examples on the server, and render each shown method's explanation with the existing HTML
renderers (:func:`salience.render.html.explanation_html`: text heat spans, generation matrices,
image overlays; every text escaped there).

Only the page's examples are read from the database and rendered; the run's example index (id,
position, label, prediction) and the sort column's values are small and read once per query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from salience.errors import ParameterError, SalienceError
from salience.serve.database import ExampleEntry, ReadOnlyStore

PER_PAGE = 10
MAX_PER_PAGE = 50
SORTS = ("position", "id", "label", "prediction", "value", "rho")
CORRECT = {"": None, "yes": True, "no": False}


class NotFound(SalienceError):
    """What a request names does not exist (HTTP 404): a run, an example, a page past the last."""


@dataclass(frozen=True)
class ExampleQuery:
    """A checked query. ``value`` sorts (and ``low``/``high`` filter) by the value of metric
    ``metric`` for method ``method``; ``rho`` sorts (and ``rho_below`` keeps examples whose ρ is
    strictly below it) by the Spearman rank correlation of methods ``rank_a`` and ``rank_b``
    (:mod:`salience.serve.disagreement`); ``methods``: the methods shown side by side (all by default)."""

    page: int = 1
    per: int = PER_PAGE
    label: str = ""
    prediction: str = ""
    correct: bool | None = None
    sort: str = "position"
    order: str = "asc"
    method: str = ""
    metric: str = ""
    low: float | None = None
    high: float | None = None
    rank_a: str = ""
    rank_b: str = ""
    rho_below: float | None = None
    methods: tuple[str, ...] = ()

    @property
    def compares(self) -> bool:
        """Whether a method pair is chosen (its ρ is shown, and may filter or sort)."""
        return bool(self.rank_a and self.rank_b)

    def params(self, **changes: Any) -> dict[str, str]:
        """The query string of this query with ``changes`` (for links), defaults left out."""
        values = {"page": self.page, "per": self.per, "label": self.label, "prediction": self.prediction,
                  "correct": {None: "", True: "yes", False: "no"}[self.correct], "sort": self.sort, "order": self.order,
                  "method": self.method, "metric": self.metric, "low": "" if self.low is None else repr(self.low),
                  "high": "" if self.high is None else repr(self.high), "rank_a": self.rank_a, "rank_b": self.rank_b,
                  "rho_below": "" if self.rho_below is None else repr(self.rho_below), "show": ",".join(self.methods)}
        values.update(changes)
        defaults = {"page": 1, "per": PER_PAGE, "sort": "position", "order": "asc"}
        return {k: str(v) for k, v in values.items() if v not in ("", None) and defaults.get(k) != v}


def _integer(params: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or len(raw) > 9:
        raise ParameterError(f"{name} must be a whole number, not {raw[:40]!r}")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise ParameterError(f"{name} must be between {low} and {high}" if high is not None else f"{name} must be at least {low}")
    return value


def _number(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ParameterError(f"{name} must be a number, not {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number")
    return value


def parse_query(params: Mapping[str, str], methods: Sequence[str], metrics: Sequence[str]) -> ExampleQuery:
    """Check every parameter against the run (unknown methods, metrics, sorts: ParameterError)."""
    sort = params.get("sort", "position") or "position"
    if sort not in SORTS:
        raise ParameterError(f"cannot sort by {sort[:40]!r}: choose one of {', '.join(SORTS)}")
    order = params.get("order", "asc") or "asc"
    if order not in ("asc", "desc"):
        raise ParameterError(f"order must be asc or desc, not {order[:40]!r}")
    correct = params.get("correct", "")
    if correct not in CORRECT:
        raise ParameterError(f"correct must be yes or no, not {correct[:40]!r}")
    method, metric = params.get("method", ""), params.get("metric", "")
    low, high = _number(params, "low"), _number(params, "high")
    needs_value = sort == "value" or low is not None or high is not None
    if needs_value or method or metric:
        if method not in methods:
            raise ParameterError(f"unknown method {method[:60]!r}; this run has {', '.join(methods)}")
        if metric not in metrics:
            raise ParameterError(f"unknown metric {metric[:60]!r}; this run has {', '.join(metrics)}")
    rank_a, rank_b = params.get("rank_a", ""), params.get("rank_b", "")
    rho_below = _number(params, "rho_below")
    if sort == "rho" or rho_below is not None or rank_a or rank_b:
        if not rank_a or not rank_b:
            raise ParameterError("rank correlation: pick two methods (rank_a and rank_b)")
        for name in (rank_a, rank_b):
            if name not in methods:
                raise ParameterError(f"rank correlation: unknown method {name[:60]!r}; this run has {', '.join(methods)}")
        if rank_a == rank_b:
            raise ParameterError(f"rank correlation needs two different methods, not {rank_a[:60]!r} twice")
    shown = tuple(m for m in params.get("show", "").split(",") if m) or tuple(methods)
    for name in shown:
        if name not in methods:
            raise ParameterError(f"unknown method {name[:60]!r}; this run has {', '.join(methods)}")
    return ExampleQuery(page=_integer(params, "page", 1, 1), per=_integer(params, "per", PER_PAGE, 1, MAX_PER_PAGE),
                        label=params.get("label", ""), prediction=params.get("prediction", ""), correct=CORRECT[correct],
                        sort=sort, order=order, method=method, metric=metric, low=low, high=high, rank_a=rank_a,
                        rank_b=rank_b, rho_below=rho_below, methods=shown)


def label_text(label: Any) -> str:
    return "" if label is None else str(label)


@dataclass
class ExampleRow:
    entry: ExampleEntry
    value: float | None  # the sort metric's value (None: not chosen or not computed)
    rho: float | None = None  # the chosen method pair's rank correlation (None: not chosen or undefined)
    explanations: list[tuple[str, str, list[tuple[str, str]]]] = field(default_factory=list)  # (method, html, metric cells)


@dataclass
class ExamplePage:
    query: ExampleQuery
    rows: list[ExampleRow]
    total: int  # examples matching the filters
    pages: int
    labels: list[str]  # every label / prediction of the run, for the filter menus
    predictions: list[str]


def select(entries: Sequence[ExampleEntry], values: Mapping[str, float | None], query: ExampleQuery,
           rhos: Mapping[str, float | None] | None = None) -> list[tuple[ExampleEntry, float | None]]:
    """Filter and sort the index (the whole run in position order, no explanation read): label and prediction match
    their text exactly; ``low`` <= value <= ``high`` drops examples without a value, ``rho_below``
    those whose ρ (``rhos``) is undefined or not below it; examples without a value (or ρ) sort
    last in either order."""
    rhos = rhos or {}
    chosen = []
    for entry in entries:
        value = values.get(entry.example_id)
        if query.label and label_text(entry.label) != query.label:
            continue
        if query.prediction and (entry.prediction or "") != query.prediction:
            continue
        if query.correct is not None and entry.correct is not query.correct:
            continue
        if (query.low is not None or query.high is not None) and (
                value is None or (query.low is not None and value < query.low) or (query.high is not None and value > query.high)):
            continue
        if query.rho_below is not None:
            rho = rhos.get(entry.example_id)
            if rho is None or not rho < query.rho_below:
                continue
        chosen.append((entry, value))
    if query.sort == "position":  # the index is in position order already
        return chosen if query.order == "asc" else chosen[::-1]
    keys: dict[str, Any] = {"position": lambda item: item[0].position, "id": lambda item: item[0].example_id,
                            "label": lambda item: label_text(item[0].label), "prediction": lambda item: item[0].prediction or ""}
    if query.sort == "value":
        known = sorted((item for item in chosen if item[1] is not None), key=lambda item: (item[1], item[0].position),
                       reverse=query.order == "desc")
        return known + [item for item in chosen if item[1] is None]
    if query.sort == "rho":
        ranked = sorted((item for item in chosen if rhos.get(item[0].example_id) is not None),
                        key=lambda item: (rhos[item[0].example_id], item[0].position), reverse=query.order == "desc")
        return ranked + [item for item in chosen if rhos.get(item[0].example_id) is None]
    return sorted(chosen, key=lambda item: (keys[query.sort](item), item[0].position), reverse=query.order == "desc")


def menus(entries: Sequence[ExampleEntry]) -> tuple[list[str], list[str]]:
    """Every label and every prediction of the run (the filter form's menus), sorted."""
    return (sorted({label_text(e.label) for e in entries if e.label is not None}),
            sorted({e.prediction for e in entries if e.prediction is not None}))


def build_page(store: ReadOnlyStore, run_id: str, entries: Sequence[ExampleEntry], query: ExampleQuery,
               metrics: Sequence[str], render: Any, rhos: Mapping[str, float | None] | None = None,
               choices: tuple[list[str], list[str]] | None = None) -> ExamplePage:
    """One page of examples; ``render(run_id, example_id, method, unit)`` gives a unit's HTML;
    ``rhos``: example id -> ρ of the query's method pair (when it names one); ``choices``: the
    run's :func:`menus` (computed here when not given). A page past the last is NotFound (HTTP
    404); page 1 of no match is an empty page."""
    values = store.metric_values(run_id, query.method, query.metric) if query.method and query.metric else {}
    rhos = rhos or {}
    chosen = select(entries, values, query, rhos)
    pages = max(1, math.ceil(len(chosen) / query.per))
    if query.page > pages:
        raise NotFound(f"page {query.page} does not exist: {len(chosen)} matching examples make {pages} page(s)")
    shown = chosen[(query.page - 1) * query.per: query.page * query.per]
    ids = [entry.example_id for entry, _ in shown]
    units = store.units(run_id, ids)
    results = store.example_results(run_id, ids)
    rows = []
    for entry, value in shown:
        row = ExampleRow(entry, value, rhos.get(entry.example_id))
        for method in query.methods:
            unit = units.get((entry.example_id, method))
            cells = []
            for metric in metrics:
                result = results.get((entry.example_id, method, metric))
                if result is not None:
                    cells.append((metric, "n/a" if result["value"] is None else f"{result['value']:.3f}"))
            row.explanations.append((method, render(run_id, entry, method, unit), cells))
        rows.append(row)
    labels, predictions = choices if choices is not None else menus(entries)
    return ExamplePage(query, rows, len(chosen), pages, labels, predictions)
