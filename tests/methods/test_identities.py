"""Mathematical identities every method must satisfy, on the float64 toy classifier."""

from __future__ import annotations

import numpy as np
import pytest

import salience
from conftest import TOY_PAIR, TOY_TEXT


@pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR])
@pytest.mark.parametrize("output", ["probability", "logit"])
def test_ig_adaptive_meets_completeness_tolerance(toy, inputs, output):
    e = salience.explain(toy, inputs, method="ig", output=output, tolerance=0.01)
    gap = e.output_value - e.baseline_value
    # completeness: the scores sum to F(x) - F(baseline) up to the reported delta, which the
    # adaptive rule keeps within 1 % of the gap (or atol 1e-4 when the gap is under 0.01)
    assert e.scores.sum() == pytest.approx(gap + e.delta, abs=1e-10)
    assert abs(e.delta) <= max(0.01 * abs(gap), 1e-4)
    assert not e.warnings


def test_ig_fixed_rule_converges_to_completeness(toy):
    deltas = [abs(salience.explain(toy, TOY_TEXT, method="ig", steps=n, rule="riemann_trapezoid").delta) for n in (4, 16, 256)]
    assert deltas[2] < deltas[1] < deltas[0]
    assert deltas[2] < 1e-3


def test_ig_special_tokens_get_nothing(toy):
    e = salience.explain(toy, TOY_TEXT, method="ig", level="token")
    special = toy.encode(TOY_TEXT).special.numpy()
    assert np.all(e.token_scores[special] == 0)  # baseline keeps them, so (x - x') is exactly 0


def test_sig_exact_equals_path_integral(toy):
    exact = salience.explain(toy, TOY_TEXT, method="sig")
    path = salience.explain(toy, TOY_TEXT, method="sig", form="path", steps=64)
    # Gauss-Legendre with 64 nodes on a smooth integrand: agreement to 1e-3 of the largest score
    np.testing.assert_allclose(path.scores, exact.scores, atol=1e-3 * np.abs(exact.scores).max())
    assert exact.cost.backward_passes == 0
    assert exact.cost.forward_passes == len(exact.features) + 2  # prediction + F(x) + one per word


def test_sig_exact_equals_occlusion_with_same_baseline(toy):
    # moving one word from [MASK] to its embedding changes F by exactly F(x) - F(x, word masked)
    for baseline in ("mask", "pad"):
        sig = salience.explain(toy, TOY_TEXT, method="sig", baseline=baseline)
        loo = salience.explain(toy, TOY_TEXT, method="occlusion", baseline=baseline)
        np.testing.assert_allclose(sig.scores, loo.scores, atol=1e-12)


def test_kernel_shap_exact_is_efficient(toy):
    e = salience.explain(toy, TOY_PAIR, method="kernel_shap")
    assert e.params["exact"] is True
    assert e.scores.sum() == pytest.approx(e.output_value - e.baseline_value, abs=1e-12)


def test_kernel_shap_sampling_converges_to_exact(toy):
    exact = salience.explain(toy, TOY_TEXT, method="kernel_shap", max_exact=13).scores  # 2^13 coalitions
    errors = []
    for n_samples in (128, 4096):
        sampled = salience.explain(toy, TOY_TEXT, method="kernel_shap", max_exact=0, n_samples=n_samples)
        assert sampled.scores.sum() == pytest.approx(sampled.output_value - sampled.baseline_value, abs=1e-9)
        errors.append(np.abs(sampled.scores - exact).max())
    assert errors[1] < errors[0]
    assert errors[1] < 0.06 * np.abs(exact).max()  # measured ~3-4 % over seeds at 4096 coalitions


def test_kernel_shap_with_full_budget_is_exact(toy):
    exact = salience.explain(toy, TOY_PAIR, method="kernel_shap")  # 8 words: enumeration
    full = salience.explain(toy, TOY_PAIR, method="kernel_shap", max_exact=0, n_samples=2**8 - 2)
    np.testing.assert_allclose(full.scores, exact.scores, atol=1e-10)  # same coalitions, exact weights


def test_gradient_shap_without_noise_approaches_ig(toy):
    ig = salience.explain(toy, TOY_TEXT, method="ig", baseline="mask", steps=128)
    gs = salience.explain(toy, TOY_TEXT, method="gradient_shap", baseline="mask", n_samples=8000)
    # Monte Carlo over alpha; the integrand is peaked, so the error falls slowly (measured over
    # seeds: 0.5-4 % of the top score at 8000 samples); allow 6 %
    np.testing.assert_allclose(gs.scores, ig.scores, atol=0.06 * np.abs(ig.scores).max())


def test_attention_rollout_rows_are_distributions(toy):
    for method in ("attention", "attention_rollout"):
        e = salience.explain(toy, TOY_TEXT, method=method, level="token")
        assert e.token_scores.sum() == pytest.approx(1.0, abs=1e-9)
        assert np.all(e.token_scores >= 0)


def test_occlusion_delete_removes_words(toy):
    e = salience.explain(toy, "good film", method="occlusion", baseline="delete")
    only_film = toy.encode("film")
    value = toy.score_perturbed(only_film, __import__("torch").ones(1, 1, dtype=bool), only_film.words, "mask", _target(toy, e))
    assert e.scores[0] == pytest.approx(e.output_value - float(value[0]), abs=1e-12)


def _target(toy, explanation):
    return explanation.target
