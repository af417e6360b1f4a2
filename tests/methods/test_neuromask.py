"""NeuroMask: the loss and each update are the authors' (written out here with torch autograd and
TF1's RMSProp), the loss decreases, the mask stays in [0, 1], presets and early stopping work, a NaN
loss stops with an error, several images optimised together give what each gives alone, and on
EfficientNet-Lite0 the masked image keeps the class.

Tolerances: the tiny CNN is float64 and the test computes the same loss and step in another order
(1e-10 relative over a few steps). Batched runs differ from single ones only in the summation order
inside the convolutions of a larger batch; over 30 RMSProp steps (each divides by a running RMS that
starts at 1, so rounding is not amplified) that stays below 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

import salience
from conftest import TOY_TEXT
from salience.errors import ModelOutputError, ParameterError
from salience.methods.neuromask import PRESETS, NeuroMask
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import LABELS, build_tiny_cnn, photo, tiny_classifier

LAPLACIAN_3 = torch.tensor([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]], dtype=torch.float64)


def _authors_loss(net: nn.Module, x01: torch.Tensor, w: torch.Tensor, label: int, coefficients: tuple[float, float, float],
                  temperature: float) -> torch.Tensor:
    """nesl/neuromask's total loss for x in [0, 1] (masked as x * m), then normalised to [-1, 1] as
    the tiny classifier's preprocessing does."""
    m = torch.sigmoid(w / temperature)
    logits = net(((x01 * m - 0.5) / 0.5)[None])
    pred = F.cross_entropy(logits, torch.tensor([label]))
    sparse = (w + 10).abs().mean()
    smooth = F.conv2d(w[None, None], LAPLACIAN_3[None, None]).pow(2).mean()
    return coefficients[0] * pred + coefficients[1] * sparse + coefficients[2] * smooth


def test_loss_and_updates_are_the_authors():
    model, image = tiny_classifier(), photo()
    e = salience.explain(model, image, method="neuromask", iterations=3, seed=4)
    x01 = (model.encode(image).pixels + 1) / 2
    w = (2 * torch.rand((16, 16), generator=torch.Generator().manual_seed(4), dtype=torch.float64) - 1) * 10
    mean_square = torch.ones_like(w)  # TF1's RMSPropOptimizer starts at 1
    curve = []
    for _ in range(3):
        w = w.detach().requires_grad_(True)
        loss = _authors_loss(model.model, x01, w, e.prediction.index, (0.4, 0.35, 0.03), 0.3)
        (g,) = torch.autograd.grad(loss, w)
        curve.append(loss.item())
        mean_square = 0.9 * mean_square + 0.1 * g * g
        w = w - 0.03 * g / torch.sqrt(mean_square + 1e-10)
    np.testing.assert_allclose(e.extras["loss_curve"][0], curve, rtol=1e-10)
    np.testing.assert_allclose(e.token_scores, torch.sigmoid(w / 0.3).detach().reshape(-1).numpy(), rtol=1e-10, atol=1e-15)
    final = _authors_loss(model.model, x01, w.detach(), e.prediction.index, (0.4, 0.35, 0.03), 0.3).item()
    np.testing.assert_allclose(e.params["final_loss"]["total"][0], final, rtol=1e-10)
    assert e.params["laplacian"] == 3 and e.params["baseline"] == "black" and e.params["iterations_used"] == [3]
    assert e.cost.forward_passes == 1 + 3 + 1 and e.cost.backward_passes == 3


def test_loss_decreases_and_the_mask_is_in_the_unit_interval():
    e = salience.explain(tiny_classifier(), photo(), method="neuromask", iterations=300)
    curve = np.asarray(e.extras["loss_curve"][0])
    assert len(curve) == 300 and e.params["iterations_used"] == [300]
    assert curve[-1] < 0.5 * curve[0] and curve[-50:].mean() < curve[100:150].mean() < curve[:50].mean()
    assert np.all(e.token_scores >= 0) and np.all(e.token_scores <= 1)
    assert e.level == "pixel" and e.target.output == "log_probability"  # the CE term's output, not log-odds
    # the masked image's log-probability of the predicted class: minus the final prediction term
    assert e.output_value == pytest.approx(-e.params["final_loss"]["prediction"][0], rel=1e-12)


