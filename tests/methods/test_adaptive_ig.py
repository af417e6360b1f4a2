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


def test_each_target_refines_its_own_pieces():
    """With several targets each one's pieces are bisected by its own bounds: its row, its bound
    and its gradient count equal a run on that target alone (no target's completeness check fails
    here, so none looks at where the others refined), a smooth target is not refined for a peaky
    one, and the forward pass of a path point is shared by the targets that need it."""
    from tiny_lm import build_model, build_tokenizer

    lm = salience.CausalLM(build_model(), build_tokenizer(), name="tiny-llama")
    options = {"method": "ig", "continuation": "and it was new", "output": "probability", "baseline": "unk",
               "tolerance": 1e-5, "atol": 1e-14}
    every = salience.explain(lm, "the city is very old", **options)
    steps = every.params["steps_per_target"]
    assert len(steps) == 4 and len(set(steps)) > 1  # the targets needed different refinements
    assert every.params["steps_used"] == max(steps) and not every.warnings
    for t in range(4):
        alone = salience.explain(lm, "the city is very old", target=[t], **options)
        # float64 model; the same path points in other batches: rounding only
        np.testing.assert_allclose(every.scores[t], alone.scores[0], rtol=1e-9, atol=1e-13, equal_nan=True)
        assert alone.params["steps_used"] == steps[t]
        assert np.isclose(every.params["error_bound"][t], alone.params["error_bound"], rtol=1e-9, atol=1e-16)
    # each target's gradients are backward rows of its own; a point's forward row serves all the
    # targets that need it (the 2 extra forward rows: F at the baseline and at the input)
    assert every.cost.backward_passes == sum(steps)
    assert max(steps) + 2 <= every.cost.forward_passes < sum(steps)


class _Step(torch.nn.Module):
    """Logits (k (w . x - c), 0): class 0's probability is a sigmoid of w . x. With ``soft``, the
    logits are instead (sigmoid(k (w . x - c)), sigmoid(soft (w . x - c))): two steps at the same
    place, the second ``k / soft`` times wider."""

    def __init__(self, w: torch.Tensor, k: float, c: float, soft: float | None = None) -> None:
        super().__init__()
        self.w, self.k, self.c, self.soft = torch.nn.Parameter(w, requires_grad=False), k, c, soft  # float64: the adapter follows it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w
        if self.soft is not None:
            return torch.stack([torch.sigmoid(self.k * (s - self.c)), torch.sigmoid(self.soft * (s - self.c))], dim=-1)
        return torch.stack([self.k * (s - self.c), torch.zeros_like(s)], dim=-1)


def _step_model(sharp: float = 2000, soft: float | None = None):
    """The step at alpha = 0.37 of the path from the zero baseline to a seeded 4 x 4 image, about
    1/``sharp`` wide (and, with ``soft``, a second logit stepping there 1/``soft`` wide)."""
    from salience.models.image import ImageClassifier

    torch.manual_seed(0)
    w, x = torch.rand(16, dtype=torch.float64) + 0.5, torch.rand(1, 4, 4, dtype=torch.float64)
    s = float(x.flatten() @ w)
    soft = None if soft is None else soft / s
    return ImageClassifier(_Step(w, sharp / s, 0.37 * s, soft), labels=["a", "b"], input_shape=(1, 4, 4), name="step"), x, w, s


def test_a_peak_every_node_misses_is_found_by_the_completeness_check():
    """Along the path from the zero baseline, class 0's probability steps from 0 to 1 within about
    1/2000 of alpha at alpha = 0.37, where none of the first 30 nodes comes within 0.018 of it: the
    integrand is 0 to machine precision at every one of them, so K15 = G7 = 0 and the per-feature
    bound alone would accept all-zero scores. The completeness delta (-1) cannot pass, the widest
    pieces are bisected until nodes land on the peak, and the bound then resolves it. The exact
    answer: the gradient's direction is constant (w), so feature i gets x_i w_i / (w . x) of the gap."""
    model, x, w, s = _step_model()
    e = salience.explain(model, x, "ig", target=0, output="probability", baseline="mean", max_steps=2000)
    gap = float(e.output_value - e.baseline_value)
    assert gap == pytest.approx(1.0, abs=1e-12)
    exact = (x.flatten() * w / s * gap).numpy()
    assert e.params["steps_used"] > 30 and not e.warnings
    # every feature within the requested 1 % of the largest score (the bound holds once the peak is resolved)
    assert np.abs(e.scores - exact).max() <= 0.01 * np.abs(exact).max()
    assert abs(float(e.delta)) <= 0.01 * np.abs(exact).max()


def test_a_missed_peak_is_sought_first_where_other_targets_refined():
    """Two logits step at alpha = 0.37: target 0's step (1/20000 wide) escapes its first nodes,
    target 1's (1/2000 wide) does not, so target 1 refines around it. Target 0's delta fails; its
    blind search (widest pieces first) waits while target 1 refines, then bisects the pieces that
    hold target 1's piece ends: a fraction of the gradients the blind search alone needs (the
    target explained alone), the same accuracy (the exact answer as in the test above)."""
    model, x, w, s = _step_model(sharp=20000, soft=2000)
    both = salience.explain(model, x, "ig", target=[0, 1], output="logit", baseline="mean", max_steps=4000)
    alone = salience.explain(model, x, "ig", target=0, output="logit", baseline="mean", max_steps=4000)
    assert not both.warnings and not alone.warnings
    assert 3 * both.params["steps_per_target"][0] < alone.params["steps_used"]
    for scores, e in ((both.scores[0], both), (alone.scores, alone)):
        gap = float(np.atleast_1d(e.output_value)[0] - np.atleast_1d(e.baseline_value)[0])
        assert gap == pytest.approx(1.0, abs=1e-9)
        exact = (x.flatten() * w / s * gap).numpy()
        assert np.abs(scores - exact).max() <= 0.01 * np.abs(exact).max()
