"""Salience's LIME pieces against the ``lime`` package (0.2.0.1) and scikit-learn.

lime's text explainer (lime/lime_text.py, ``LimeTextExplainer.__data_labels_distances``) samples
row 0 = all words kept and, for each other row, k ~ U{1..F} words removed, chosen without
replacement; distances are sklearn's cosine distance of each binary row to row 0, times 100; the
kernel is sqrt(exp(-d^2 / width^2)); ``LimeBase.explain_instance_with_data`` then fits
``Ridge(alpha=1)`` with those sample weights on the selected features (all of them with
``feature_selection="none"``). Salience's ``lime_samples`` / ``fit_lime`` / ``weighted_ridge``
must reproduce this.

(One modelling difference that these tests do not cover: lime's text explainer defaults to
``bow=True``, one feature per distinct word; Salience has one feature per word occurrence, as
lime's ``bow=False``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import sklearn.metrics
import torch
from sklearn.linear_model import Ridge

import salience
from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from salience.methods.perturbation import fit_lime, lime_samples, weighted_ridge
from toy import explain_probability

lime_base = require("lime.lime_base")
lime_text = require("lime.lime_text")


def _lime_distances(data: np.ndarray) -> np.ndarray:
    """lime_text's ``distance_fn`` (a closure inside a private method, copied verbatim)."""
    x = scipy.sparse.csr_matrix(data)
    return sklearn.metrics.pairwise.pairwise_distances(x, x[0], metric="cosine").ravel() * 100