def test_presets_and_overrides():
    assert NeuroMask().settings() == PRESETS["imagenet"]
    assert (PRESETS["imagenet"].lambda_pred, PRESETS["imagenet"].lambda_sparse, PRESETS["imagenet"].lambda_smooth,
            PRESETS["imagenet"].temperature, PRESETS["imagenet"].iterations) == (0.4, 0.35, 0.03, 0.3, 2000)
    cifar = NeuroMask(preset="cifar", lambda_smooth=0.5).settings()
    assert (cifar.lambda_pred, cifar.lambda_sparse, cifar.lambda_smooth, cifar.temperature, cifar.iterations) == (
        0.4, 0.35, 0.5, 1.0, 2000)
    e = salience.explain(tiny_classifier(), photo(), method="neuromask", preset="cifar", iterations=2)
    assert {k: e.params[k] for k in ("preset", "lambda_smooth", "temperature", "iterations", "learning_rate")} == {
        "preset": "cifar", "lambda_smooth": 0.15, "temperature": 1.0, "iterations": 2, "learning_rate": 0.03}


def test_early_stop_when_the_loss_stops_improving():
    flat = salience.explain(tiny_classifier(), photo(), method="neuromask", iterations=100, patience=5,
                            lambda_pred=0.0, lambda_sparse=0.0, lambda_smooth=0.0)  # the loss is 0 throughout
    assert flat.params["iterations_used"] == [6] and flat.extras["loss_curve"] == [[0.0] * 6]
    # a step too long to settle: the loss bounces and stops improving long before 400 iterations
    model, image = tiny_classifier(), photo()
    e = salience.explain(model, image, method="neuromask", iterations=400, patience=10, learning_rate=3.0)
    used = e.params["iterations_used"][0]
    curve = e.extras["loss_curve"][0]
    assert 10 < used < 400 and len(curve) == used
    assert min(curve[-10:]) >= min(curve[:-10])  # the last 10 did not improve on the best before them
    off = salience.explain(model, image, method="neuromask", iterations=40, learning_rate=3.0)
    assert off.params["iterations_used"] == [40] and off.params["patience"] is None


class _NanAfter(nn.Module):
    """The tiny CNN, returning NaN logits from its ``calls``-th call on."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.net, self.calls, self.seen = build_tiny_cnn(), calls, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        logits = self.net(images)
        return logits * float("nan") if self.seen >= self.calls else logits


class _NanGradient(nn.Module):
    """The tiny CNN plus 0 * sqrt(x - x): finite outputs, NaN input gradients (0 * inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_tiny_cnn()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) + 0 * torch.sqrt(images - images).sum(dim=(1, 2, 3))[:, None]


def test_divergence_stops_with_an_error_naming_the_iteration():
    nan_at_third = ImageClassifier(_NanAfter(calls=4), ImagePreprocess(crop=16), LABELS)  # call 1 is the prediction
    with pytest.raises(ModelOutputError, match="neuromask diverged at iteration 3: the model returned NaN") as caught:
        salience.explain(nan_at_third, photo(), method="neuromask", iterations=10)
    assert "\n" not in str(caught.value)
    nan_gradient = ImageClassifier(_NanGradient(), ImagePreprocess(crop=16), LABELS)
    with pytest.raises(ModelOutputError, match="diverged at iteration 1: the gradient is NaN"):
        salience.explain(nan_gradient, photo(), method="neuromask", iterations=10)


