"""Shapley value sampling (Strumbelj and Kononenko, 2010; Captum's ``ShapleyValueSampling``): each
feature's mean marginal contribution over feature orders.

The game is KernelSHAP's: v(S) = F(x with only the features in S kept, the rest removed by the
baseline). For an order pi of the F features, feature i's contribution is v(B ∪ {i}) - v(B), B the
features before i in pi; along one order the contributions sum to v(all) - v(none) (a telescoping
sum), so every estimate satisfies efficiency exactly, not only in expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context
from salience.methods.perturbation import perturbed_outputs


def feature_orders(n: int, n_permutations: int, rng: np.random.Generator, *, antithetic: bool) -> tuple[np.ndarray, bool]:
    """Orders of ``n`` features, (K, n), and whether they are all n! of them: every order once when
    n! <= ``n_permutations`` (the exact Shapley values), else ``n_permutations`` drawn uniformly
    (``antithetic``: half drawn, each followed by its reverse; an odd count ends with a drawn one)."""
    if math.factorial(n) <= n_permutations:
        return np.array(list(permutations(range(n))), dtype=np.int64).reshape(-1, n), True
    drawn = [rng.permutation(n) for _ in range((n_permutations + 1) // 2 if antithetic else n_permutations)]
    orders = [order for first in drawn for order in ((first, first[::-1]) if antithetic else (first,))]
    return np.array(orders[:n_permutations], dtype=np.int64), False


def order_coalitions(orders: np.ndarray) -> np.ndarray:
    """The coalitions an order's contributions need, (K (n - 1), n) bool: for each order its first
    1, 2, ..., n - 1 features (the empty and the full coalition, shared by every order, left out)."""
    k, n = orders.shape
    ranks = np.argsort(orders, axis=1)  # ranks[o, i]: the position of feature i in order o
    return (ranks[:, None, :] < np.arange(1, n)[None, :, None]).reshape(k * (n - 1), n)


def order_contributions(orders: np.ndarray, values: np.ndarray, empty: float, full: float) -> np.ndarray:
    """Each feature's contribution along each order, (K, n): ``values`` (K (n - 1),) are the
    coalitions of :func:`order_coalitions`, ``empty`` and ``full`` the values of none and all."""
    k, n = orders.shape
    chain = np.concatenate([np.full((k, 1), empty), values.reshape(k, n - 1), np.full((k, 1), full)], axis=1)
    contributions = np.empty((k, n))
    np.put_along_axis(contributions, orders, np.diff(chain, axis=1), axis=1)  # step j adds feature orders[:, j]
    return contributions


@register("shapley_sampling", aliases=("shapley_value_sampling", "svs", "permutation_shapley"), kind="perturbation",
          cost="n_permutations x (features - 1) + 2 forward (every order when features! <= n_permutations)",
          summary="Shapley values from feature orders: each feature's mean marginal contribution (Strumbelj & "
                  "Kononenko 2010; Captum's ShapleyValueSampling)")
@dataclass
class ShapleySampling:
    """Shapley values of the game v(S) = F(x with only the features in S kept; the rest replaced by
    ``baseline`` or deleted), estimated as each feature's mean contribution v(B ∪ {i}) - v(B) over
    ``n_permutations`` feature orders (B: the features before i). Exact (every order once) when
    F! <= ``n_permutations``. Orders are drawn uniformly, seeded. ``antithetic=True`` follows each
    drawn order with its reverse: a pair is then exact for games without interactions of three or
    more features (each pairwise term is split half and half), but on the zoo classifier's
    probabilities it did not lower the error (benchmarks/README.md), so it is off by default.
    Scores sum to F(x) - v(empty set) exactly for any number of orders (``delta`` is rounding).
    Signed, in the output's units. ``extras["standard_error"]``: per target and feature, the
    standard error of the mean over independent draws (antithetic pairs count as one), 0 when exact.
    All targets share the rows. ``baseline=None``: [MASK] for text, the adapter's default otherwise."""

    n_permutations: int = 32
    antithetic: bool = False
    baseline: str | None = None

    def attribute(self, ctx: Context) -> Attribution:
        if self.n_permutations < 1:
            raise ParameterError(f"n_permutations must be at least 1, got {self.n_permutations}")
        baseline = ctx.baseline(self.baseline, "mask", perturbation=True)
        n = len(ctx.features)
        orders, exact = feature_orders(n, self.n_permutations, ctx.rng(), antithetic=self.antithetic)
        ends = np.vstack([np.zeros((1, n), bool), np.ones((1, n), bool)])
        values = perturbed_outputs(ctx, np.vstack([ends, order_coalitions(orders)]), baseline)  # (2 + K (n - 1), T)
        empty, full = values[0], values[1]
        contributions = np.stack([order_contributions(orders, values[2:, t], empty[t], full[t])
                                  for t in range(values.shape[1])])  # (T, K, n)
        scores = contributions.mean(axis=1)
        errors = np.zeros_like(scores) if exact else _standard_error(contributions, paired=self.antithetic)
        delta = scores.sum(axis=1) - (full - empty)
        return Attribution(scores=scores, output_value=full, baseline_value=empty, delta=delta,
                           details={"baseline": baseline, "exact": exact, "orders": len(orders),
                                    "antithetic": self.antithetic and not exact},
                           extras={"standard_error": errors.tolist()})


def _standard_error(contributions: np.ndarray, *, paired: bool) -> np.ndarray:
    """Standard error of the mean over the orders' contributions (T, K, n) -> (T, n); with
    ``paired``, an order and its reverse (consecutive) are one draw (an odd last order alone)."""
    k = contributions.shape[1]
    if paired and k > 1:
        draws = [contributions[:, j:j + 2].mean(axis=1) for j in range(0, k, 2)]
        units = np.stack(draws, axis=1)
    else:
        units = contributions
    if units.shape[1] < 2:
        return np.full(contributions.shape[::2], np.nan)
    return units.std(axis=1, ddof=1) / math.sqrt(units.shape[1])
