"""Faithfulness metrics on a causal LM's generation (one target per generated token), on the tiny
seeded Llama in float64 (its norms patched to float64 too, so batched rows and plain calls differ by
summation order only): each value against a hand computation that deletes or replaces the ranked
prompt tokens itself, runs the model teacher-forced on the original continuation with a plain
forward call and reads the target token's probability."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import salience
from salience.errors import ParameterError
from salience.metrics import evaluate_metric
from salience.metrics.base import MetricError
from salience.metrics.faithfulness import AOPC_BINS, top_k
from tiny_lm import build_model, build_tokenizer

PROMPT = "the capital of france is"
CONTINUATION = "a big old city"  # 4 tokens, each one word of the tiny vocabulary
TIGHT = 1e-10  # float64 everywhere: the metric's batched rows and the plain calls differ by rounding only
ERASER = ("comprehensiveness", "sufficiency")


def _norm_in_float64(self: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(scope="module")
def lm() -> salience.CausalLM:
    model = build_model(context=64)
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(_norm_in_float64, module)
    return salience.CausalLM(model, build_tokenizer(), name="tiny-llama")


@pytest.fixture(scope="module")
def explanation(lm) -> salience.Explanation:
    """Occlusion of PROMPT + CONTINUATION, its scores replaced by seeded random ones (NaN kept where
    a feature cannot influence a target), so that each target ranks the prompt differently."""
    e = salience.explain(lm, PROMPT, continuation=CONTINUATION, method="occlusion")
    noise = np.random.default_rng(3).standard_normal(e.scores.shape)
    return dataclasses.replace(e, scores=np.where(np.isfinite(e.scores), noise, np.nan))


def ids(lm, text: str, *, bos: bool) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=bos)["input_ids"]


def probability(lm, context: list[int], continuation: list[int], t: int) -> float:
    """p(continuation[t] | context + continuation[:t]) from one plain forward call."""
    sequence = context + continuation
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([sequence])).logits[0]
    return float(torch.softmax(logits[len(context) + t - 1], dim=-1)[continuation[t]])


def without(lm, prompt: list[int], removed: set[int], baseline: str) -> list[int]:
    """The prompt's ids with the positions ``removed`` deleted or replaced by the baseline token."""
    if baseline == "delete":
        return [token for p, token in enumerate(prompt) if p not in removed]
    return [lm.baseline_token_id(baseline) if p in removed else token for p, token in enumerate(prompt)]


def prompt_ranking(explanation, t: int) -> list[int]:
    """Prompt feature indices by target t's score, highest first (stable)."""
    prompt = [i for i, f in enumerate(explanation.features) if f.segment == 0]
    return sorted(prompt, key=lambda i: -explanation.scores[t, i])


@pytest.mark.parametrize("baseline", ["delete", "unk"])  # deletion rows run in full; replacement rows over the prefix cache
@pytest.mark.parametrize("fraction", [0.2, 0.6])
@pytest.mark.parametrize("metric", ERASER)
def test_comprehensiveness_and_sufficiency_equal_the_hand_computation(lm, explanation, metric, fraction, baseline):
    prompt, continuation = ids(lm, PROMPT, bos=True), ids(lm, CONTINUATION, bos=False)
    n_prompt = sum(f.segment == 0 for f in explanation.features)
    k = top_k(fraction, n_prompt)
    drops = []
    for t in range(len(continuation)):
        top = prompt_ranking(explanation, t)[:k]
        chosen = {p for i in top for p in explanation.features[i].tokens}
        if metric == "sufficiency":  # keep only the top k of the prompt's tokens (BOS is special: always kept)
            chosen = {p for i in prompt_ranking(explanation, t)[k:] for p in explanation.features[i].tokens}
        full = probability(lm, prompt, continuation, t)
        drops.append(full - probability(lm, without(lm, prompt, chosen, baseline), continuation, t))
    result = evaluate_metric(metric, lm, explanation, fraction=fraction, baseline=baseline)
    np.testing.assert_allclose(result.details["per_target"], drops, rtol=TIGHT, atol=TIGHT)
    assert result.value == pytest.approx(np.mean(drops), rel=TIGHT, abs=TIGHT)
    assert result.details["k"] == [k] * len(continuation) and result.details["baseline"] == baseline
    assert result.higher_is_better == (metric == "comprehensiveness")


