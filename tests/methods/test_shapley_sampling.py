"""Shapley value sampling (salience.methods.shapley_sampling).

Checked: over every feature order it equals the exact Shapley values (``exact_shapley``, itself
checked against shap in test_reference_shap.py) on games with pairwise and three-way interactions,
and so does one order with its reverse on a game without three-way interactions;
with drawn orders it equals Captum's ``ShapleyValueSampling`` given the same orders (its permutation
generator replaced), on a nonlinear torch game; efficiency holds exactly for any number of orders;
antithetic orders come in reversed pairs; through ``explain`` on the toy classifier, all orders equal
``kernel_shap``'s exact enumeration, draws are seeded, and the standard error covers the exact values.
The causal-LM matrix (each target's own prefix) is in tests/models/test_causal_lm.py.

Tolerances: float64 games, 1e-12 (the same differences summed in another order); against Captum
1e-6 of the largest score (Captum accumulates its attributions in float32); through the float32 toy
classifier 1e-6 of the largest score (its outputs are rounded to float32 in different batches).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_TEXT
from oracles import require
from salience.errors import ParameterError
from salience.methods.perturbation import exact_shapley
from salience.methods.shapley_sampling import feature_orders, order_coalitions, order_contributions

captum_attr = require("captum.attr")


def _game(n: int, seed: int):
    """v(S) for rows of a keep-matrix: linear + pairwise + a three-way interaction."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=(n, n))

    def value(keep: np.ndarray) -> np.ndarray:
        z = np.asarray(keep, dtype=np.float64)
        return z @ a + np.einsum("bi,ij,bj->b", z, b, z) + 2.0 * z[:, 0] * z[:, 1] * z[:, 2]

    return value


def _sampled(value, orders: np.ndarray) -> np.ndarray:
    n = orders.shape[1]
    empty, full = value(np.zeros((1, n), bool))[0], value(np.ones((1, n), bool))[0]
    return order_contributions(orders, value(order_coalitions(orders)), empty, full)  # (K, n)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_every_order_gives_the_exact_shapley_values(n):
    value = _game(n, seed=n)
    orders, exact = feature_orders(n, math.factorial(n), np.random.default_rng(0), antithetic=True)
    assert exact and len(orders) == math.factorial(n) and len({tuple(o) for o in orders}) == len(orders)
    every = ((np.arange(2**n)[:, None] >> np.arange(n)[None]) & 1).astype(bool)
    np.testing.assert_allclose(_sampled(value, orders).mean(0), exact_shapley(every, value(every)), rtol=0, atol=1e-12)


def test_each_order_is_efficient_and_antithetic_orders_come_reversed():
    n = 7
    value = _game(n, seed=1)
    orders, exact = feature_orders(n, 9, np.random.default_rng(5), antithetic=True)
    assert not exact and len(orders) == 9
    for first, second in zip(orders[0:8:2], orders[1:8:2], strict=True):
        np.testing.assert_array_equal(second, first[::-1])
    assert all(sorted(o) == list(range(n)) for o in orders)
    gap = value(np.ones((1, n), bool))[0] - value(np.zeros((1, n), bool))[0]
    np.testing.assert_allclose(_sampled(value, orders).sum(1), gap, rtol=0, atol=1e-12)  # along every order


def test_an_order_and_its_reverse_are_exact_without_three_way_interactions():
    n = 6
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=n), rng.normal(size=(n, n))

    def pairwise(keep: np.ndarray) -> np.ndarray:
        z = np.asarray(keep, dtype=np.float64)
        return z @ a + np.einsum("bi,ij,bj->b", z, b, z)

    every = ((np.arange(2**n)[:, None] >> np.arange(n)[None]) & 1).astype(bool)
    orders, _ = feature_orders(n, 2, np.random.default_rng(0), antithetic=True)
    np.testing.assert_allclose(_sampled(pairwise, orders).mean(0), exact_shapley(every, pairwise(every)), rtol=0, atol=1e-12)
    one, _ = feature_orders(n, 1, np.random.default_rng(0), antithetic=False)
    assert not np.allclose(_sampled(pairwise, one)[0], exact_shapley(every, pairwise(every)))  # one order alone is not


def test_equals_captum_shapley_value_sampling_on_the_same_orders():
    n = 6
    torch.manual_seed(0)
    w1, w2 = torch.randn(n, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def forward(x: torch.Tensor) -> torch.Tensor:  # a nonlinear game of the kept inputs (ones) against zeros
        return torch.tanh(x @ w1) @ w2 + x[:, 0] * x[:, 3]

    orders, _ = feature_orders(n, 8, np.random.default_rng(2), antithetic=True)
    sampler = captum_attr.ShapleyValueSampling(forward)
    sampler.permutation_generator = lambda num_features, num_samples: iter(orders.tolist())
    expected = sampler.attribute(torch.ones(1, n, dtype=torch.float64), baselines=0.0, n_samples=len(orders))[0].numpy()

    def value(keep: np.ndarray) -> np.ndarray:
        return forward(torch.as_tensor(keep, dtype=torch.float64)).numpy()

    np.testing.assert_allclose(_sampled(value, orders).mean(0), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


# ------------------------------------------------------------------ through explain()
def test_all_orders_equal_kernel_shap_exact_on_the_toy_classifier(toy):
    text = "the film was good"  # 4 words: 24 orders
    exact = salience.explain(toy, text, method="kernel_shap", output="logit")
    ours = salience.explain(toy, text, method="shapley_sampling", n_permutations=24, output="logit")
    assert ours.params["exact"] is True and exact.params["exact"] is True
    np.testing.assert_allclose(ours.scores, exact.scores, rtol=0, atol=1e-6 * np.abs(exact.scores).max())
    assert ours.cost.forward_passes == 1 + 2 + 24 * 3  # the prediction, none and all, 3 coalitions per order


def test_sampled_orders_are_seeded_efficient_and_covered_by_their_standard_error(toy):
    text = TOY_TEXT.rsplit(" and ", 1)[0]  # 10 words: kernel_shap enumerates all 1,024 coalitions (exact)
    exact = salience.explain(toy, text, method="kernel_shap", output="logit")
    a = salience.explain(toy, text, method="shapley_sampling", n_permutations=40, seed=1, output="logit")
    b = salience.explain(toy, text, method="shapley_sampling", n_permutations=40, seed=1, output="logit")
    c = salience.explain(toy, text, method="shapley_sampling", n_permutations=40, seed=2, output="logit")
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.allclose(a.scores, c.scores)
    assert a.params["exact"] is False and a.params["orders"] == 40
    assert abs(float(a.delta)) < 1e-5 * abs(float(a.output_value - a.baseline_value))
    error = np.asarray(a.extras["standard_error"])[0]
    assert exact.params["exact"] is True and (error > 0).all()
    assert (np.abs(a.scores - exact.scores) < 4 * error).all()  # (seeded: a fixed draw, not a flaky one)


def test_bad_number_of_orders_is_refused(toy):
    with pytest.raises(ParameterError, match="n_permutations must be at least 1"):
        salience.explain(toy, "the film was good", method="shapley_sampling", n_permutations=0)
