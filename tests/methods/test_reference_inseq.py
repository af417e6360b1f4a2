"""Salience against Inseq (the toolkit people use today for generative LMs) on the tiny float64
Llama: the full prompt x generated-token matrix of saliency and input x gradient.

Inseq explains a given continuation one generated token at a time (a forward and a backward pass
per step, the earlier generated tokens fed back as input); Salience explains every generated token
from one forward pass with batched backward rows. The definitions agree: the output explained is
the probability of each generated token (Inseq's default ``probability`` attributed function,
Salience's ``output="probability"``); the gradient is taken at the word embeddings; the per-token
score sums the embedding dimensions of grad (saliency: of |grad|, as Captum's Saliency that Inseq
calls) or of input x grad. Inseq also scores the beginning-of-sequence token, which Salience does
not take as a feature: that row is dropped before comparing. A target's own position and those after
it (its future, for a causal model) are NaN in both.

Tolerance, per score: 1e-6 x the sum over embedding dimensions of |Inseq's per-dimension value|.
Both compute in float64 (the tiny Llama's norms patched to float64, see
tests/models/test_contrast.py), but Inseq returns its per-dimension attributions cast to float32
(``FeatureAttributionOutput`` is moved to ``torch.float32``): each of the 16 values carries a
relative rounding of at most 6e-8 before they are summed, and input x gradient cancels strongly
(a score of 9e-4 from values whose magnitudes sum to 0.55), so the bound must scale with the
magnitudes summed, not with the score.
"""

from __future__ import annotations

import numpy as np
import pytest

import salience
from models.test_contrast import float64_llama
from oracles import require
from tiny_lm import build_tokenizer

inseq = require("inseq")

PROMPT = "the capital of france is"
CONTINUATION = " paris is a big city"
RELATIVE_TOL = 1e-6


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return float64_llama(), build_tokenizer()


def inseq_matrix(model, tokenizer, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Inseq's (targets, positions) matrix (BOS position dropped, embedding dimensions summed) and
    the sum of its per-dimension magnitudes, which bounds the float32 rounding of each score."""
    wrapped = inseq.load_model(model, method, tokenizer=tokenizer)
    out = wrapped.attribute(PROMPT, generated_texts=PROMPT + CONTINUATION, show_progress=False)
    per_dimension = out.sequence_attributions[0].target_attributions.double()  # (positions, targets, dims), BOS first
    return per_dimension.sum(-1).numpy().T[:, 1:], per_dimension.abs().sum(-1).numpy().T[:, 1:]


@pytest.mark.parametrize("method, inseq_name, params", [("saliency", "saliency", {"abs": True}),
                                                        ("input_x_gradient", "input_x_gradient", {})])
def test_matrix_equals_inseq(model_and_tokenizer, method, inseq_name, params):
    model, tokenizer = model_and_tokenizer
    lm = salience.CausalLM(model, tokenizer, name="tiny-llama")
    ours = salience.explain(lm, PROMPT, method=method, continuation=CONTINUATION, output="probability", **params)
    theirs, magnitude = inseq_matrix(model, tokenizer, inseq_name)
    assert ours.scores.shape == theirs.shape == (5, 10)  # 5 generated tokens x (5 prompt + 5 generated) tokens
    assert np.isnan(theirs).sum() == np.isnan(ours.scores).sum() == 15  # the target itself and what follows it
    assert np.nanmax(np.abs(theirs)) > 1e-2  # the comparison is not between two near-zero matrices
    known = ~np.isnan(theirs)
    error = np.abs(ours.scores[known] - theirs[known])
    assert (error <= RELATIVE_TOL * magnitude[known]).all(), f"largest error / bound: {np.max(error / magnitude[known]):.2e}"
