"""Attention and attention rollout against a hand-written reference on the float64 toy BERT.

The attention probabilities are read independently of Salience: the saved toy model is loaded
again with ``attn_implementation="eager"`` and run with ``output_attentions=True`` on the
tokenizer's ids. Rollout (Abnar & Zuidema, 2020, "Quantifying attention flow in transformers"):

    A_l = (1 - r) * mean_heads(W_l) + r * I          (r = 0.5 in the paper: the residual connection)
    A_l <- A_l / rowsum(A_l)
    R   = A_L @ A_(L-1) @ ... @ A_1                  (layer 1 first: the last layer multiplies on the left)
    score of token j = R[0, j]                       (flow from token j into [CLS]'s last representation)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import salience
from conftest import TOY_PAIR, TOY_TEXT

INPUTS = pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR], ids=["text", "pair"])


@pytest.fixture(scope="module")
def attentions_of(toy_dir):
    """inputs -> attention probabilities (layers, heads, T, T) from a separately loaded eager model."""
    model = AutoModelForSequenceClassification.from_pretrained(toy_dir, attn_implementation="eager").double().eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_dir)

    def read(inputs) -> np.ndarray:
        texts = (inputs,) if isinstance(inputs, str) else inputs
        with torch.no_grad():
            output = model(**tokenizer(*texts, return_tensors="pt"), output_attentions=True)
        return torch.stack(output.attentions)[:, 0].numpy()

    return read


def rollout(attentions: np.ndarray, residual: float) -> np.ndarray:
    """Row 0 of R = A_L ... A_1 as in the module docstring."""
    eye = np.eye(attentions.shape[-1])
    layers = []
    for weights in attentions:
        a = (1 - residual) * weights.mean(axis=0) + residual * eye
        layers.append(a / a.sum(axis=1, keepdims=True))
    return np.linalg.multi_dot(layers[::-1])[0]


def _word_sums(e, token_scores: np.ndarray) -> list[float]:
    return [token_scores[list(f.tokens)].sum() for f in e.features]


@INPUTS
@pytest.mark.parametrize("layer", ["last", "mean", 0, 1])
def test_attention_is_cls_row_of_the_head_mean(toy, attentions_of, inputs, layer):
    attentions = attentions_of(inputs)  # (2 layers, 2 heads, T, T)
    head_mean = attentions.mean(axis=1)
    expected = {"last": head_mean[-1, 0], "mean": head_mean[:, 0].mean(axis=0)}.get(layer)
    expected = head_mean[layer, 0] if expected is None else expected
    e = salience.explain(toy, inputs, method="attention", layer=layer, level="token")
    # the same float64 attention probabilities; means taken in another order: round-off only
    np.testing.assert_allclose(e.token_scores, expected, rtol=1e-12, atol=1e-15)
    word = salience.explain(toy, inputs, method="attention", layer=layer)
    np.testing.assert_allclose(word.scores, _word_sums(word, expected), rtol=1e-12, atol=1e-15)


@INPUTS
@pytest.mark.parametrize("residual", [0.5, 0.0, 0.8])
def test_attention_rollout_matches_abnar_zuidema(toy, attentions_of, inputs, residual):
    attentions = attentions_of(inputs)
    expected = rollout(attentions, residual)
    e = salience.explain(toy, inputs, method="attention_rollout", residual=residual, level="token")
    # float64 products of two T x T matrices: round-off ~1e-16
    np.testing.assert_allclose(e.token_scores, expected, rtol=1e-12, atol=1e-15)
    word = salience.explain(toy, inputs, method="attention_rollout", residual=residual)
    np.testing.assert_allclose(word.scores, _word_sums(word, expected), rtol=1e-12, atol=1e-15)


def test_rollout_reference_is_not_trivial(attentions_of):
    """The reference itself distinguishes the variants a wrong rollout would compute."""
    attentions = attentions_of(TOY_TEXT)
    paper = rollout(attentions, 0.5)
    assert abs(paper.sum() - 1) < 1e-12  # products of row-stochastic matrices stay row-stochastic
    wrong_order = np.linalg.multi_dot([(a.mean(0) + np.eye(len(paper))) / 2 for a in attentions])[0]
    for variant in (rollout(attentions, 0.0), wrong_order, attentions.mean(1)[-1, 0]):
        assert np.abs(variant - paper).max() > 1e-3
