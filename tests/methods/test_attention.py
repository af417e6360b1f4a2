"""Attention and attention rollout against a hand-written reference on the float64 toy BERT and
(at the end) the tiny float64 Llama, where each target reads the row that predicts its token.

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


# ------------------------------------------------------------------ causal LMs
# A causal LM's target reads the row of the position that predicts its token (position - 1); a span
# target the mean of its tokens' rows. References read the tiny Llama's attention probabilities
# with a plain ``output_attentions=True`` call (eager attention, float64 outside the softmax, which
# transformers computes in float32 on both sides alike): the two sides differ by round-off only.
LM_PROMPT = "the capital of france is"
LM_TOL = 1e-10


@pytest.fixture(scope="module")
def lm():
    from tiny_lm import build_model, build_tokenizer

    return salience.CausalLM(build_model(layers=3), build_tokenizer(), name="tiny-llama")


def lm_attentions(lm, encoded) -> np.ndarray:
    with torch.no_grad():
        output = lm.model(input_ids=encoded.input_ids[None], output_attentions=True)
    return torch.stack(output.attentions)[:, 0].numpy()  # (layers, heads, P, P)


def lm_rows(lm, encoded, spans=None) -> list[list[int]]:
    """Query rows by hand: continuation token k (sequence position start + k) is predicted at start + k - 1."""
    start = encoded.extras["prompt_length"]
    if spans is None:
        return [[p - 1] for p in range(start, encoded.length)]
    return [[start + k - 1 for k in range(a, b)] for a, b in spans]


@pytest.mark.parametrize("layer", ["last", "mean", 0, 2, -2])
def test_lm_attention_reads_the_predicting_row(lm, layer):
    e = salience.explain(lm, LM_PROMPT, continuation=" paris is big", method="attention", layer=layer, level="token")
    encoded = lm.encode(LM_PROMPT, continuation=" paris is big")
    head_mean = lm_attentions(lm, encoded).mean(axis=1)
    matrix = {"last": head_mean[-1], "mean": head_mean.mean(axis=0)}.get(layer)
    matrix = head_mean[layer] if matrix is None else matrix
    expected = np.stack([matrix[r].mean(axis=0) for r in lm_rows(lm, encoded)])
    assert e.token_scores.shape == expected.shape == (3, encoded.length)
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=LM_TOL)
    assert e.params["query_rows"] == lm_rows(lm, encoded)


@pytest.mark.parametrize("residual", [0.5, 0.0, 0.8])
def test_lm_rollout_matches_a_numpy_reference(lm, residual):
    spans = [(0, 1), (1, 3)]
    e = salience.explain(lm, LM_PROMPT, continuation=" paris is big", method="attention_rollout", residual=residual,
                         target_span=spans, output="log_probability", level="token")
    encoded = lm.encode(LM_PROMPT, continuation=" paris is big")
    attentions = lm_attentions(lm, encoded)
    eye = np.eye(encoded.length)
    full = eye
    for weights in attentions:  # the same rule as the BERT reference above, written with matrices
        a = (1 - residual) * weights.mean(axis=0) + residual * eye
        full = (a / a.sum(axis=1, keepdims=True)) @ full
    expected = np.stack([full[r].mean(axis=0) for r in lm_rows(lm, encoded, spans)])
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=LM_TOL)
    np.testing.assert_allclose(e.token_scores.sum(axis=1), 1, rtol=0, atol=LM_TOL)  # rows of row-stochastic products
    assert np.abs(e.token_scores[:, encoded.length - 1]).max() < LM_TOL  # causal: no row reads the last token


def test_lm_attention_switches_sdpa_to_eager_and_back():
    from tiny_lm import build_model, build_tokenizer

    model = build_model(layers=2)
    eager = salience.CausalLM(model, build_tokenizer(), name="tiny-llama")
    reference = salience.explain(eager, LM_PROMPT, continuation=" paris", method="attention_rollout", level="token")
    model.set_attn_implementation("sdpa")
    e = salience.explain(eager, LM_PROMPT, continuation=" paris", method="attention_rollout", level="token")
    np.testing.assert_allclose(e.token_scores, reference.token_scores, rtol=0, atol=LM_TOL)
    assert model.config._attn_implementation == "sdpa"


def test_attention_refuses_a_bad_layer_or_residual(lm):
    with pytest.raises(salience.ParameterError, match="layer must be"):
        salience.explain(lm, LM_PROMPT, continuation=" paris", method="attention", layer=3)
    with pytest.raises(salience.ParameterError, match="layer must be"):
        salience.explain(lm, LM_PROMPT, continuation=" paris", method="attention", layer="first")
    with pytest.raises(salience.ParameterError, match="residual must be"):
        salience.explain(lm, LM_PROMPT, continuation=" paris", method="attention_rollout", residual=1.5)
