"""The benchmarks' adaptive reference integral (benchmarks/adaptive_reference.py) against closed forms."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

# loaded by path: putting benchmarks/ on sys.path would let its modules (common, run, ...) shadow others
_SPEC = importlib.util.spec_from_file_location(
    "benchmarks_adaptive_reference", Path(__file__).resolve().parents[2] / "benchmarks" / "adaptive_reference.py")
assert _SPEC is not None and _SPEC.loader is not None
_MODULE = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = _MODULE  # (its dataclasses look their module up there)
_SPEC.loader.exec_module(_MODULE)
integrate = _MODULE.integrate

# rows t: a Lorentzian peak at CENTRES[t] of half-width WIDTHS[t] and area about pi AMPLITUDES[t, l], plus SLOPES[t, l] * alpha^2
CENTRES = np.array([0.3712, 0.62, 0.05])
WIDTHS = np.array([2e-4, 0.3, 1e-3])
RNG = np.random.default_rng(0)
AMPLITUDES = RNG.normal(size=(3, 5)) / WIDTHS[:, None]
SLOPES = RNG.normal(size=(3, 5))


def _integrand(alphas: np.ndarray, rows: list[int], calls: list[tuple[int, int]]) -> np.ndarray:
    calls.append((len(alphas), len(rows)))
    c, w = CENTRES[rows][None, :, None], WIDTHS[rows][None, :, None]
    a = alphas[:, None, None]
    return AMPLITUDES[rows][None] / (1 + ((a - c) / w) ** 2) + SLOPES[rows][None] * a ** 2


def _exact() -> np.ndarray:
    c, w = CENTRES[:, None], WIDTHS[:, None]
    return AMPLITUDES * w * (np.arctan((1 - c) / w) + np.arctan(c / w)) + SLOPES / 3


@pytest.mark.parametrize("tolerance", [1e-3, 1e-6])
def test_each_row_closes_within_its_allowance_refining_only_where_needed(tolerance: float) -> None:
    exact = _exact()
    calls: list[tuple[int, int]] = []
    found = integrate(lambda a, rows: _integrand(a, rows, calls), 3, 4, tolerance, exact.sum(1))
    assert all(found.closed)
    error = np.abs(found.scores - exact).max(1) / np.abs(exact).max(1)
    # the allowance bounds the coarse rule's error (tolerance x the row's largest |value|); the halves' sums, which
    # are kept, are at least ten times closer here
    assert (error <= 0.1 * tolerance).all(), error
    # the broad peak (row 1) is smooth at the panels' scale: it stops at the 4 starting panels and their halves
    assert found.points[1] == 4 * 3 * 8
    assert found.points[0] > found.points[2] > found.points[1]  # the narrower the peak, the more panels
    # the first round is one call for all rows; later rounds share a call only between rows that want the same panels
    assert calls[0] == (4 * 3 * 8, 3)
    assert sum(n * r for n, r in calls) == sum(found.points)


def test_a_peak_every_node_misses_is_not_reported_closed() -> None:
    """A peak far narrower than the node spacing, between nodes: the estimates see nothing, the
    completeness check does; with too few points to find it the row stays open (never a silently
    wrong reference)."""
    centre, width, height = 0.70003, 1e-8, 1e5
    area = height * width * (np.arctan((1 - centre) / width) + np.arctan(centre / width))

    def f(alphas: np.ndarray, rows: list[int]) -> np.ndarray:
        return np.repeat((height / (1 + ((alphas - centre) / width) ** 2) + 1.0)[:, None, None], len(rows), 1)

    found = integrate(f, 1, 4, 1e-4, np.array([area + 1.0]), max_points=4096)
    assert not found.closed[0]
    assert found.completeness[0] > found.allowances[0]
    assert found.estimates[0] <= found.allowances[0]  # the per-panel estimates alone would have accepted it
