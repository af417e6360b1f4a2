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


# Gauss-Kronrod 7/15 on [-1, 1] (the pair QUADPACK's QK15 uses): the 15 Kronrod nodes contain the 7
# Gauss-Legendre nodes, so one set of 15 gradients gives two estimates of the same piece; K15 is exact
# for polynomials of degree 22, G7 for degree 13. Values: Kronrod (1894), Piessens et al. (1983).
_KRONROD_NODES = np.array([0.991455371120812639206854697526329, 0.949107912342758524526189684047851,
                           0.864864423359769072789712788640926, 0.741531185599394439863864773280788,
                           0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
                           0.207784955007898467600689403773245, 0.0])
_KRONROD_WEIGHTS = np.array([0.022935322010529224963732008058970, 0.063092092629978553290700663189204,
                             0.104790010322250183839876322541518, 0.140653259715525918745189590510238,
                             0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
                             0.204432940075298892414161999234649, 0.209482141084727828012999174891714])
_GAUSS7_WEIGHTS = np.array([0.129484966168869693270611432679082, 0.279705391489276667901467771423780,
                            0.381830050505118944950369775488975, 0.417959183673469387755102040816327])


def gauss_kronrod_15() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(alphas, kronrod_weights, gauss_weights)`` on [0, 1]: 15 nodes, the K15 weights, and the G7
    weights on the same nodes (zero at the 8 Kronrod-only nodes); each weight vector sums to 1."""
    half = _KRONROD_NODES[:-1]
    nodes = np.concatenate([-half, [0.0], half[::-1]])
    kronrod = np.concatenate([_KRONROD_WEIGHTS[:-1], [_KRONROD_WEIGHTS[-1]], _KRONROD_WEIGHTS[:-1][::-1]])
    gauss_half = np.zeros(7)
    gauss_half[[1, 3, 5]] = _GAUSS7_WEIGHTS[:3]
    gauss = np.concatenate([gauss_half, [_GAUSS7_WEIGHTS[3]], gauss_half[::-1]])
    return (nodes + 1) / 2, kronrod / 2, gauss / 2
