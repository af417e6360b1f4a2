"""Salience's Sequential Integrated Gradients against time-interpret 0.3 (``tint.attr``).

What tint computes (tint/attr/seq_ig.py, read for this test): for every position ``idx`` along
dimension 1 of the input -- every token, special ones included -- one IG path on which only
position ``idx`` moves, ``baseline[:, idx] + alpha (input[:, idx] - baseline[:, idx])``, all other
positions fixed at the input; alphas and weights come from Captum's ``approximation_parameters``
(the same rules as Salience's, see below); the result is ``sum_k w_k grad(alpha_k) * (input -
baseline)`` kept at ``idx``. Baselines are a tensor of the input's shape. So with

- the forward function taking word embeddings (B, T, D) as ``inputs_embeds`` (the BERT embedding
  block then adds positions and token types, as after the word-embedding layer in Salience),
- the baseline = the input embeddings with every non-special token's row set to the [MASK]
  embedding ([CLS]/[SEP] rows equal to the input, so tint gives them exactly 0),

tint's per-token scores summed over the embedding dimension are Salience's ``form="path"``
token scores at ``level="token"``, and, as the step count grows, Salience's ``form="exact"``
scores F(x) - F(x with that token masked).

Differences, by design, not tested as equalities:
- tint moves ONE TOKEN at a time; Salience at ``level="word"`` moves all subword tokens of a word
  together (e.g. "unbelievable" = un ##believ ##able), so word scores of multi-token words are not
  sums of tint's token scores. Words of one token are compared.
- tint's convergence delta is sum(scores) - (F(x) - F(ALL tokens masked)), a completeness gap SIG
  does not promise to close; Salience's ``delta`` is sum(path scores) - sum(exact scores), the
  quadrature error. The relation between them is checked instead.
- Captum's ``riemann_trapezoid`` weights sum to (n - 1)/n (1/n each, ends halved), so tint's
  trapezoid is the true trapezoid rule x (n - 1)/n: Salience == tint x n/(n - 1) there.
- tint builds its weights with ``torch.tensor(step_sizes)`` (float32 by default) and Captum's
  Riemann nodes with float32 ``torch.linspace``; agreement is therefore ~1e-8 relative, not 1e-15.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from toy import explain_probability

tint_attr = require("tint.attr")

INPUTS = pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR], ids=["text", "pair"])
STEPS = 50


def _forward_embeds(model):
    def forward(embeds: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        return torch.softmax(model(inputs_embeds=embeds, token_type_ids=token_type_ids, attention_mask=mask).logits, dim=-1)

    return forward


def _tint_sig(toy, inputs, target, *, steps, rule="gausslegendre"):
    """tint's SIG scores per token (T,), summed over the embedding dimension, and its delta."""
    encoded = toy.encode(inputs)
    ids, types = encoded.input_ids[None], encoded.token_type_ids[None]
    words = toy.model.bert.embeddings.word_embeddings
    with torch.no_grad():
        embeds = words(ids)
        mask_row = words(torch.tensor([toy.tokenizer.mask_token_id]))[0]
    baseline = torch.where(encoded.special[None, :, None], embeds, mask_row)
    explainer = tint_attr.SequentialIntegratedGradients(_forward_embeds(toy.model))
    attributions, delta = explainer.attribute(embeds, baselines=baseline, target=target, additional_forward_args=(types,),
                                              n_steps=steps, method=rule, return_convergence_delta=True)
    return attributions[0].sum(-1).detach().numpy(), float(delta[0]), encoded


@INPUTS
@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_sig_path_form_matches_tint(toy, inputs, rule):
    e = explain_probability(toy, inputs, "sig", level="token", form="path", steps=STEPS, rule=rule, baseline="mask")
    expected, _, encoded = _tint_sig(toy, inputs, e.target.index, steps=STEPS, rule=rule)
    if rule == "riemann_trapezoid":
        expected = expected * STEPS / (STEPS - 1)  # Captum's trapezoid weights sum to (n - 1)/n
    special = encoded.special.numpy()
    assert np.all(expected[special] == 0) and np.all(e.token_scores[special] == 0)
    # same path, same nodes; tint's float32 weights/nodes: 1e-6 of the largest score
    # (observed <= 5e-9 of it for gausslegendre, <= 8e-8 for the Riemann rules' float32 nodes)
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@INPUTS
def test_sig_exact_form_is_tints_limit(toy, inputs):
    """Salience's exact form (features + 1 forward passes) equals tint's path integral once the
    quadrature has converged; on these inputs 200 Gauss-Legendre nodes suffice."""
    e = explain_probability(toy, inputs, "sig", level="token", form="exact", baseline="mask")
    expected, _, encoded = _tint_sig(toy, inputs, e.target.index, steps=200)
    non_special = ~encoded.special.numpy()
    # quadrature error at 200 nodes + float32 weights: 1e-6 of the largest score (observed <= 6e-9)
    np.testing.assert_allclose(e.scores, expected[non_special], rtol=0, atol=1e-6 * np.abs(e.scores).max())


@INPUTS
def test_sig_word_level_single_token_words_match_tint(toy, inputs):
    """At level="word" a one-token word's path is tint's path for that token; multi-token words
    move together in Salience and are left out (see the module docstring)."""
    e = explain_probability(toy, inputs, "sig", level="word", form="path", steps=STEPS, baseline="mask")
    expected, _, _ = _tint_sig(toy, inputs, e.target.index, steps=STEPS)
    single = [i for i, f in enumerate(e.features) if len(f.tokens) == 1]
    assert len(single) >= len(e.features) - 1
    np.testing.assert_allclose(e.scores[single], [expected[e.features[i].tokens[0]] for i in single],
                               rtol=0, atol=1e-6 * np.abs(expected).max())


@INPUTS
def test_sig_deltas_relate_as_documented(toy, inputs):
    """tint's delta: sum(path scores) - (F(x) - F(all masked)); Salience's: sum(path scores) -
    sum(exact scores). Same path scores, so the two differ by sum(exact) - (F(x) - F(all masked))."""
    path = explain_probability(toy, inputs, "sig", level="token", form="path", steps=STEPS, baseline="mask")
    exact = explain_probability(toy, inputs, "sig", level="token", form="exact", baseline="mask")
    expected, tint_delta, encoded = _tint_sig(toy, inputs, path.target.index, steps=STEPS)
    keep_none = torch.zeros(1, len(exact.features), dtype=torch.bool)
    all_masked = float(toy.score_perturbed(encoded, keep_none, exact.features, "mask", exact.target)[0])
    gap = exact.output_value - all_masked
    scale = np.abs(expected).sum()
    assert path.delta == pytest.approx(path.token_scores.sum() - exact.scores.sum(), abs=1e-12)
    # float32 weights in tint: 1e-6 of the summed |scores|
    assert tint_delta == pytest.approx(path.delta + exact.scores.sum() - gap, abs=1e-6 * scale)
