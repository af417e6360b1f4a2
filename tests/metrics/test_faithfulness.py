"""Faithfulness metrics against closed-form values on a linear fake adapter, then on the toy BERT."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import salience
from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from salience.core.explanation import Explanation, Feature
from salience.core.target import Prediction, Target
from salience.errors import ParameterError
from salience.metrics import evaluate_metric, get_metric
from salience.metrics.base import MetricError
from salience.metrics.faithfulness import curve_counts, kendall_tau_b, top_k, trapezoid
from salience.models.base import Encoded, PassCounter


class LinearFake:
    """p(positive | kept features) = bias + sum of the kept features' weights: every metric has a
    closed form. Records each score_perturbed call (keep rows, baseline, target)."""

    name = "linear-fake"
    labels = ["negative", "positive"]

    def __init__(self, weights: list[float], bias: float = 0.05) -> None:
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.bias = bias
        self.counter = PassCounter()
        self.calls: list[tuple[torch.Tensor, str, Target]] = []

    def encode(self, inputs: str, *, truncate: bool = False) -> Encoded:
        words, features, start = inputs.split(), [], 0
        for i, word in enumerate(words):
            start = inputs.index(word, start)
            features.append(Feature(word, start, start + len(word), 0, (i + 1,)))
            start += len(word)
        n = len(words)
        return Encoded(input=inputs, input_ids=torch.arange(n + 2), token_type_ids=None,
                       tokens=["[CLS]", *words, "[SEP]"], special=torch.tensor([True] + [False] * n + [True]),
                       words=features, token_features=features, truncated=truncate)

    def score_perturbed(self, encoded, keep, features, baseline, target, batch_size=None):
        self.calls.append((keep.clone(), baseline, target))
        self.counter.forward_passes += keep.shape[0]
        self.counter.model_calls += 1
        positive = self.bias + keep.double() @ self.weights
        return positive if target.index == 1 else 1 - positive


WEIGHTS = [0.4, 0.1, 0.3, 0.0, 0.1]  # p_full = 0.95, p_empty = 0.05
TEXT = "a b c d e"


def explanation_for(model, text: str, scores, *, output: str = "logit", level: str = "word") -> Explanation:
    encoded = model.encode(text)
    return Explanation(input=text, features=encoded.features(level), scores=np.asarray(scores, dtype=float),
                       method="occlusion", params={}, model=model.name, target=Target(1, "positive", output),
                       prediction=Prediction(1, "positive", (0.05, 0.95)), level=level)


@pytest.fixture()
def fake() -> LinearFake:
    return LinearFake(WEIGHTS)


@pytest.fixture()
def perfect(fake) -> Explanation:
    return explanation_for(fake, TEXT, WEIGHTS)  # ranks like the model: 0, 2, 1, 4, 3 (stable tie)


# ------------------------------------------------------------------ closed forms
def test_k_rounding():
    assert [top_k(f, 5) for f in (0.01, 0.05, 0.1, 0.2, 0.4, 0.5, 1.0)] == [1, 1, 1, 1, 2, 2, 5]  # round half to even
    assert top_k(0.2, 13) == 3
    with pytest.raises(ParameterError):
        top_k(0.0, 5)


def test_comprehensiveness_and_sufficiency_closed_form(fake, perfect):
    c = evaluate_metric("comprehensiveness", fake, perfect)
    assert c.value == pytest.approx(0.95 - 0.55) and c.details["k"] == 1 and c.higher_is_better
    s = evaluate_metric("sufficiency", fake, perfect)
    assert s.value == pytest.approx(0.95 - 0.45) and not s.higher_is_better
    c2 = evaluate_metric("comprehensiveness", fake, perfect, fraction=0.4)  # k = 2: drop a and c
    assert c2.value == pytest.approx(0.95 - 0.25) and c2.details["k"] == 2
    s2 = evaluate_metric("sufficiency", fake, perfect, fraction=0.4)  # keep a and c
    assert s2.value == pytest.approx(0.95 - 0.75)
    assert c.forward_passes == 2 and s.forward_passes == 2


def test_one_call_probability_of_target_class_and_default_baselines(fake, perfect):
    for name, baseline in [("comprehensiveness", "delete"), ("aopc_sufficiency", "delete"), ("log_odds", "mask"),
                           ("deletion_auc", "delete"), ("insertion_auc", "delete"), ("loo_kendall_tau", "delete")]:
        fake.calls.clear()
        evaluate_metric(name, fake, perfect)
        assert len(fake.calls) == 1, name  # every perturbed row in one batched call
        keep, used, target = fake.calls[0]
        assert used == baseline, name
        assert target == Target(1, "positive", "probability"), name  # explanation explained the logit
    fake.calls.clear()
    evaluate_metric("comprehensiveness", fake, perfect, baseline="pad")
    assert fake.calls[0][1] == "pad"


def test_target_index_is_followed(fake):
    e = dataclasses.replace(explanation_for(fake, TEXT, WEIGHTS), target=Target(0, "negative", "probability"))
    # p(negative) = 1 - p(positive): removing "a" raises it by 0.4
    assert evaluate_metric("comprehensiveness", fake, e).value == pytest.approx(0.05 - 0.45)


def test_aopc_closed_form(fake, perfect):
    # k per bin (F = 5): 1, 1, 1, 1, 2 -> comprehensiveness 0.4 x 4 and 0.7; sufficiency 0.5 x 4 and 0.2
    c = evaluate_metric("aopc_comprehensiveness", fake, perfect)
    assert c.details["k"] == [1, 1, 1, 1, 2]
    np.testing.assert_allclose(c.details["values"], [0.4, 0.4, 0.4, 0.4, 0.7])
    assert c.value == pytest.approx(np.mean([0.4, 0.4, 0.4, 0.4, 0.7]))
    s = evaluate_metric("aopc_sufficiency", fake, perfect)
    assert s.value == pytest.approx(np.mean([0.5, 0.5, 0.5, 0.5, 0.2]))
    assert c.forward_passes == 3  # the input + one row per distinct k


def test_log_odds_closed_form_and_floor():
    fake = LinearFake(WEIGHTS)
    e = explanation_for(fake, TEXT, WEIGHTS)
    r = evaluate_metric("log_odds", fake, e)
    assert r.value == pytest.approx(math.log(0.55 / 0.95)) and not r.higher_is_better
    # the only evidence removed: p = 0 exactly, floored at 1e-12 instead of -inf
    saturated = LinearFake([1.0, 0.0, 0.0, 0.0, 0.0], bias=0.0)
    r0 = evaluate_metric("log_odds", saturated, explanation_for(saturated, TEXT, [1, 0, 0, 0, 0]))
    assert r0.value == pytest.approx(math.log(1e-12))


def test_deletion_and_insertion_closed_form(fake, perfect):
    d = evaluate_metric("deletion_auc", fake, perfect)
    np.testing.assert_allclose(d.details["x"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(d.details["y"], [0.95, 0.55, 0.25, 0.15, 0.05, 0.05])
    assert d.value == pytest.approx(0.3) and d.forward_passes == 6
    i = evaluate_metric("insertion_auc", fake, perfect)
    np.testing.assert_allclose(i.details["y"], [0.05, 0.45, 0.75, 0.85, 0.95, 0.95])
    assert i.value == pytest.approx(0.7)
    # linear model: p_deleted(m) + p_inserted(m) = p_full + p_empty at every step
    assert d.value + i.value == pytest.approx(0.95 + 0.05)


def test_directions_good_ranking_beats_reversed(fake, perfect):
    reverse = dataclasses.replace(perfect, scores=-perfect.scores)
    for name in ("comprehensiveness", "sufficiency", "aopc_comprehensiveness", "aopc_sufficiency", "log_odds",
                 "deletion_auc", "insertion_auc", "loo_kendall_tau"):
        good, bad = evaluate_metric(name, fake, perfect), evaluate_metric(name, fake, reverse)
        better = good.value > bad.value if get_metric(name).higher_is_better else good.value < bad.value
        assert better, name


def test_curve_is_capped_for_long_inputs():
    weights = list(np.linspace(0.0, 0.9 / 120, 120))
    fake = LinearFake(weights)
    text = " ".join(f"w{i}" for i in range(120))
    e = explanation_for(fake, text, weights)
    r = evaluate_metric("deletion_auc", fake, e)
    assert len(r.details["x"]) == 51 and r.details["x"][0] == 0 and r.details["x"][-1] == 1 and r.forward_passes == 51
    assert list(curve_counts(5, 50)) == [0, 1, 2, 3, 4, 5]
    assert list(curve_counts(10, 4)) == [0, 2, 5, 8, 10]  # round(2.5) = 2, round(7.5) = 8
    assert trapezoid(np.array([0, 0.5, 1.0]), np.array([1.0, 1.0, 0.0])) == pytest.approx(0.75)


def test_loo_kendall_tau_closed_form(fake, perfect):
    r = evaluate_metric("loo_kendall_tau", fake, perfect)
    np.testing.assert_allclose(r.details["loo_scores"], WEIGHTS)  # leave-one-out drop = weight
    assert r.value == pytest.approx(1.0) and r.forward_passes == 6
    swapped = dataclasses.replace(perfect, scores=np.array([0.3, 0.1, 0.4, 0.0, 0.1]))  # a and c swapped
    # pairs untied in both: 9 (the 0.1-0.1 pair is tied); one discordant -> (8 - 1) / sqrt(9 * 9)
    assert evaluate_metric("loo_kendall_tau", fake, swapped).value == pytest.approx(7 / 9)


def test_kendall_tau_b_matches_scipy():
    stats = require("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, size=12).astype(float), rng.normal(size=12)
        y[:3] = y[3]  # ties in both
        assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))


# ------------------------------------------------------------------ errors
def test_mismatched_features_raise(fake, perfect):
    other = dataclasses.replace(perfect, input="a b c d")
    with pytest.raises(MetricError, match="features do not match"):
        evaluate_metric("comprehensiveness", fake, other)


def test_constant_scores_make_kendall_undefined(fake, perfect):
    with pytest.raises(MetricError, match="undefined"):
        evaluate_metric("loo_kendall_tau", fake, dataclasses.replace(perfect, scores=np.zeros(5)))


def test_bad_parameters(fake, perfect):
    with pytest.raises(ParameterError):
        evaluate_metric("comprehensiveness", fake, perfect, fraction=1.5)
    with pytest.raises(ParameterError):
        evaluate_metric("deletion_auc", fake, perfect, max_steps=0)
    with pytest.raises(ParameterError):
        evaluate_metric("log_odds", fake, perfect, baseline="zero")


# ------------------------------------------------------------------ the toy BERT
def test_toy_occlusion_is_its_own_leave_one_out(toy):
    # the metric removes words and reads the probability: explain the probability too
    e = salience.explain(toy, TOY_TEXT, method="occlusion", baseline="mask", output="probability")
    r = evaluate_metric("loo_kendall_tau", toy, e, baseline="mask")
    np.testing.assert_allclose(r.details["loo_scores"], e.scores, atol=1e-12)
    assert r.value == pytest.approx(1.0)
    assert r.forward_passes == len(e.features) + 1


@pytest.mark.parametrize("inputs", [TOY_TEXT, TOY_PAIR])
def test_toy_good_explanation_beats_its_reverse(toy, inputs):
    e = salience.explain(toy, inputs, method="occlusion")
    reverse = dataclasses.replace(e, scores=-e.scores)
    assert evaluate_metric("comprehensiveness", toy, e).value > evaluate_metric("comprehensiveness", toy, reverse).value
    assert evaluate_metric("deletion_auc", toy, e).value < evaluate_metric("deletion_auc", toy, reverse).value
    assert evaluate_metric("insertion_auc", toy, e).value > evaluate_metric("insertion_auc", toy, reverse).value
    r = evaluate_metric("comprehensiveness", toy, e)
    assert r.details["p_full"] == pytest.approx(e.prediction.probabilities[e.target.index], abs=1e-12)


def test_toy_mismatched_features_raise(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    with pytest.raises(MetricError):
        evaluate_metric("sufficiency", toy, dataclasses.replace(e, input="the film was superb"))
    with pytest.raises(MetricError):  # token-level features on a word-level explanation
        evaluate_metric("sufficiency", toy, dataclasses.replace(e, level="token"))


def test_a_generation_is_refused_with_a_clear_message():
    # log-odds and the correlation metrics read one class probability; a causal LM's generation has one target per
    # token (comprehensiveness, sufficiency, AOPC and the curves score it: tests/metrics/test_generation_faithfulness.py)
    from tiny_lm import build_model, build_tokenizer

    lm = salience.CausalLM(build_model(), build_tokenizer(), name="tiny-llama")
    e = salience.explain(lm, "the capital of france is", method="occlusion", continuation=" paris")
    for metric in ("log_odds", "loo_kendall_tau", "faithfulness_correlation"):
        with pytest.raises(MetricError, match="does not take a causal LM's generation"):
            evaluate_metric(metric, lm, e)