def test_aopc_is_the_mean_of_comprehensiveness_over_the_bins(lm, explanation):
    for name, single in (("aopc_comprehensiveness", "comprehensiveness"), ("aopc_sufficiency", "sufficiency")):
        aopc = evaluate_metric(name, lm, explanation)
        each = [evaluate_metric(single, lm, explanation, fraction=b).value for b in AOPC_BINS]
        np.testing.assert_allclose(aopc.details["values"], each, rtol=TIGHT, atol=TIGHT)
        assert aopc.value == pytest.approx(np.mean(each), rel=TIGHT, abs=TIGHT)


@pytest.mark.parametrize("insertion", [False, True])
def test_deletion_and_insertion_auc_are_the_trapezoid_over_a_hand_built_curve(lm, explanation, insertion):
    prompt, continuation = ids(lm, PROMPT, bos=True), ids(lm, CONTINUATION, bos=False)
    order = [explanation.features[i].tokens[0] for i in range(len(explanation.features)) if explanation.features[i].segment == 0]
    areas = []
    for t in range(len(continuation)):
        ranked = [explanation.features[i].tokens[0] for i in prompt_ranking(explanation, t)]
        curve = []
        for m in range(len(order) + 1):  # 5 prompt tokens: one point per token (fewer than max_steps)
            removed = set(ranked[m:]) if insertion else set(ranked[:m])
            curve.append(probability(lm, without(lm, prompt, removed, "delete"), continuation, t))
        areas.append(float(np.trapezoid(curve, np.arange(len(order) + 1) / len(order))))
        if t == 0:
            first = curve
    result = evaluate_metric("insertion_auc" if insertion else "deletion_auc", lm, explanation)
    np.testing.assert_allclose(result.details["y"][0], first, rtol=TIGHT, atol=TIGHT)
    np.testing.assert_allclose(result.details["per_target"], areas, rtol=TIGHT, atol=TIGHT)
    assert result.value == pytest.approx(np.mean(areas), rel=TIGHT, abs=TIGHT)
    assert result.higher_is_better == insertion


def test_per_target_rows_use_only_features_that_can_influence_that_target(lm, explanation):
    """context="preceding": target t ranks the prompt and the generated tokens before it. Finite scores
    planted on the features that cannot influence t (t's own token and later ones) change nothing."""
    prompt, continuation = ids(lm, PROMPT, bos=True), ids(lm, CONTINUATION, bos=False)
    n_prompt = len(prompt) - 1  # BOS is special, in no feature
    planted = np.where(np.isfinite(explanation.scores), explanation.scores, 100.0)  # would be ranked first
    tampered = dataclasses.replace(explanation, scores=planted)
    result = evaluate_metric("comprehensiveness", lm, tampered, fraction=0.5, context="preceding")
    assert result.details["k"] == [top_k(0.5, n_prompt + t) for t in range(len(continuation))]
    drops = []
    for t in range(len(continuation)):
        usable = [i for i in range(n_prompt + t)]  # features before position len(prompt) + t
        top = sorted(usable, key=lambda i: -explanation.scores[t, i])[:top_k(0.5, len(usable))]
        removed = {p for i in top for p in explanation.features[i].tokens}
        sequence = [token for p, token in enumerate(prompt + continuation[:t]) if p not in removed]
        drops.append(probability(lm, prompt, continuation, t) - probability(lm, sequence, [continuation[t]], 0))
    np.testing.assert_allclose(result.details["per_target"], drops, rtol=TIGHT, atol=TIGHT)
    # the default context ranks the prompt only: the planted scores on the continuation are ignored there too
    assert evaluate_metric("deletion_auc", lm, tampered).value == pytest.approx(
        evaluate_metric("deletion_auc", lm, explanation).value, rel=TIGHT, abs=TIGHT)


