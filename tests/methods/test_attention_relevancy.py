"""attention_relevancy (Chefer, Gur & Wolf, 2021) against a hand-written reference.

The reference follows the authors' code (hila-chefer/Transformer-MM-Explainability: the ViT
notebook's ``generate_relevance`` with ``avg_heads`` and ``apply_self_attention_rules``), one
target at a time: one forward pass with ``output_attentions=True``, then for each target
``torch.autograd.grad(y_t, attentions)`` and

    cam_l = (grad_l * A_l).clamp(min=0).mean(heads)
    R = I;  R += cam_l @ R   for l = 1 .. L
    score = R[q, :]          (q: [CLS] for a classifier, position - 1 for a causal LM's token)

Salience computes every target's gradient from one forward pass (vmapped backward rows). The two
sides run the same float64 model (transformers' float32 softmax and RMSNorm steps are the same on
both sides), so they differ by summation order only: tolerance 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_PAIR, TOY_TEXT
from tiny_cnn import photo, tiny_classifier
from tiny_lm import build_model, build_tokenizer

PROMPT = "the capital of france is"
TOL = 1e-10


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(build_model(layers=3), build_tokenizer(), name="tiny-llama")


def reference(attentions: tuple[torch.Tensor, ...], outputs: list[torch.Tensor], rows: list[list[int]]) -> np.ndarray:
    """(T, P) Chefer relevancy, one autograd.grad per target."""
    size = attentions[0].shape[-1]
    result = []
    for y, r in zip(outputs, rows):
        grads = torch.autograd.grad(y, attentions, retain_graph=True)
        relevance = torch.eye(size, dtype=torch.float64)
        for a, g in zip(attentions, grads):
            cam = (g[0] * a[0]).clamp(min=0).mean(dim=0)
            relevance = relevance + cam @ relevance
        result.append(relevance[r].mean(dim=0).detach().numpy())
    return np.stack(result)


def lm_reference(lm: salience.CausalLM, encoded, read) -> np.ndarray:
    """Reference on the LM: ``read(logits (P, V), position)`` gives target k's output."""
    output = lm.model(input_ids=encoded.input_ids[None], output_attentions=True)
    start = encoded.extras["prompt_length"]
    positions = range(start, encoded.length)
    outputs = [read(output.logits[0].double(), p) for p in positions]
    return reference(output.attentions, outputs, [[p - 1] for p in positions])


@pytest.mark.parametrize("output", ["log_probability", "logit", "probability"])
def test_lm_matches_the_per_target_reference(lm, output):
    e = salience.explain(lm, PROMPT, continuation=" paris is big .", method="attention_relevancy", output=output, level="token")
    encoded = lm.encode(PROMPT, continuation=" paris is big .")
    ids = encoded.input_ids

    def read(logits: torch.Tensor, p: int) -> torch.Tensor:
        row = logits[p - 1]
        values = {"logit": row, "log_probability": torch.log_softmax(row, -1), "probability": torch.softmax(row, -1)}[output]
        return values[ids[p]]

    expected = lm_reference(lm, encoded, read)
    assert e.token_scores.shape == expected.shape == (4, encoded.length)
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=TOL * max(1.0, np.abs(expected).max()))
    assert (expected >= 0).all() and np.ptp(expected[:, :-1]) > 1e-3  # non-negative, and not a constant row
    assert e.cost.forward_passes == 1 and e.cost.backward_passes == 4 and e.cost.model_calls == 1


def test_lm_contrast_and_remove_identity(lm):
    e = salience.explain(lm, PROMPT, continuation=" paris", contrast=" city", method="attention_relevancy",
                         output="logit", remove_identity=True, level="token")
    encoded = lm.encode(PROMPT, continuation=" paris")
    paris, city = (lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" paris", " city"))
    expected = lm_reference(lm, encoded, lambda logits, p: logits[p - 1, paris] - logits[p - 1, city])
    expected[0, encoded.length - 2] -= 1  # (R - I) at the query row q = P - 2
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=TOL * max(1.0, np.abs(expected).max()))


def test_lm_span_target_reads_the_mean_of_its_rows(lm):
    e = salience.explain(lm, PROMPT, continuation=" paris is big", target_span=(0, 3), output="log_probability",
                         method="attention_relevancy", level="token")
    encoded = lm.encode(PROMPT, continuation=" paris is big")
    output = lm.model(input_ids=encoded.input_ids[None], output_attentions=True)
    start, ids = encoded.extras["prompt_length"], encoded.input_ids
    log_p = torch.log_softmax(output.logits[0].double(), -1)
    span = sum(log_p[p - 1, ids[p]] for p in range(start, encoded.length))
    expected = reference(output.attentions, [span], [[p - 1 for p in range(start, encoded.length)]])
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=TOL)


def test_lm_groups_of_targets_equal_one_group(lm):
    one = salience.explain(lm, PROMPT, continuation=" paris is big .", method="attention_relevancy", batch_size=1)
    all_ = salience.explain(lm, PROMPT, continuation=" paris is big .", method="attention_relevancy", batch_size=64)
    np.testing.assert_allclose(one.scores, all_.scores, rtol=0, atol=TOL, equal_nan=True)


@pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR], ids=["text", "pair"])
@pytest.mark.parametrize("output", ["probability", "log_odds"])
def test_classifier_matches_the_reference_at_cls(toy, inputs, output):
    e = salience.explain(toy, inputs, method="attention_relevancy", output=output, level="token")
    texts = (inputs,) if isinstance(inputs, str) else inputs
    batch = toy.tokenizer(*texts, return_tensors="pt")
    toy.model.set_attn_implementation("eager")
    result = toy.model(**batch, output_attentions=True)
    logits = result.logits[0]
    target = e.targets[0].index
    y = torch.softmax(logits, -1)[target] if output == "probability" else logits[target] - logits[1 - target]  # two classes
    expected = reference(result.attentions, [y], [[0]])[0]
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(e.scores, [expected[list(f.tokens)].sum() for f in e.features], rtol=0, atol=TOL)


def test_state_restored_and_refusals(toy):
    toy.model.set_attn_implementation("sdpa")
    salience.explain(toy, TOY_TEXT, method="attention_relevancy")
    assert toy.model.config._attn_implementation == "sdpa"
    assert all(not hasattr(p, "grad") or p.grad is None for p in toy.model.parameters())
    with pytest.raises(salience.ParameterError, match="has no nn.MultiheadAttention"):  # (a CNN)
        salience.explain(tiny_classifier(), photo(), method="attention_relevancy")


@pytest.mark.parametrize("leaf", [False, True])
def test_maps_the_output_does_not_use_are_refused(toy, leaf):
    """A model returning attention probabilities that are copies off its graph (as a fused kernel that
    was not switched to eager would), plain or requiring gradients: no gradient reaches them, and
    zeros would pass for "no relevancy"; the method refuses instead."""
    def detached(_module, _args, output):
        if output.attentions is not None:  # (the prediction pass asks for none)
            output.attentions = tuple(a.detach().clone().requires_grad_(leaf) for a in output.attentions)
        return output

    handle = toy.model.register_forward_hook(detached)
    try:
        with pytest.raises(salience.ModelOutputError, match="not computed from"):
            salience.explain(toy, TOY_TEXT, method="attention_relevancy")
    finally:
        handle.remove()
