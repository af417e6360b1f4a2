"""Salience's gradient methods against Captum 0.9 on the float64 toy BERT.

Conventions under test: attributions live at the OUTPUT of ``bert.embeddings.word_embeddings``
(before position and token-type embeddings are added), are summed over the embedding dimension,
and explain the softmax probability of the target class. Baselines replace non-special tokens only.

Captum is run on the Hugging Face model directly, by two independent routes (neither uses
Salience's hook): ``Saliency`` on a forward function that feeds ``inputs_embeds`` to the model (the
BERT embedding block adds positions and token types to ``inputs_embeds`` exactly as it does to the
word-embedding output), and ``LayerGradientXActivation`` / ``LayerIntegratedGradients`` on the
word-embedding module with token ids as inputs.

Two Captum facts set the tolerances and one comparison:
- Captum's IG casts its quadrature weights to float32 (``torch.tensor(step_sizes).float()``) and
  builds its Riemann nodes with ``torch.linspace`` in the default float32; Salience uses float64
  throughout. So IG agrees to ~1e-7 of the largest score, not to float64 round-off.
- Captum's ``riemann_trapezoid`` weights are 1/n with the two ends halved, at nodes
  linspace(0, 1, n): they sum to (n - 1)/n, i.e. Captum's trapezoid is the trapezoid rule times
  (n - 1)/n. Salience uses the true trapezoid rule (weights 1/(n - 1), ends halved), so Salience ==
  Captum x n/(n - 1) for that rule (and its completeness delta differs accordingly).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from toy import explain_probability

captum_attr = require("captum.attr")

INPUTS = pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR], ids=["text", "pair"])
STEPS = 50


def _encoded(toy, inputs):
    encoded = toy.encode(inputs)
    return encoded, encoded.input_ids[None], encoded.token_type_ids[None]


def _forward_ids(model):
    """Probabilities (B, C) from token ids, all tokens attended (as Salience runs the model)."""

    def forward(input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=torch.ones_like(input_ids)).logits
        return torch.softmax(logits, dim=-1)

    return forward


def _forward_embeds(model):
    """Probabilities (B, C) from word embeddings (B, T, D) passed as ``inputs_embeds``."""

    def forward(embeds: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        return torch.softmax(model(inputs_embeds=embeds, token_type_ids=token_type_ids, attention_mask=mask).logits, dim=-1)

    return forward


def _pad_baseline(toy, encoded, ids):
    """Captum baseline ids: every non-special token replaced by [PAD], [CLS]/[SEP] kept."""
    return torch.where(encoded.special[None], ids, toy.tokenizer.pad_token_id)


@INPUTS
@pytest.mark.parametrize("target", [0, 1])
def test_saliency_matches_captum_saliency(toy, inputs, target):
    e = explain_probability(toy, inputs, "saliency", target=target, level="token")
    encoded, ids, types = _encoded(toy, inputs)
    model = toy.model
    embeds = model.bert.embeddings.word_embeddings(ids).detach().requires_grad_(True)
    reference = captum_attr.Saliency(_forward_embeds(model)).attribute(embeds, target=target, abs=True,
                                                                      additional_forward_args=(types,))
    expected = reference[0].sum(-1).detach().numpy()  # one score per token, special ones included
    assert e.token_scores.shape == expected.shape
    # same float64 graph, same gradient: only summation-order round-off (observed: 0.0 exactly)
    np.testing.assert_allclose(e.token_scores, expected, rtol=1e-12, atol=1e-14)
    # word level: subword scores summed per word
    np.testing.assert_allclose(e.scores, [expected[list(f.tokens)].sum() for f in e.features], rtol=1e-12, atol=1e-14)


def salience_noise(seed: int, n_samples: int, shape: torch.Size) -> torch.Tensor:
    """Standard normal draws (n_samples, *shape) as Salience documents them: ``torch.randn`` in
    float64 from a CPU generator seeded with the explanation's seed."""
    return torch.randn((n_samples, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@INPUTS
@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("variant, nt_type", [("smoothgrad", "smoothgrad"), ("squared", "smoothgrad_sq"), ("vargrad", "vargrad")])
def test_smoothgrad_matches_captum_noise_tunnel(toy, inputs, target, variant, nt_type, monkeypatch):
    """Captum's NoiseTunnel(Saliency) (mean, mean of squares, variance), fed Salience's noise draws: Captum draws
    its noise with one ``torch.normal(0, stdev expanded to (n, T, D))`` call, which the test answers
    with the same standard normal draws times the same stdev.

    Only ``abs=True``: BERT's embedding LayerNorm makes every token's gradient orthogonal to the
    all-ones vector (adding a constant to all dimensions changes nothing), so signed gradients
    summed over the embedding dimension are 0 up to round-off and would compare zeros."""
    n, level, seed = 6, 0.15, 3
    e = explain_probability(toy, inputs, "smoothgrad", target=target, level="token", n_samples=n, noise_level=level,
                            seed=seed, variant=variant)
    encoded, ids, types = _encoded(toy, inputs)
    model = toy.model
    embeds = model.bert.embeddings.word_embeddings(ids).detach()
    stdev = level * float(embeds.max() - embeds.min())  # the SmoothGrad paper: noise level x (max - min) of the input
    noise = salience_noise(seed, n, embeds.shape[1:])
    calls = []

    def same_noise(mean, std):
        calls.append(std.shape)
        # Captum passes stdev as a float32 tensor; the float64 value is used so that both sides
        # add exactly the same noise
        assert mean == 0 and torch.allclose(std.double(), torch.full_like(noise, stdev))
        return stdev * noise

    monkeypatch.setattr(torch, "normal", same_noise)
    tunnel = captum_attr.NoiseTunnel(captum_attr.Saliency(_forward_embeds(model)))
    reference = tunnel.attribute(embeds.requires_grad_(True), nt_type=nt_type, nt_samples=n, stdevs=stdev,
                                 target=target, abs=True, additional_forward_args=(types,))
    monkeypatch.undo()
    assert calls == [noise.shape]  # one draw of all samples: the noise was Salience's
    expected = reference[0].sum(-1).detach().numpy()
    # same float64 inputs and gradients; only the order of the mean over samples differs (round-off;
    # VarGrad's difference of two means loses a few more digits)
    np.testing.assert_allclose(e.token_scores, expected, rtol=1e-9, atol=1e-14)
    assert np.abs(expected).max() > (1e-3 if variant == "smoothgrad" else 1e-7)  # not a comparison of zeros


@INPUTS
@pytest.mark.parametrize("target", [0, 1])
def test_input_x_gradient_matches_captum_layer_gradient_x_activation(toy, inputs, target):
    e = explain_probability(toy, inputs, "input_x_gradient", target=target, level="token")
    encoded, ids, types = _encoded(toy, inputs)
    model = toy.model
    layer = captum_attr.LayerGradientXActivation(_forward_ids(model), model.bert.embeddings.word_embeddings)
    expected = layer.attribute(ids, target=target, additional_forward_args=(types,))[0].sum(-1).detach().numpy()
    # float64 on both sides, identical computation: round-off only (observed: 0.0 exactly)
    np.testing.assert_allclose(e.token_scores, expected, rtol=1e-12, atol=1e-14)


def _captum_ig(toy, inputs, target, rule):
    encoded, ids, types = _encoded(toy, inputs)
    model = toy.model
    forward = _forward_ids(model)
    baseline = _pad_baseline(toy, encoded, ids)
    lig = captum_attr.LayerIntegratedGradients(forward, model.bert.embeddings.word_embeddings)
    attributions, delta = lig.attribute(ids, baselines=baseline, target=target, additional_forward_args=(types,),
                                        n_steps=STEPS, method=rule, return_convergence_delta=True)
    with torch.no_grad():
        ends = (float(forward(ids, types)[0, target]), float(forward(baseline, types)[0, target]))
    return attributions[0].sum(-1).detach().numpy(), float(delta[0]), ends


@pytest.mark.filterwarnings("ignore::salience.SalienceWarning")  # 50 Riemann steps: large delta, expected
@INPUTS
@pytest.mark.parametrize("target", [0, 1])
@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_integrated_gradients_matches_captum_layer_ig(toy, inputs, target, rule):
    e = explain_probability(toy, inputs, "integrated_gradients", target=target, level="token", steps=STEPS, rule=rule,
                         baseline="pad")
    expected, captum_delta, (f_x, f_baseline) = _captum_ig(toy, inputs, target, rule)
    scale = np.abs(expected).max()
    # Captum's float32 quadrature weights (and float32 Riemann nodes) give ~6e-8 relative error per
    # weight; 1e-6 of the largest score leaves margin (observed: gausslegendre <= 1.4e-8 of it,
    # Riemann rules, whose float32 nodes also move, <= 1.8e-7 of it).
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=1e-6 * scale)
    special = toy.encode(inputs).special.numpy()
    assert np.all(expected[special] == 0) and np.all(e.token_scores[special] == 0)
    # the path ends: F(x) and F(baseline) evaluated by Captum's forward on ids (float64, round-off only)
    assert e.output_value == pytest.approx(f_x, abs=1e-12)
    assert e.baseline_value == pytest.approx(f_baseline, abs=1e-12)
    # completeness delta = sum of scores - (F(x) - F(x')): differs only through the summed scores
    assert e.delta == pytest.approx(captum_delta, abs=1e-6 * np.abs(expected).sum())


@pytest.mark.filterwarnings("ignore::salience.SalienceWarning")
@INPUTS
@pytest.mark.parametrize("target", [0, 1])
def test_integrated_gradients_trapezoid_is_captum_rescaled(toy, inputs, target):
    """Captum's trapezoid = true trapezoid x (n - 1)/n (its weights sum to (n - 1)/n), so
    Salience == Captum x n/(n - 1) and Salience's delta is computed from the rescaled sum."""
    e = explain_probability(toy, inputs, "integrated_gradients", target=target, level="token", steps=STEPS,
                         rule="riemann_trapezoid", baseline="pad")
    expected, captum_delta, (f_x, f_baseline) = _captum_ig(toy, inputs, target, "riemann_trapezoid")
    factor = STEPS / (STEPS - 1)
    # float32 nodes and weights in Captum: 1e-6 of the largest score (observed ~1.2e-7 of it)
    np.testing.assert_allclose(e.token_scores, factor * expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    gap = f_x - f_baseline
    assert e.delta == pytest.approx(factor * (captum_delta + gap) - gap, abs=1e-6 * np.abs(expected).sum())
