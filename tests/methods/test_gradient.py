"""GradientSHAP with noise on: Salience against an estimator written here from its definition,
with the same random draws, on the float64 toy BERT run directly through ``inputs_embeds``.

Definition (Salience's docstring): score_t = mean_i sum_d g_i * (x - b_i), with b_i = the [MASK]
baseline embedding + stdev * noise_i (non-special tokens; [CLS]/[SEP] keep their embedding and
get no noise), g_i = dF/de at b_i + alpha_i (x - b_i); delta = sum of scores - (F(x) - mean_i F(b_i)).
Draws: one CPU generator seeded with ``seed``, first alpha ~ U(0, 1) (n,), then noise ~ N(0, 1)
(n, T, D), both float64.

Captum's GradientShap (and shap's GradientExplainer) add the noise to the INPUT instead:
points b + alpha (x + noise - b), multiplier (x + noise - b). That is a different estimator, so
Captum is not the oracle here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOY_PAIR, TOY_TEXT
from toy import explain_probability


def _probability(model, target: int, types: torch.Tensor | None):
    def forward(embeds: torch.Tensor) -> torch.Tensor:
        kwargs = {} if types is None else {"token_type_ids": types.expand(embeds.shape[0], -1)}
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **kwargs).logits
        return torch.softmax(logits, dim=-1)[:, target]

    return forward


def _expected_gradients(toy, inputs, target: int, *, n: int, stdev: float, seed: int):
    """Token scores (T,), F(x) and mean F(b) by the definition above."""
    encoded = toy.encode(inputs)
    model = toy.model
    table = model.bert.embeddings.word_embeddings.weight.detach()
    x = table[encoded.input_ids]  # (T, D)
    movable = ~encoded.special
    x0 = torch.where(movable[:, None], table[toy.tokenizer.mask_token_id], x)
    generator = torch.Generator().manual_seed(seed)
    alphas = torch.rand(n, generator=generator, dtype=torch.float64)
    noise = torch.randn((n, *x.shape), generator=generator, dtype=torch.float64)
    forward = _probability(model, target, encoded.token_type_ids)
    scores = torch.zeros(x.shape[0], dtype=torch.float64)
    baseline_values = []
    for alpha, eps in zip(alphas, noise):  # one sample at a time: no batching shared with Salience
        b = x0 + stdev * eps * movable[:, None]
        point = (b + alpha * (x - b))[None].requires_grad_(True)
        (gradient,) = torch.autograd.grad(forward(point).sum(), point)
        scores += (gradient[0] * (x - b)).sum(-1) / n
        with torch.no_grad():
            baseline_values.append(float(forward(b[None])[0]))
    with torch.no_grad():
        output = float(forward(x[None])[0])
    return scores.numpy(), output, float(np.mean(baseline_values))


@pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR], ids=["text", "pair"])
@pytest.mark.parametrize("target", [0, 1])
def test_gradient_shap_with_noise_matches_its_definition(toy, inputs, target):
    n, stdev, seed = 12, 0.1, 5  # stdev 0.1: the toy's embedding values have std 0.07 (range -0.2..0.22)
    e = explain_probability(toy, inputs, "gradient_shap", target=target, level="token", n_samples=n, stdev=stdev,
                         baseline="mask", seed=seed)
    expected, output, baseline_value = _expected_gradients(toy, inputs, target, n=n, stdev=stdev, seed=seed)
    scale = np.abs(expected).max()
    # same draws, same float64 graph: only the order of summation differs (round-off, ~1e-15 of the
    # scale). A wrong estimator (noise on the input, multiplier x - mask, no noise) is off by > 1 %.
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=1e-10 * scale)
    # F(x) and mean F(b): probabilities from the same float64 forward passes, round-off only
    assert e.output_value == pytest.approx(output, abs=1e-12)
    assert e.baseline_value == pytest.approx(baseline_value, abs=1e-12)
    assert e.delta == pytest.approx(expected.sum() - (output - baseline_value), abs=1e-10 * scale)
    # the noise matters here: without it the estimate moves by more than the tolerance by far
    quiet, _, _ = _expected_gradients(toy, inputs, target, n=n, stdev=0.0, seed=seed)
    assert np.abs(quiet - expected).max() > 1e-3 * scale