def _lime_fit(keep: np.ndarray, labels: np.ndarray, label: int, kernel_width: float, alpha: float,
              distances: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Coefficients in feature order and intercept, as lime fits them."""
    data = keep.astype(np.float64)
    base = lime_text.LimeTextExplainer(kernel_width=kernel_width).base  # lime's own kernel_fn
    intercept, pairs, _, _ = base.explain_instance_with_data(
        data, labels, _lime_distances(data) if distances is None else distances, label, data.shape[1],
        feature_selection="none", model_regressor=Ridge(alpha=alpha))
    coef = np.zeros(data.shape[1])
    for feature, value in pairs:
        coef[feature] = value
    return coef, float(intercept)


def _synthetic_labels(keep: np.ndarray, seed: int) -> np.ndarray:
    """Two-class 'probabilities' with interactions, as a classifier_fn would return them."""
    rng = np.random.default_rng(seed)
    z = keep.astype(np.float64)
    logit = z @ rng.normal(size=z.shape[1]) + 1.5 * z[:, 0] * z[:, 1] - z[:, 2] * z[:, 3]
    p = 1 / (1 + np.exp(-logit))
    return np.column_stack([1 - p, p])


@pytest.mark.parametrize("kernel_width,alpha", [(25.0, 1.0), (10.0, 1.0), (25.0, 0.1), (60.0, 5.0)])
@pytest.mark.parametrize("n_features", [4, 9])
def test_fit_lime_equals_lime_base(kernel_width, alpha, n_features):
    keep = lime_samples(n_features, 300, np.random.default_rng(n_features))
    labels = _synthetic_labels(keep, seed=1)
    coef, intercept = fit_lime(keep, labels[:, 1], kernel_width, alpha)
    expected_coef, expected_intercept = _lime_fit(keep, labels, 1, kernel_width, alpha)
    # closed-form weighted ridge vs sklearn's solver on a <= 9x9 well-conditioned system:
    # agreement to 1e-8 absolute (observed ~1e-15)
    np.testing.assert_allclose(coef, expected_coef, rtol=0, atol=1e-8)
    assert intercept == pytest.approx(expected_intercept, abs=1e-8)


def test_fit_lime_on_lime_own_neighbourhood():
    """Data, labels and distances produced by lime's own (private) sampler; Salience's weights
    recompute the distances from the binary rows and must land on the same fit."""
    text = "w0 w1 w2 w3 w4 w5 w6"
    indexed = lime_text.IndexedString(text, bow=False)
    explainer = lime_text.LimeTextExplainer(bow=False, random_state=0)

    def classifier_fn(strings: list[str]) -> np.ndarray:
        present = np.array([[f"w{i}" in s.split() for i in range(7)] for s in strings])
        return _synthetic_labels(present, seed=2)

    data, labels, distances = explainer._LimeTextExplainer__data_labels_distances(indexed, classifier_fn, 400)
    keep = data.astype(bool)
    coef, intercept = fit_lime(keep, labels[:, 1], 25.0, 1.0)
    expected_coef, expected_intercept = _lime_fit(keep, labels, 1, 25.0, 1.0, distances=distances)
    np.testing.assert_allclose(coef, expected_coef, rtol=0, atol=1e-8)  # observed ~1e-15
    assert intercept == pytest.approx(expected_intercept, abs=1e-8)


@pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR], ids=["text", "pair"])
def test_lime_explanation_equals_lime_base_on_toy(toy, inputs):
    """End to end: Salience's neighbourhood (rebuilt from the same seed), the toy model's
    probabilities with removed words deleted, fitted by lime."""
    n_samples, seed = 200, 3
    e = explain_probability(toy, inputs, "lime", n_samples=n_samples, seed=seed)
    encoded = toy.encode(inputs)
    keep = lime_samples(len(e.features), n_samples, np.random.default_rng(seed))
    rows = torch.as_tensor(keep)
    labels = np.column_stack([
        toy.score_perturbed(encoded, rows, e.features, "delete", salience.Target(c, toy.labels[c])).numpy()
        for c in range(len(toy.labels))
    ])
    expected_coef, expected_intercept = _lime_fit(keep, labels, e.target.index, 25.0, 1.0)
    np.testing.assert_allclose(e.scores, expected_coef, rtol=0, atol=1e-8)  # observed ~1e-16
    assert e.params["intercept"] == pytest.approx(expected_intercept, abs=1e-8)
    assert e.output_value == pytest.approx(labels[0, e.target.index], abs=1e-12)


@pytest.mark.parametrize("n_features", [1, 2, 6])
def test_lime_samples_follow_lime_sampling_law(n_features):
    n_rows = 6001
    keep = lime_samples(n_features, n_rows, np.random.default_rng(0))
    assert keep.shape == (n_rows, n_features) and keep.dtype == bool
    assert keep[0].all()
    removed = (~keep[1:]).sum(1)
    assert removed.min() >= 1 and removed.max() <= n_features
    # k ~ U{1..F}: each count within 5 binomial standard deviations of its expectation (fixed seed)
    counts = np.bincount(removed, minlength=n_features + 1)[1:]
    expected = (n_rows - 1) / n_features
    sd = np.sqrt((n_rows - 1) * (1 / n_features) * (1 - 1 / n_features))
    assert np.all(np.abs(counts - expected) <= 5 * sd + 1e-9)
    # given k, the removed set is uniform: every feature is removed with probability E[k]/F
    p = (n_features + 1) / 2 / n_features
    marginal = (~keep[1:]).sum(0)
    assert np.all(np.abs(marginal - (n_rows - 1) * p) <= 5 * np.sqrt((n_rows - 1) * p * (1 - p)) + 1e-9)


def test_lime_samples_law_matches_lime_sampler():
    """Same law as lime's own sampler: the removed-count histograms of both agree within
    sampling noise (two-sample, 5 standard deviations of the difference of proportions)."""
    n_features, n_rows = 5, 6001
    indexed = lime_text.IndexedString(" ".join(f"w{i}" for i in range(n_features)), bow=False)
    explainer = lime_text.LimeTextExplainer(bow=False, random_state=0)
    data, _, _ = explainer._LimeTextExplainer__data_labels_distances(
        indexed, lambda strings: np.zeros((len(strings), 2)), n_rows)
    theirs = np.bincount(n_features - data[1:].sum(1).astype(int), minlength=n_features + 1) / (n_rows - 1)
    keep = lime_samples(n_features, n_rows, np.random.default_rng(1))
    ours = np.bincount((~keep[1:]).sum(1), minlength=n_features + 1) / (n_rows - 1)
    assert theirs[0] == ours[0] == 0  # neither sampler leaves a row (other than row 0) untouched
    sd = np.sqrt(2 * (1 / n_features) * (1 - 1 / n_features) / (n_rows - 1))
    assert np.all(np.abs(theirs - ours) <= 5 * sd)


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 10.0])
def test_weighted_ridge_equals_sklearn(alpha):
    rng = np.random.default_rng(int(alpha * 1000))
    x = rng.normal(size=(60, 7)) + rng.integers(0, 2, size=(60, 7))
    y = x @ rng.normal(size=7) + 0.3 * rng.normal(size=60) + 2.0
    w = rng.uniform(0.05, 3.0, size=60)
    coef, intercept = weighted_ridge(x, y, w, alpha)
    model = Ridge(alpha=alpha).fit(x, y, sample_weight=w)
    # closed form vs sklearn (which rescales by sqrt(w) and solves by Cholesky): 1e-9 (observed ~1e-14)
    np.testing.assert_allclose(coef, model.coef_, rtol=0, atol=1e-9)
    assert intercept == pytest.approx(float(model.intercept_), abs=1e-9)
