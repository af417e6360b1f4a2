"""Adaptive IG keeps its promise per feature: every feature's score is within the reported
``error_bound`` of the converged integral, and the bound is within the tolerance. The reference is
computed independently: Captum's LayerIntegratedGradients with many Gauss-Legendre steps on the
word-embedding layer of the float64 toy BERT (probability of the target class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from salience.methods.quadrature import gauss_kronrod_15
from toy import explain_probability

captum_attr = require("captum.attr")

TEXTS = [TOY_TEXT, TOY_PAIR, "a very good film but the actor was awful", "boring story , superb actor"]


def _captum_reference(toy, inputs, target, steps=512):
    encoded = toy.encode(inputs)
    ids, types = encoded.input_ids[None], encoded.token_type_ids[None]
    model = toy.model

    def forward(input_ids, token_type_ids):
        logits = model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=torch.ones_like(input_ids)).logits
        return torch.softmax(logits, dim=-1)

    baseline = torch.where(encoded.special[None], ids, toy.tokenizer.pad_token_id)
    ig = captum_attr.LayerIntegratedGradients(forward, model.bert.embeddings.word_embeddings)
    scores = ig.attribute(ids, baselines=baseline, target=target, n_steps=steps, method="gausslegendre",
                          additional_forward_args=(types,), internal_batch_size=256)
    return scores[0].sum(-1).detach().double().numpy()


@pytest.mark.parametrize("inputs", TEXTS, ids=["toy", "pair", "mixed", "short"])
def test_every_feature_within_its_reported_bound(toy, inputs):
    e = explain_probability(toy, inputs, method="ig", level="token", tolerance=0.01)
    reference = _captum_reference(toy, inputs, e.target.index)
    expected = reference[[f.tokens[0] for f in e.features]]
    error = np.abs(e.scores - expected)
    # Captum casts its quadrature weights to float32 (~1e-7 of the largest score, see
    # test_reference_captum.py); 512 Gauss-Legendre nodes are converged far below that
    slack = 1e-6 * np.abs(expected).max()
    assert error.max() <= e.params["error_bound"] + slack
    assert e.params["error_bound"] <= max(0.01 * np.abs(e.scores).max(), e.params["atol"])
    assert e.params["steps_used"] % 15 == 0 and not e.warnings


def test_bound_tightens_with_the_tolerance(toy):
    loose = explain_probability(toy, TOY_TEXT, method="ig", level="token", tolerance=0.05)
    # the toy's path is smooth: 2 pieces already bound every token by 6e-5 of the top score; 1e-6 needs more
    tight = explain_probability(toy, TOY_TEXT, method="ig", level="token", tolerance=1e-6, atol=1e-14)
    reference = _captum_reference(toy, TOY_TEXT, tight.target.index)[[f.tokens[0] for f in tight.features]]
    assert tight.params["steps_used"] > loose.params["steps_used"]
    assert tight.params["error_bound"] <= 1e-6 * np.abs(tight.scores).max() < loose.params["error_bound"]
    # against Captum's float32-weighted reference the comparison cannot resolve below ~1e-7 of the top score
    assert np.abs(tight.scores - reference).max() <= tight.params["error_bound"] + 1e-6 * np.abs(reference).max()


def test_max_steps_stops_with_a_warning(toy):
    with pytest.warns(salience.SalienceWarning, match="max_steps"):
        e = explain_probability(toy, TOY_TEXT, method="ig", tolerance=1e-12, atol=0.0, max_steps=60)
    assert e.params["steps_used"] <= 60


def test_gauss_kronrod_pair_is_exact_on_polynomials():
    alphas, kronrod, gauss = gauss_kronrod_15()
    for degree in range(24):
        exact = 1.0 / (degree + 1)  # integral of a^degree over [0, 1]
        assert abs(kronrod @ alphas**degree - exact) < 1e-15  # K15: degree 3n + 1 = 22 (23 too, by symmetry)
        assert (abs(gauss @ alphas**degree - exact) < 1e-15) == (degree <= 13)  # G7: degree 2n - 1 = 13
    assert np.count_nonzero(gauss) == 7 and np.isclose(kronrod.sum(), 1) and np.isclose(gauss.sum(), 1)
