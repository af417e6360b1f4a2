"""model_randomisation(every_step=False): only the last step of the cascade is re-run, and its value
is the full cascade's (each step's re-initialisation is seeded on its own, so skipping the re-runs
in between changes nothing). Checked on the tiny float64 CNN (4 cascade steps) with a deterministic
method (occlusion) and a seeded random one (SmoothGrad: its noise must not shift the weights drawn
for the next step). The two runs execute the same float64 operations on the same weights, so the
values are compared exactly.

model_randomisation(init="reset"): each module's own reset_parameters() (compared exactly with
resetting the same modules by hand under the same seed), and why it exists: on a deep float32
Conv-BatchNorm-ReLU stack the normal(0, 0.02) fallback kills the signal, so the re-run's map is
exactly constant (counted in details["constant_reruns"]), which the reset does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience.errors import ParameterError
from salience.metrics import evaluate_metric
from salience.metrics.sanity import _reinitialise
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import GRID, LABELS, build_tiny_cnn, photo, tiny_classifier


@pytest.mark.parametrize("method, params", [("occlusion", {"patch_size": 5}), ("smoothgrad", {"n_samples": 4})])
def test_last_step_only_gives_the_full_cascades_value_for_one_rerun(method, params):
    cnn = tiny_classifier()
    e = salience.explain(cnn, photo(), method, output="logit", seed=3, params=params)
    full = evaluate_metric("model_randomisation", cnn, e)
    last = evaluate_metric("model_randomisation", cnn, e, every_step=False)
    steps = len(full.details["steps"])
    assert steps == 4 and len(full.details["correlations"]) == steps
    assert last.details["steps"] == full.details["steps"]  # every step is still randomised ...
    assert last.details["correlations"] == [full.value]  # ... but only the last is re-run and compared
    assert last.value == full.value and last.details["flagged"] == full.details["flagged"]
    assert last.details["every_step"] is False and full.details["every_step"] is True
    # cost: one re-run of the method (its passes, prediction included) against one per step
    assert full.forward_passes == steps * last.forward_passes > 0
    assert np.isfinite(last.value)


# ------------------------------------------------------------------ init="reset"
def test_reset_init_is_each_modules_own_reset_seeded_and_leaves_the_users_rng_alone():
    cnn = tiny_classifier()
    net = cnn.model
    conv, norm, linear = net[0], net[1], net[-1]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    _reinitialise(net, [conv, norm, linear], seed=5, init_mode="reset")
    assert torch.equal(torch.random.get_rng_state(), state)
    expected = build_tiny_cnn()  # the same modules, reset by hand in the same order under the same seed
    torch.manual_seed(5)
    for module in (expected[0], expected[1], expected[-1]):
        module.reset_parameters()
    for mine, theirs in ((conv, expected[0]), (norm, expected[1]), (linear, expected[-1])):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items(), strict=True):
            assert torch.equal(a, b), name  # exact: the same draws (reset_parameters works in place, dtype kept)
    assert torch.all(norm.running_mean == 0) and torch.all(norm.running_var == 1)  # statistics forgotten too
    assert not torch.all(linear.bias == 0)  # PyTorch's default (uniform) bias, not the fallback's zeros


def test_unknown_init_is_refused():
    cnn = tiny_classifier()
    e = salience.explain(cnn, photo(), "saliency", output="logit")
    with pytest.raises(ParameterError, match="init must be one of auto, reset"):
        evaluate_metric("model_randomisation", cnn, e, init="kaiming")


def deep_cnn(depth: int = 16) -> ImageClassifier:
    """float32 Conv-BatchNorm-ReLU x depth: deep enough that normal(0, 0.02) weights with batch-norm
    scales of about 0.02 shrink the signal by ~1e-3 a layer, below float32's smallest number."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    return ImageClassifier(net, ImagePreprocess(crop=GRID), LABELS, name="deep-cnn")


def test_reset_init_keeps_a_deep_cnn_alive_where_the_fallback_makes_every_map_constant():
    cnn = deep_cnn()
    e = salience.explain(cnn, photo(), "saliency", output="logit")
    auto = evaluate_metric("model_randomisation", cnn, e, every_step=False)
    reset = evaluate_metric("model_randomisation", cnn, e, every_step=False, init="reset")
    # normal(0, 0.02): the randomised network's gradient underflows to exactly 0 at every pixel, the
    # correlation is undefined and reported as 0 -- a "pass" that tests nothing; counted now
    assert auto.details["constant_reruns"] == 1 and auto.value == 0.0
    # PyTorch's own initialisation keeps a (small) input-dependent gradient: a real correlation
    assert reset.details["constant_reruns"] == 0 and reset.value != 0.0 and reset.details["init"] == "reset"