@pytest.mark.parametrize(("params", "message"), [
    ({"preset": "mnist"}, "unknown neuromask preset 'mnist'; choose imagenet, cifar"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ({"lambda_sparse": -1.0}, "lambda_sparse must be a finite number >= 0"),
    ({"iterations": 0}, "iterations must be a positive integer"),
    ({"patience": 0}, "patience must be a positive integer"),
    ({"laplacian": 4}, "laplacian is 3 or 5"),
    ({"images_per_batch": 0}, "images_per_batch must be a positive integer"),
])
def test_bad_parameters_are_one_line_errors(params, message):
    with pytest.raises(ParameterError, match=message):
        salience.explain(tiny_classifier(), photo(), method="neuromask", **params)


def test_an_image_smaller_than_the_laplacian_is_refused():
    small = ImageClassifier(build_tiny_cnn(), labels=LABELS, input_shape=(3, 4, 4))
    with pytest.raises(ParameterError, match="5x5 Laplacian needs images of at least 5 pixels a side, got 4x4"):
        salience.explain(small, torch.zeros(3, 4, 4, dtype=torch.float64), method="neuromask", laplacian=5, iterations=2)


def test_text_classifiers_have_no_pixel_grid(toy):
    with pytest.raises(ParameterError, match="needs a pixel grid, which a text classifier does not provide; it works on image classifiers"):
        salience.explain(toy, TOY_TEXT, method="neuromask", iterations=2)


# ------------------------------------------------------------------ several images at once
def test_images_optimised_together_equal_one_at_a_time():
    model = tiny_classifier()
    images = [photo(), photo(seed=1), photo(24, 18, seed=2)]
    params = {"iterations": 30, "seed": 6}
    alone = [salience.explain(model, image, method="neuromask", **params) for image in images]
    together = salience.explain(model, images, method="neuromask", **params)
    pairs = salience.explain(model, images, method="neuromask", images_per_batch=2, **params)
    for single, *batched in zip(alone, together, pairs):
        for other in batched:
            np.testing.assert_allclose(other.token_scores, single.token_scores, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(other.extras["loss_curve"], single.extras["loss_curve"], rtol=1e-9)
            assert other.prediction.index == single.prediction.index and other.target == single.target
            # the images are predicted in one batch: probabilities equal up to batched rounding
            np.testing.assert_allclose(other.prediction.probabilities, single.prediction.probabilities, rtol=1e-12)
    # one model call per iteration (+ the final evaluation) for all three: 31, split 11 + 10 + 10,
    # plus one prediction call for the three (split 1 + 0 + 0); passes are rows, the same in every layout
    assert [e.cost.model_calls for e in together] == [12, 10, 10]
    assert [e.cost.model_calls for e in alone] == [32, 32, 32]
    assert sum(e.cost.forward_passes for e in together) == sum(e.cost.forward_passes for e in alone) == 3 * 32
    assert sum(e.cost.backward_passes for e in together) == 3 * 30


def test_early_stop_inside_a_batch_equals_alone():
    model = tiny_classifier()
    images = [photo(), photo(seed=1)]
    params = {"iterations": 200, "patience": 8, "learning_rate": 3.0}
    alone = [salience.explain(model, image, method="neuromask", **params) for image in images]
    together = salience.explain(model, images, method="neuromask", **params)
    assert [e.params["iterations_used"] for e in together] == [e.params["iterations_used"] for e in alone]
    for single, batched in zip(alone, together):
        np.testing.assert_allclose(batched.token_scores, single.token_scores, rtol=1e-9, atol=1e-12)


def test_several_targets_each_get_a_mask():
    e = salience.explain(tiny_classifier(), photo(), method="neuromask", target=[0, 2], iterations=20, output="probability")
    assert e.token_scores.shape == (2, 256) and len(e.extras["loss_curve"]) == 2
    assert e.params["iterations_used"] == [20, 20]
    # output_value: the probability of each class for its own masked image (one more forward pass)
    np.testing.assert_allclose(e.output_value, np.exp(-np.asarray(e.params["final_loss"]["prediction"])), rtol=1e-12)
    assert e.cost.forward_passes == 1 + 2 * 20 + 2 + 2


def test_other_methods_still_explain_a_list_one_by_one():
    model = tiny_classifier()
    images = [photo(), photo(seed=1)]
    together = salience.explain(model, images, method="saliency")
    for image, listed in zip(images, together):
        alone = salience.explain(model, image, method="saliency")
        np.testing.assert_array_equal(listed.scores, alone.scores)
        assert (listed.cost.forward_passes, listed.cost.backward_passes, listed.cost.model_calls) == (1, 1, 1)


# ------------------------------------------------------------------ EfficientNet-Lite0
@pytest.fixture(scope="module")
def lite0():
    return salience.load_model("zoo:efficientnet-lite0")


def _masked_class(model: ImageClassifier, e: salience.Explanation) -> int:
    x = model.encode(data.chelsea()).pixels
    black = -torch.ones_like(x)  # EfficientNet-Lite0's preprocessing maps [0, 1] to [-1, 1]
    masked = black + torch.as_tensor(e.token_scores, dtype=x.dtype).reshape(1, *x.shape[1:]) * (x - black)
    with torch.no_grad():
        return int(model.model(masked[None]).argmax())


def test_zoo_loss_decreases_quickly_with_a_long_step(lite0):
    # 40 iterations (4-9 s on 2 cores) with a 10x step: TF1's RMSProp takes small steps at first
    e = salience.explain(lite0, data.chelsea(), method="neuromask", iterations=40, learning_rate=0.3)
    curve = np.asarray(e.extras["loss_curve"][0])
    assert e.prediction.label == "Egyptian cat" and e.params["laplacian"] == 5
    # measured: 611.7 -> 572.3, every step lower (the smoothness of the random start dominates)
    assert np.all(np.diff(curve) < 0) and curve[-1] < 0.95 * curve[0]
    assert e.params["final_loss"]["total"][0] < curve[-1]
    assert np.all((e.token_scores >= 0) & (e.token_scores <= 1))


@pytest.mark.slow
def test_zoo_masked_image_keeps_the_class(lite0):
    # the authors' ImageNet settings, 300 of their 2,000 iterations (30-60 s): measured p = 0.995
    e = salience.explain(lite0, data.chelsea(), method="neuromask", iterations=300, output="probability")
    curve = e.extras["loss_curve"][0]
    assert curve[-1] < 0.1 * curve[0]
    assert _masked_class(lite0, e) == e.prediction.index == 285
    assert e.output_value > 0.9
