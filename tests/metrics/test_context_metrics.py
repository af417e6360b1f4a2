"""Context-attribution metrics on the tiny seeded float64 Llama: top-k removal drop and the linear
datamodeling score against log-probabilities computed by hand (plain model calls on the prompt
rebuilt without the removed sentences: the tiny tokenizer splits on whitespace, so deleting a
sentence's tokens and re-tokenising the shorter text give the same ids), and Spearman = scipy's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import salience
from oracles import require
from salience.core.aggregate import sentence_spans
from salience.methods.context_cite import ablation_masks
from salience.metrics.base import MetricError, evaluate_metric
from salience.metrics.context import spearman
from tiny_lm import build_model, build_tokenizer

CONTEXT = "the capital of france is paris . the river is very old . it was a big city . the film was new ."
QUERY = "the capital of france is ?"
RESPONSE = "it is a small city"
SPANS = sentence_spans(CONTEXT)
TIGHT = 1e-10  # float64: batched rows vs one plain call per row differ by rounding only


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(build_model(context=64), build_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="module")
def explanation(lm) -> salience.Explanation:
    return salience.explain(lm, context=CONTEXT, query=QUERY, continuation=RESPONSE, method="context_cite", n_ablations=16)


def by_hand(lm, kept: np.ndarray) -> float:
    """log p(response | prompt with only the kept sentences), one plain forward pass."""
    context = " ".join(CONTEXT[a:b] for (a, b), keep in zip(SPANS, kept) if keep)
    tokenizer = lm.tokenizer
    prompt = tokenizer(f"Context: {context}\n\nQuery: {QUERY}")["input_ids"]
    response = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_p = torch.log_softmax(lm.model(input_ids=ids).logits[0], dim=-1)
    return float(sum(log_p[len(prompt) + j - 1, token] for j, token in enumerate(response)))


def test_top_k_drop_equals_the_hand_computation(lm, explanation):
    chosen = dataclasses.replace(explanation, scores=np.array([[0.1, 5.0, -1.0, 2.0]]))  # top 2: sentences 1 and 3
    result = evaluate_metric("top_k_drop", lm, chosen, k=2)
    expected = by_hand(lm, np.ones(4, bool)) - by_hand(lm, np.array([True, False, True, False]))
    assert result.details["removed"] == [1, 3]
    assert result.value == pytest.approx(expected, rel=TIGHT, abs=TIGHT)
    assert result.forward_passes == 2 and result.higher_is_better
    ties = dataclasses.replace(explanation, scores=np.array([[1.0, 1.0, 1.0, 1.0]]))
    assert evaluate_metric("top_k_drop", lm, ties, k=9).details["removed"] == [0, 1, 2, 3]  # k capped, input order


def test_the_linear_datamodeling_score_is_spearman_of_the_hand_values(lm, explanation):
    stats = require("scipy.stats")
    result = evaluate_metric("linear_datamodeling_score", lm, explanation, n_ablations=20, seed=7)
    masks = ablation_masks(4, 20, 0.5, np.random.default_rng(7))
    actual = np.array([by_hand(lm, m) for m in masks])
    np.testing.assert_allclose(result.details["log_probability"], actual, rtol=TIGHT, atol=TIGHT)
    predicted = masks @ explanation.scores[0]
    np.testing.assert_allclose(result.details["predicted"], predicted, rtol=1e-12)
    assert result.value == pytest.approx(stats.spearmanr(predicted, actual).statistic, abs=1e-12)
    assert result.forward_passes == 20


def test_spearman_with_ties_equals_scipy():
    stats = require("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 30).astype(float), rng.standard_normal(30)
        b[:6] = b[0]
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_a_generated_response_is_generated_again(lm):
    e = salience.explain(lm, context=CONTEXT, query=QUERY, max_new_tokens=3, method="context_cite", n_ablations=8)
    result = evaluate_metric("top_k_drop", lm, e, k=1)
    assert result.forward_passes == 3 + 2  # decoding again, then the two rows
    assert result.details["log_probability"] == pytest.approx(float(np.sum(e.extras["context_cite"]["log_probs"][0])),
                                                              rel=TIGHT)


def test_bad_input_is_one_line(lm, explanation):
    for params, error, words in [({"k": 0}, salience.ParameterError, "k must be"),
                                 ({"target": 3}, salience.ParameterError, "out of range")]:
        with pytest.raises(error, match=words):
            evaluate_metric("top_k_drop", lm, explanation, **params)
    with pytest.raises(salience.ParameterError, match="n_ablations"):
        evaluate_metric("linear_datamodeling_score", lm, explanation, n_ablations=2)
    flat = dataclasses.replace(explanation, scores=np.zeros((1, 4)))  # every source dropped by the Lasso
    with pytest.raises(MetricError, match="all equal"):
        evaluate_metric("linear_datamodeling_score", lm, flat, n_ablations=8)
    other = dataclasses.replace(explanation, extras={})
    with pytest.raises(MetricError, match="not of a causal LM's response"):
        evaluate_metric("top_k_drop", lm, other)
