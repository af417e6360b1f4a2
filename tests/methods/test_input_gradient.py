"""Saliency and input x gradient read the prediction and the gradient from one forward + backward
pass; the result equals the two-pass computation (prediction, then a gradient pass)."""

from __future__ import annotations

import numpy as np
import pytest

import salience
from conftest import TOY_TEXT
from salience.core.target import resolve_target
from salience.methods.base import Context
from salience.methods.gradient import InputXGradient, Saliency
from toy import explain_probability


@pytest.mark.parametrize("method, algorithm", [("saliency", Saliency()), ("input_x_gradient", InputXGradient())])
@pytest.mark.parametrize("target", [None, 0, 1])
def test_one_pass_equals_two_passes(toy, method, algorithm, target):
    fused = explain_probability(toy, TOY_TEXT, method=method, target=target)
    assert (fused.cost.forward_passes, fused.cost.backward_passes) == (1, 1)

    encoded = toy.encode(TOY_TEXT)
    prediction = toy.predict(encoded)
    resolved = resolve_target(target, toy.labels, prediction, "probability")
    features = toy.features(encoded, "word")
    available = toy.available(encoded, [resolved], features)
    two_pass = algorithm.attribute(Context(toy, encoded, [resolved], features, available))  # no input_gradient
    assert fused.target == resolved
    assert fused.prediction == prediction
    # float64 toy model, same graph evaluated twice: identical up to rounding
    np.testing.assert_allclose(fused.scores, two_pass.scores[0], rtol=1e-12, atol=1e-15)
    assert fused.output_value == pytest.approx(two_pass.output_value[0], rel=1e-12)


def test_unknown_target_still_fails_clearly(toy):
    with pytest.raises(salience.errors.TargetError, match="unknown target label"):
        explain_probability(toy, TOY_TEXT, method="saliency", target="no-such-label")
