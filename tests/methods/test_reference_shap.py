"""Salience's Shapley values against the ``shap`` package (0.51) on games built from the same
coalition values.

A game v(S) on F players is given to shap as a model on binary rows with a single all-zeros
background row, explained at the all-ones row: shap's masking then evaluates exactly v(S) for
S = the ones kept. Oracles:
- ``shap.KernelExplainer`` with ``nsamples >= 2^F``: it enumerates every coalition and its
  Shapley-kernel regression is then exact (fast, no compilation): the default oracle.
- ``shap.explainers.Exact`` (gray-code enumeration): the literal exact explainer, but its numba
  functions compile on first use (~10 s on this machine), so that test is marked ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from salience.methods.perturbation import constrained_kernel_regression, exact_shapley, kernel_shap_design

shap = require("shap")


def _all_coalitions(n: int) -> np.ndarray:
    return ((np.arange(2**n)[:, None] >> np.arange(n)[None]) & 1).astype(bool)


def _table_game(keep: np.ndarray, values: np.ndarray):
    """A python game (rows of 0/1 -> values) answering from a table of every coalition's value."""
    n = keep.shape[1]
    table = np.empty(2**n)
    table[keep.astype(np.int64) @ (1 << np.arange(n))] = values

    def game(rows: np.ndarray) -> np.ndarray:
        return table[(np.asarray(rows) > 0.5).astype(np.int64) @ (1 << np.arange(n))]

    return game


def _synthetic_game(n: int, seed: int):
    """Linear + pairwise + a three-way interaction, so Shapley values are not just the weights."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=(n, n))

    def game(rows: np.ndarray) -> np.ndarray:
        z = np.asarray(rows, dtype=np.float64)
        three_way = 2.0 * z[:, 0] * z[:, 1] * z[:, 2] if n >= 3 else 0.0
        return z @ a + np.einsum("bi,ij,bj->b", z, b, z) + three_way

    return game


def _shap_kernel_exact(game, n: int) -> tuple[np.ndarray, float]:
    explainer = shap.KernelExplainer(game, np.zeros((1, n)))
    # l1_reg=False: shap would otherwise keep only 10 features by default, zeroing the rest
    values = explainer.shap_values(np.ones((1, n)), nsamples=2**n, l1_reg=False, silent=True)
    return np.asarray(values)[0], float(np.asarray(explainer.expected_value).reshape(-1)[0])


def _toy_game(toy, inputs):
    """Salience's exact Shapley explanation of ``inputs`` and the table game of the same values."""
    encoded = toy.encode(inputs)
    n = len(encoded.words)
    e = salience.explain(toy, inputs, "kernel_shap", max_exact=n)
    keep = _all_coalitions(n)
    values = toy.score_perturbed(encoded, torch.as_tensor(keep), e.features, "mask", e.target).numpy()
    return e, _table_game(keep, values), n


@pytest.mark.parametrize("n", [3, 6, 9])
def test_exact_shapley_equals_shap_on_synthetic_game(n):
    game = _synthetic_game(n, seed=n)
    keep = _all_coalitions(n)
    ours = exact_shapley(keep, game(keep))
    theirs, _ = _shap_kernel_exact(game, n)
    # both exact in float64; differences are round-off of sums of ~2^n terms (observed ~1e-15)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("inputs", [TOY_PAIR, TOY_TEXT], ids=["pair-8-words", "text-13-words"])
def test_kernel_shap_exact_mode_equals_shap_on_toy(toy, inputs):
    e, game, n = _toy_game(toy, inputs)
    assert e.params["exact"] is True
    theirs, base = _shap_kernel_exact(game, n)
    np.testing.assert_allclose(e.scores, theirs, rtol=0, atol=1e-10)  # exact on both sides (observed ~1e-15)
    assert e.baseline_value == pytest.approx(base, abs=1e-12)
    assert abs(e.delta) < 1e-12  # efficiency: sum = F(x) - v(empty)


@pytest.mark.slow
def test_kernel_shap_exact_mode_equals_shap_exact_explainer(toy):
    e, game, n = _toy_game(toy, TOY_PAIR)
    explainer = shap.explainers.Exact(game, shap.maskers.Independent(np.zeros((1, n)), max_samples=1))
    result = explainer(np.ones((1, n)))
    np.testing.assert_allclose(e.scores, result.values[0], rtol=0, atol=1e-10)  # observed ~2e-16
    assert e.baseline_value == pytest.approx(float(result.base_values[0]), abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5, 7, 8, 9])
@pytest.mark.parametrize("extra", [0, 2, 100])
def test_kernel_regression_with_every_coalition_is_exact(n, extra):
    """A budget >= 2^n - 2 enumerates every proper coalition once, with its exact kernel weight:
    the constrained regression then returns the exact Shapley values (odd and even n)."""
    game = _synthetic_game(n, seed=10 + n)
    exact = exact_shapley(_all_coalitions(n), game(_all_coalitions(n)))
    full, empty = float(game(np.ones((1, n)))[0]), float(game(np.zeros((1, n)))[0])
    z, w = kernel_shap_design(n, 2**n - 2 + extra, np.random.default_rng(0))
    assert len(z) == 2**n - 2 and len({tuple(row) for row in z}) == len(z)  # each proper coalition once
    phi = constrained_kernel_regression(z.astype(np.float64), game(z) - empty, w, full - empty)
    np.testing.assert_allclose(phi, exact, rtol=0, atol=1e-10)  # observed ~1e-14
    assert phi.sum() == pytest.approx(full - empty, abs=1e-9)


def test_kernel_shap_sampling_converges_to_exact(toy):
    """TOY_TEXT has 13 words (odd: the size layers {s, 13 - s} are all pairs): sampled KernelSHAP
    approaches the exact values as n_samples grows and is exact once every coalition fits."""
    e, _, n = _toy_game(toy, TOY_TEXT)
    scale = np.abs(e.scores).max()

    def errors(n_samples: int) -> np.ndarray:
        runs = [salience.explain(toy, TOY_TEXT, "kernel_shap", max_exact=0, n_samples=n_samples, seed=seed)
                for seed in range(3)]
        for run in runs:
            assert run.params["exact"] is False
            # efficiency holds by construction (constrained least squares): round-off only
            assert abs(run.scores.sum() - (run.output_value - run.baseline_value)) < 1e-9
            assert run.baseline_value == pytest.approx(e.baseline_value, abs=1e-12)
        return np.array([np.abs(run.scores - e.scores).max() for run in runs])

    small, large, complete = errors(256), errors(4096), errors(2**n)
    assert np.all(large < small)  # per seed (observed max error 0.08-0.10 at 256, 0.006-0.010 at 4096)
    # 4096 of the 8190 proper coalitions: within 2.5 % of the largest score (observed <= 1.7 %)
    assert large.max() < 0.025 * scale
    assert complete.max() < 1e-9  # every coalition enumerated: exact (observed ~5e-15)
