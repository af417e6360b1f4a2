"""Causal-LM targets beyond one token, on the tiny seeded float64 Llama: contrasts (token vs foil),
span targets (the span's log-probability) and step scores, checked against plain runs and against
hand computations from the model's logits.

Tolerance 1e-10 throughout: every identity checked is exact in exact arithmetic, and the model
computes in float64 everywhere, so the two sides differ by summation order only (the gradient of
output(t) - output(f) is one backward pass, the references two). "Everywhere" needs two changes to
the tiny Llama: transformers' LlamaRMSNorm and eager attention softmax compute in float32 even in
a float64 model, which made the difference of two runs and the contrast's run differ by 4e-7
relative (float32 rounding); here the norms compute in the input's dtype and attention is SDPA.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import salience
from salience.core.explanation import Explanation
from tiny_lm import build_model, build_tokenizer

PROMPT = "the capital of france is"
TOL = 1e-10


def _norm_in_input_dtype(self: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_llama() -> torch.nn.Module:
    """The tiny Llama with no float32 step: its norms in the input's dtype, SDPA attention."""
    model = build_model()
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_norm_in_input_dtype, module)
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    return salience.CausalLM(float64_llama(), build_tokenizer(), name="tiny-llama")


def ids_of(lm: salience.CausalLM, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def logits_after(lm: salience.CausalLM, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits (V,) after ``ids``, from one plain forward call."""
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double()


# ------------------------------------------------------------------ contrast
@pytest.mark.parametrize("output", ["logit", "probability"])
@pytest.mark.parametrize("method, params", [("saliency", {"abs": False}), ("integrated_gradients", {"steps": 8}),
                                            ("input_x_gradient", {})])
def test_contrast_is_the_difference_of_two_single_target_runs(lm, method, params, output):
    # The gradient is linear: d(F_t - F_f)/dx = dF_t/dx - dF_f/dx. Signed saliency sums its components,
    # input x gradient weights them by x, IG (fixed steps: the same path points and weights for every
    # target) integrates them: all linear in the gradient, so the contrast's scores are the
    # difference of the two runs exactly (up to rounding). |gradient| (saliency's default) is not linear.
    paris = salience.explain(lm, PROMPT, method=method, continuation=" paris", output=output, **params)
    city = salience.explain(lm, PROMPT, method=method, continuation=" city", output=output, **params)
    both = salience.explain(lm, PROMPT, method=method, continuation=" paris", contrast=" city", output=output, **params)
    np.testing.assert_allclose(both.scores, paris.scores - city.scores, rtol=0, atol=TOL, equal_nan=True)
    assert both.targets[0].label == "paris vs city" and both.targets[0].foil == ids_of(lm, "city")[0]
    assert both.params["contrast"] == " city"


@pytest.mark.parametrize("method, params", [("saliency", {}), ("integrated_gradients", {"steps": 8}), ("occlusion", {}),
                                            ("kernel_shap", {"n_samples": 16})])
def test_contrast_costs_the_passes_of_the_plain_run(lm, method, params):
    plain = salience.explain(lm, PROMPT, method=method, continuation=" paris is big", **params)
    contrast = salience.explain(lm, PROMPT, method=method, continuation=" paris is big", contrast=" city is old", **params)
    assert (contrast.cost.forward_passes, contrast.cost.backward_passes, contrast.cost.model_calls) == (
        plain.cost.forward_passes, plain.cost.backward_passes, plain.cost.model_calls)


def test_probability_difference_is_read_after_the_continuations_prefix(lm):
    # three targets; the foil of token t is read after the continuation's first t tokens (the same rows)
    prompt_ids = lm.encode(PROMPT, continuation=" paris").input_ids[:-1].tolist()
    tokens, foils = ids_of(lm, " paris is big"), ids_of(lm, " city was old")
    e = salience.explain(lm, PROMPT, method="occlusion", continuation=" paris is big", contrast=" city was old")
    expected = []
    for t in range(3):
        p = torch.softmax(logits_after(lm, prompt_ids + tokens[:t]), dim=-1)
        expected.append(float(p[tokens[t]] - p[foils[t]]))
    np.testing.assert_allclose(e.output_value, expected, rtol=0, atol=TOL)
    assert [t.label for t in e.targets] == ["paris vs city", "is vs was", "big vs old"]


def test_contrast_occlusion_is_leave_one_out_of_the_difference(lm):
    e = salience.explain(lm, PROMPT, method="occlusion", continuation=" paris is", contrast=" city was",
                         output="logit", baseline="eos")
    encoded = lm.encode(PROMPT, continuation=" paris is")
    ids, start = encoded.input_ids.tolist(), int(encoded.extras["prompt_length"])
    foils = ids_of(lm, " city was")
    for t in range(2):
        position = start + t

        def difference(prefix: list[int], t: int = t, position: int = position) -> float:
            z = logits_after(lm, prefix)
            return float(z[ids[position]] - z[foils[t]])

        full = difference(ids[:position])
        for f, feature in enumerate(e.features):
            (q,) = feature.tokens
            if q >= position:
                assert np.isnan(e.scores[t, f])
                continue
            removed = ids[:position]
            removed[q] = lm.tokenizer.eos_token_id
            assert e.scores[t, f] == pytest.approx(full - difference(removed), abs=TOL)


def test_contrast_given_as_token_ids(lm):
    foil = ids_of(lm, "city")[0]
    by_text = salience.explain(lm, PROMPT, method="saliency", continuation=" paris is", contrast=" city city")
    by_id = salience.explain(lm, PROMPT, method="saliency", continuation=" paris is", contrast=foil)
    by_ids = salience.explain(lm, PROMPT, method="saliency", continuation=" paris is", contrast=[foil, foil])
    np.testing.assert_allclose(by_text.scores, by_id.scores, rtol=0, atol=TOL, equal_nan=True)
    np.testing.assert_allclose(by_text.scores, by_ids.scores, rtol=0, atol=TOL, equal_nan=True)
    subset = salience.explain(lm, PROMPT, method="saliency", continuation=" paris is", contrast=foil, target=1)
    np.testing.assert_allclose(subset.scores, by_id.scores[1:], rtol=0, atol=TOL, equal_nan=True)


# ---------------------------------------------------------------------- spans
@pytest.mark.parametrize("method, params", [("saliency", {"abs": False}), ("input_x_gradient", {}),
                                            ("integrated_gradients", {"steps": 8})])
def test_span_target_is_the_sum_of_its_tokens_rows_for_gradient_methods(lm, method, params):
    # log P(span) = sum_t log p_t, and these methods are linear in the gradient; a feature that cannot
    # influence token t (NaN in its row) has zero gradient there, so it adds nothing
    tokens = salience.explain(lm, PROMPT, method=method, continuation=" paris is big", output="log_probability", **params)
    span = salience.explain(lm, PROMPT, method=method, continuation=" paris is big", output="log_probability",
                            target_span=(0, 3), **params)
    assert span.scores.shape == (1, len(tokens.features)) and span.targets[0].label == "paris is big"
    summed = np.nansum(tokens.scores, axis=0)
    summed[np.isnan(tokens.scores).all(axis=0)] = np.nan
    np.testing.assert_allclose(span.scores[0], summed, rtol=0, atol=TOL, equal_nan=True)
    np.testing.assert_allclose(span.output_value, [tokens.output_value.sum()], rtol=0, atol=TOL)
    assert span.cost.backward_passes == tokens.cost.backward_passes // 3  # one backward row per point, not per token


def test_span_occlusion_removes_each_feature_from_the_whole_span(lm):
    span = salience.explain(lm, PROMPT, method="occlusion", continuation=" paris is big", output="log_probability",
                            target_span=(1, 3), baseline="eos")
    encoded = lm.encode(PROMPT, continuation=" paris is big")
    ids, start = encoded.input_ids.tolist(), int(encoded.extras["prompt_length"])

    def log_p(sequence: list[int]) -> float:
        return sum(float(torch.log_softmax(logits_after(lm, sequence[:p]), dim=-1)[ids[p]]) for p in (start + 1, start + 2))

    for f, feature in enumerate(span.features):
        (q,) = feature.tokens
        if q >= start + 2:  # only the last token's own position and later: it influences nothing in the span
            assert np.isnan(span.scores[0, f])
            continue
        removed = list(ids)
        removed[q] = lm.tokenizer.eos_token_id
        assert span.scores[0, f] == pytest.approx(log_p(ids) - log_p(removed), abs=TOL)
    plain = salience.explain(lm, PROMPT, method="occlusion", continuation=" paris is big", baseline="eos")
    assert span.cost.forward_passes == plain.cost.forward_passes  # features + 1 rows either way


@pytest.mark.parametrize("output", ["probability", "log_odds"])
def test_span_probability_and_log_odds(lm, output):
    log_p = salience.explain(lm, PROMPT, method="occlusion", continuation=" paris is big", output="log_probability",
                             target_span=[(0, 2), (1, 3)])
    other = salience.explain(lm, PROMPT, method="occlusion", continuation=" paris is big", output=output,
                             target_span=[(0, 2), (1, 3)])
    s = np.asarray(log_p.output_value)
    expected = np.exp(s) if output == "probability" else s - np.log1p(-np.exp(s))
    np.testing.assert_allclose(other.output_value, expected, rtol=1e-12)
    assert [t.label for t in other.targets] == ["paris is", "is big"]


def test_step_scores_equal_the_logits_by_hand(lm):
    generated = salience.explain(lm, PROMPT, method="occlusion", max_new_tokens=4)
    plain = salience.explain(lm, PROMPT, method="occlusion", max_new_tokens=4, step_scores=False)
    assert "step_scores" not in plain.extras and generated.cost.forward_passes == plain.cost.forward_passes  # free
    continuation = generated.extras["continuation"]
    forced = salience.explain(lm, PROMPT, method="occlusion", continuation=continuation, step_scores=True)
    unforced = salience.explain(lm, PROMPT, method="occlusion", continuation=continuation)
    assert "step_scores" not in unforced.extras and forced.cost.forward_passes == unforced.cost.forward_passes + 1
    for e, encoded in ((generated, lm.encode(PROMPT, max_new_tokens=4)), (forced, lm.encode(PROMPT, continuation=continuation))):
        sequence, start = encoded.input_ids.tolist(), int(encoded.extras["prompt_length"])
        scores = e.extras["step_scores"]
        assert set(scores) == {"probability", "entropy", "surprisal"} and len(scores["probability"]) == len(sequence) - start
        for t in range(len(sequence) - start):
            log_p = torch.log_softmax(logits_after(lm, sequence[:start + t]), dim=-1)
            token = sequence[start + t]
            assert scores["probability"][t] == pytest.approx(float(log_p[token].exp()), abs=TOL)
            assert scores["surprisal"][t] == pytest.approx(float(-log_p[token]), abs=TOL)
            assert scores["entropy"][t] == pytest.approx(float(-(log_p.exp() * log_p).sum()), abs=TOL)


def test_json_round_trip_keeps_foils_spans_and_step_scores(lm):
    for options in ({"contrast": " city is"}, {"target_span": (0, 2), "output": "log_probability", "step_scores": True}):
        e = salience.explain(lm, PROMPT, method="occlusion", continuation=" paris is", **options)
        back = Explanation.from_json(e.to_json())
        assert back.targets == e.targets and back.extras == e.extras
        np.testing.assert_array_equal(back.scores, e.scores)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("options, error, match", [
    ({"contrast": " city"}, salience.InputError, "tokenises to 1 tokens but the continuation has 2"),
    ({"contrast": " city is old"}, salience.InputError, "tokenises to 3 tokens"),
    ({"contrast": "  "}, salience.InputError, "contrast .* is empty"),
    ({"contrast": []}, salience.InputError, "empty list"),
    ({"contrast": 10_000}, salience.InputError, "outside the vocabulary"),
    ({"contrast": 1.5}, salience.ParameterError, "a contrast is a text"),
    ({"contrast": " city is", "target_span": (0, 2)}, salience.ParameterError, "cannot be combined"),
    ({"target_span": (0, 3)}, salience.TargetError, "outside the continuation's 2 tokens"),
    ({"target_span": (1, 1)}, salience.TargetError, "empty"),
    ({"target_span": ("a", 2)}, salience.ParameterError, "a target span is"),
    ({"target_span": (0, 2), "target": 1}, salience.TargetError, "not both"),
    ({"target_span": (0, 2), "output": "logit"}, salience.ParameterError, "a span target has no 'logit'"),
])
def test_bad_contrasts_and_spans_are_one_line_errors(lm, options, error, match):
    with pytest.raises(error, match=match) as caught:
        salience.explain(lm, PROMPT, method="saliency", continuation=" paris is", **options)
    assert "\n" not in str(caught.value)


def test_cli_contrast(tmp_path):
    import json

    from salience.cli import main

    folder = tmp_path / "lm"
    build_model().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    out = tmp_path / "c.json"
    assert main(["explain", "--model", str(folder), "--prompt", PROMPT, "--continuation", " paris is",
                 "--contrast", " city was", "--method", "occlusion", "--json", str(out), "--no-color"]) == 0
    e = Explanation.from_dict(json.loads(out.read_text())["explanations"][0])
    assert [t.label for t in e.targets] == ["paris vs city", "is vs was"] and e.params["contrast"] == " city was"
