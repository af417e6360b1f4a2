"""An adaptive reference integral for IG benchmarks, written here (independent of Salience's path code).

``integrate(f, targets, start_panels, tolerance, gaps)`` integrates a vector integrand
``f(alphas, targets) -> (len(alphas), len(targets), L)`` over alpha in [0, 1], one row per target, by
composite 8-node Gauss-Legendre on dyadic panels. A panel's error is estimated as
``|GL8(panel) - (GL8(left half) + GL8(right half))|`` per feature (the estimate of the coarse rule;
the halves' sum, which is kept, is far more accurate wherever the integrand is smooth at the panel's
scale). Each row starts from ``start_panels`` equal panels and halves its own panels with the
largest estimates (at least a quarter of its largest) until, for every feature, the estimates
summed over the row's panels are at most ``tolerance`` x the row's largest |value|. A row whose
estimate passes but whose sum differs from its ``gap`` (the exact total: F(x) - F(baseline)) by more
than the same allowance, or ``completeness_floor`` x |gap| if larger (the level float32 rounding
allows), halves every panel (a peak that every node missed). Rows refine on their
own panels; the path points of a round are evaluated for every row that needs them at once.

Unlike Salience's adaptive rule (Gauss-Kronrod 7/15 pieces, per-feature bounds from the Kronrod
difference), this is the classical "coarse against two halves" scheme with Gauss-Legendre nodes:
the two share no nodes after the first split, so agreement between them is evidence for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Integrand = Callable[[np.ndarray, list[int]], np.ndarray]  # (alphas, targets) -> (n, len(targets), L) float64
Panel = tuple[int, int]  # (k, n): [k / n, (k + 1) / n]

_X, _W = np.polynomial.legendre.leggauss(8)


def _nodes(panel: Panel) -> tuple[np.ndarray, np.ndarray]:
    """The 8 Gauss-Legendre nodes in ``panel`` and their weights (summing to its width)."""
    k, n = panel
    return (k + (_X + 1) / 2) / n, _W / (2 * n)


def _halves(panel: Panel) -> tuple[Panel, Panel]:
    k, n = panel
    return (2 * k, 2 * n), (2 * k + 1, 2 * n)


@dataclass
class Row:
    """One target's panels (its partition of [0, 1]) and the GL8 values (L,) of every panel evaluated
    for it (the partition's panels and their halves)."""

    partition: set[Panel] = field(default_factory=set)
    gl8: dict[Panel, np.ndarray] = field(default_factory=dict)
    points: int = 0  # path points evaluated for this row
    estimate: float = float("inf")  # max over features of the summed panel estimates
    completeness: float = float("inf")  # |sum of the row - gap|
    allowance: float = float("inf")  # tolerance x the row's largest |value|
    completeness_allowance: float = float("inf")  # the allowance, or completeness_floor x |gap| if larger
    closed: bool = False

    def fine(self, panel: Panel) -> np.ndarray:
        left, right = _halves(panel)
        return self.gl8[left] + self.gl8[right]

    def value(self) -> np.ndarray:
        return np.sum([self.fine(p) for p in self.partition], axis=0)

    def errors(self) -> dict[Panel, np.ndarray]:
        return {p: np.abs(self.gl8[p] - self.fine(p)) for p in self.partition}

    def check(self, tolerance: float, gap: float, completeness_floor: float) -> dict[Panel, np.ndarray]:
        """Sets the estimate, completeness and allowances of the current partition; returns its panels' errors."""
        value = self.value()
        errors = self.errors()
        self.allowance = tolerance * float(np.abs(value).max())
        self.completeness_allowance = max(self.allowance, completeness_floor * abs(gap))
        self.estimate = float(np.sum(list(errors.values()), axis=0).max())
        self.completeness = abs(float(value.sum()) - gap)
        return errors

    def describe(self) -> str:
        return (f"estimate {self.estimate:.1e} / {self.allowance:.1e}, completeness {self.completeness:.1e} / "
                f"{self.completeness_allowance:.1e}, {self.points} points")


@dataclass
class Result:
    """The rows' integrals (T, L), each row's points, estimate, completeness and whether it closed."""

    scores: np.ndarray
    points: list[int]
    estimates: list[float]
    completeness: list[float]
    allowances: list[float]
    closed: list[bool]
    rounds: int


def _evaluate(f: Integrand, wanted: dict[Panel, list[int]]) -> dict[tuple[Panel, int], np.ndarray]:
    """GL8 of each panel for each row that wants it: the panels wanted by the same rows share one call."""
    by_rows: dict[tuple[int, ...], list[Panel]] = {}
    for panel, rows in wanted.items():
        by_rows.setdefault(tuple(sorted(set(rows))), []).append(panel)
    found: dict[tuple[Panel, int], np.ndarray] = {}
    for rows, panels in by_rows.items():
        alphas = np.concatenate([_nodes(p)[0] for p in panels])
        values = f(alphas, list(rows))  # (8 x panels, rows, L)
        for i, panel in enumerate(panels):
            weights = _nodes(panel)[1]
            for j, row in enumerate(rows):
                found[(panel, row)] = weights @ values[8 * i:8 * i + 8, j]
    return found


def integrate(f: Integrand, targets: int, start_panels: int, tolerance: float, gaps: np.ndarray,
              max_points: int = 1 << 17, completeness_floor: float = 0.0,
              progress: Callable[[str], None] | None = None) -> Result:
    """See the module docstring. ``max_points``: per row; a row that reaches it stops unclosed."""
    rows = [Row(partition={(k, start_panels) for k in range(start_panels)}) for _ in range(targets)]
    wanted: dict[Panel, list[int]] = {}
    for k in range(start_panels):
        for panel in ((k, start_panels), *_halves((k, start_panels))):
            wanted[panel] = list(range(targets))
    rounds = 0
    while wanted:
        rounds += 1
        for (panel, t), value in _evaluate(f, wanted).items():
            rows[t].gl8[panel] = value
            rows[t].points += 8
        wanted = {}
        for t, row in enumerate(rows):
            if row.closed:
                continue
            errors = row.check(tolerance, float(gaps[t]), completeness_floor)
            if row.estimate <= row.allowance and row.completeness <= row.completeness_allowance:
                row.closed = True
                continue
            if row.points >= max_points:
                continue
            if row.estimate <= row.allowance:  # every estimate small, the sum off: halve every panel
                chosen = list(errors)
            else:
                largest = max(float(e.max()) for e in errors.values())
                chosen = [p for p, e in errors.items() if float(e.max()) >= 0.25 * largest]
            for panel in chosen:  # its halves become panels; each needs its own halves
                row.partition.remove(panel)
                for half in _halves(panel):
                    row.partition.add(half)
                    for quarter in _halves(half):
                        wanted.setdefault(quarter, []).append(t)
        if progress is not None:
            shown = "; ".join(f"row {t}: {r.describe()}" for t, r in enumerate(rows) if not r.closed)
            progress(f"round {rounds}: {8 * sum(len(v) for v in wanted.values())} path points next; open: {shown or 'none'}")
    return Result(np.stack([r.value() for r in rows]), [r.points for r in rows], [r.estimate for r in rows],
                  [r.completeness for r in rows], [r.allowance for r in rows], [r.closed for r in rows],
                  rounds)