def test_targets_with_the_same_removal_share_one_row(lm, explanation):
    same = dataclasses.replace(explanation, scores=np.where(np.isfinite(explanation.scores), explanation.scores[0], np.nan))
    assert evaluate_metric("comprehensiveness", lm, same).forward_passes == 2  # the input and one removal, for 4 targets
    distinct = {tuple(prompt_ranking(explanation, t)[:1]) for t in range(4)}
    assert evaluate_metric("comprehensiveness", lm, explanation).forward_passes == 1 + len(distinct)


def test_a_generation_from_explain_goes_through_evaluate_metric(lm):
    """A generated continuation (max_new_tokens=3): re-encoded for the metric (its decoded text is
    tokenised again, or generated again when that gives other tokens); p(y_t|x) is the probability
    the decoding step recorded."""
    e = salience.explain(lm, PROMPT, method="occlusion", max_new_tokens=3)
    for name in ("comprehensiveness", "sufficiency", "aopc_comprehensiveness", "aopc_sufficiency", "deletion_auc",
                 "insertion_auc"):
        result = evaluate_metric(name, lm, e)
        assert len(result.details["per_target"]) == 3
        assert result.value == pytest.approx(np.mean(result.details["per_target"]), rel=1e-12)
    full = evaluate_metric("comprehensiveness", lm, e).details["p_full"]
    np.testing.assert_allclose(full, e.extras["step_scores"]["probability"], rtol=1e-9)
    reread = salience.Explanation.from_json(e.to_json())  # a stored explanation scores the same
    assert evaluate_metric("comprehensiveness", lm, reread).value == pytest.approx(
        evaluate_metric("comprehensiveness", lm, e).value, rel=TIGHT)


def test_a_contrast_is_scored_by_the_probability_of_its_own_token(lm, explanation):
    e = salience.explain(lm, PROMPT, continuation=CONTINUATION, contrast="the small new river", method="occlusion", output="logit")
    plain = dataclasses.replace(explanation, scores=e.scores)
    assert evaluate_metric("comprehensiveness", lm, e).value == pytest.approx(
        evaluate_metric("comprehensiveness", lm, plain).value, rel=TIGHT, abs=TIGHT)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_fraction_outside_0_1_is_a_parameter_error(lm, explanation, fraction):
    with pytest.raises(ParameterError, match=r"fraction must be in \(0, 1\]"):
        evaluate_metric("comprehensiveness", lm, explanation, fraction=fraction)
    with pytest.raises(ParameterError, match="fraction"):
        evaluate_metric("aopc_sufficiency", lm, explanation, bins=(0.1, fraction))


def test_bad_input_is_a_one_line_error(lm, explanation):
    no_prompt = dataclasses.replace(explanation, scores=np.where(
        np.array([f.segment == 0 for f in explanation.features])[None], np.nan, explanation.scores))
    other = dataclasses.replace(explanation, extras={**explanation.extras, "continuation": "a small river"})
    cases = [(no_prompt, {}, MetricError, "scores no prompt feature for target 0"),
             (explanation, {"context": "everything"}, ParameterError, "context must be one of prompt, preceding"),
             (other, {}, MetricError, "gives other tokens"),
             (explanation, {"baseline": "mask"}, ParameterError, "no mask token")]
    for case, params, error, match in cases:
        with pytest.raises(error, match=match) as raised:
            evaluate_metric("comprehensiveness", lm, case, **params)
        assert "\n" not in str(raised.value)


def test_context_is_refused_for_a_classifier(toy):
    e = salience.explain(toy, "the film was great", method="occlusion")
    with pytest.raises(ParameterError, match="context applies to a causal LM's generation only"):
        evaluate_metric("comprehensiveness", toy, e, context="prompt")
