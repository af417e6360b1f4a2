"""Zero-shot classification through an NLI model: scores, gradients through the label softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience
from salience.models.zero_shot import ZeroShotClassifier

TEXT = "the film was good but the plot was dull"
LABELS = ["good", "awful", "story"]  # words of the toy vocabulary, so the hypotheses differ


@pytest.fixture()
def zero_shot(toy):
    # the toy classifier stands in for an NLI model: only the maths is under test here
    toy.labels = ["contradiction", "entailment"]
    return ZeroShotClassifier(toy, LABELS, template="it is about {} .")


def test_probabilities_are_softmax_of_entailment_logits(zero_shot, toy):
    e = salience.explain(zero_shot, TEXT, method="sig")
    logits = []
    for label in LABELS:
        batch = toy.tokenizer(TEXT, f"it is about {label} .", return_tensors="pt")
        with torch.no_grad():
            logits.append(toy.model(**batch).logits[0, 1].item())
    np.testing.assert_allclose(e.prediction.probabilities, torch.softmax(torch.tensor(logits, dtype=torch.float64), 0).numpy(), atol=1e-12)
    assert [f.segment for f in e.features] == [0] * len(e.features)  # hypothesis words are not features
    assert e.target.label in LABELS


@pytest.mark.parametrize("output", ["probability", "log_probability", "logit"])
def test_ig_completeness_through_label_softmax(zero_shot, output):
    e = salience.explain(zero_shot, TEXT, method="ig", target="story", output=output, steps=200)
    # 200 Gauss-Legendre nodes on a smooth integrand: completeness to 1e-6 of the gap
    assert abs(e.delta) < 1e-6 * max(1.0, abs(e.output_value - e.baseline_value))


def test_sig_exact_equals_path_and_counts_label_passes(zero_shot):
    exact = salience.explain(zero_shot, TEXT, method="sig", target="awful")
    path = salience.explain(zero_shot, TEXT, method="sig", target="awful", form="path", steps=64)
    np.testing.assert_allclose(path.scores, exact.scores, atol=1e-3 * np.abs(exact.scores).max())
    n_words = len(exact.features)
    assert exact.cost.forward_passes == len(LABELS) * (n_words + 2)  # every evaluation runs all hypotheses


def test_zero_shot_refuses_bad_setup(toy):
    with pytest.raises(salience.ParameterError, match="no 'entailment' class"):
        ZeroShotClassifier(toy, LABELS)
    toy.labels = ["contradiction", "entailment"]
    with pytest.raises(salience.ParameterError, match="at least two"):
        ZeroShotClassifier(toy, ["one"])
    with pytest.raises(salience.TargetError, match="unknown target label"):
        salience.explain(ZeroShotClassifier(toy, LABELS), TEXT, method="sig", target="music")
