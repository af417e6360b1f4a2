"""Quadrature rules on [0, 1] for path integrals: nodes (alphas) and weights that sum to 1."""

from __future__ import annotations

import numpy as np

from salience.errors import ParameterError

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)`` of ``steps`` points for ``rule`` on [0, 1]."""
    if steps < 1 or (rule == "riemann_trapezoid" and steps < 2):
        raise ParameterError(f"steps must be at least {2 if rule == 'riemann_trapezoid' else 1}, got {steps}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    uniform = np.full(steps, 1.0 / steps)
    if rule == "riemann_left":
        return np.arange(steps) / steps, uniform
    if rule == "riemann_right":
        return np.arange(1, steps + 1) / steps, uniform
    if rule == "riemann_middle":
        return (np.arange(steps) + 0.5) / steps, uniform
    if rule == "riemann_trapezoid":
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, steps), weights
    raise ParameterError(f"unknown integration rule {rule!r}; choose one of {', '.join(RULES)}")
