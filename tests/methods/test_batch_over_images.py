"""Several images explained together (salience.methods.sharing): the CAM family, SmoothGrad,
guided backpropagation and deconvnet run a list of images of one grid in shared model calls, each
image read for its own target, and give what each image gives alone.

Checked: a list of 3 images (two predicted classes) explained together equals each explained alone,
map, raw CAM, output and target; it takes fewer model calls (exact counts for the one-pass
methods), and the inputs' costs add up to what the model counted; batched Grad-CAM equals Captum's
LayerGradCam on the same batch with per-image targets; inputs with several targets, or alone on
their grid, are explained by themselves; the adapter's paired layer maps equal row-by-row reads;
text models (no pixel grid) keep explaining input by input, each with its own cost.

Tolerances: float64 models; together and alone run the same operations on batches of 3 and of 1
row, so only the summation order inside the convolutions may differ (round-off, ~1e-16 relative):
1e-10 of the largest value.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from oracles import require
from salience.core.target import Target
from salience.errors import ParameterError
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import LABELS, photo

RTOL = 1e-10
CAMS = ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "score_cam", "ablation_cam")
SHARED = (*CAMS, "smoothgrad", "guided_backprop", "deconvnet")
PARAMS = {"smoothgrad": {"n_samples": 6}}


def relu_cnn(seed: int = 2) -> nn.Module:
    """conv - ReLU6 - conv(stride 2) - ReLU - AdaptiveAvgPool(2) - Linear, float64, eval: ReLU-family
    units for guided backpropagation, a spatial layer for CAM. Seed 2 predicts class 2 for the
    photo and class 1 for the inverted one (checked in :func:`images`)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU6(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    with torch.no_grad():
        net[0].weight.mul_(8.0)
        net[-1].weight.mul_(4.0)
    return net.double().eval()


def classifier() -> ImageClassifier:
    return ImageClassifier(relu_cnn(), ImagePreprocess(crop=16), LABELS, name="relu-cnn")


def images(model: ImageClassifier) -> list[np.ndarray]:
    """Three photos of different sizes (one grid after preprocessing), with two predicted classes."""
    found = [photo(), 255 - photo(seed=1), photo(24, 18, seed=2)]
    assert [model.predict(model.encode(image)).index for image in found] == [2, 1, 2]
    return found


def explain(model: ImageClassifier, inputs: object, method: str, **options: object) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salience.explain(model, inputs, method=method, progress=False, **{**PARAMS.get(method, {}), **options})


def counted(model: ImageClassifier, run: object) -> tuple[object, tuple[int, int, int]]:
    """``run()`` and the (forward, backward, calls) the adapter counted during it."""
    before = dataclasses.replace(model.counter)
    result = run()  # type: ignore[operator]
    after = model.counter
    return result, (after.forward_passes - before.forward_passes, after.backward_passes - before.backward_passes,
                    after.model_calls - before.model_calls)


def cost(e: salience.Explanation) -> tuple[int, int, int]:
    return e.cost.forward_passes, e.cost.backward_passes, e.cost.model_calls


def close(actual: object, expected: object) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0,
                               atol=RTOL * max(float(np.abs(expected).max()), 1e-300))


def same(together: salience.Explanation, alone: salience.Explanation) -> None:
    close(together.token_scores, alone.token_scores)
    close(together.scores, alone.scores)
    assert together.target == alone.target and together.prediction.index == alone.prediction.index
    # the list's images are predicted in one batch: probabilities equal up to batched rounding
    close(together.prediction.probabilities, alone.prediction.probabilities)
    if alone.output_value is not None:
        close(together.output_value, alone.output_value)
    if "cam" in alone.extras:
        close(together.extras["cam"], alone.extras["cam"])
    if "_per_channel" in alone.extras:
        close(together.extras["_per_channel"], alone.extras["_per_channel"])


# ------------------------------------------------------------------ together == alone
@pytest.mark.parametrize("method", SHARED)
def test_images_together_equal_each_alone_in_fewer_calls(method):
    model = classifier()
    pictures = images(model)
    alone = [explain(model, image, method) for image in pictures]
    together, total = counted(model, lambda: explain(model, pictures, method))
    for listed, single in zip(together, alone, strict=True):
        same(listed, single)
    # each input's cost (its own preparation + an even share of the shared run) adds up to the total
    assert tuple(map(sum, zip(*map(cost, together)))) == total
    assert total[2] < sum(e.cost.model_calls for e in alone)
    assert total[0] <= sum(e.cost.forward_passes for e in alone)
    assert total[1] == sum(e.cost.backward_passes for e in alone)  # a backward row per image and target either way


@pytest.mark.parametrize("method", [*CAMS[:4], "guided_backprop", "deconvnet"])
def test_one_pass_methods_take_one_call_for_the_list(method):
    """Grad-CAM family (automatic layer: one probe row) and guided backpropagation: the images'
    predictions in one call of 3 rows, then one call of 3 rows, 3 backward rows."""
    model = classifier()
    pictures = images(model)
    probe = 1 if method in CAMS else 0
    together, total = counted(model, lambda: explain(model, pictures, method))
    assert total == (3 + probe + 3, 3, 1 + probe + 1)
    alone = [explain(model, image, method) for image in pictures]
    assert [cost(e) for e in alone] == [(1 + probe + 1, 1, 1 + probe + 1)] * 3


def test_smoothgrad_rows_of_all_images_share_calls():
    model = classifier()
    pictures = images(model)
    _, total = counted(model, lambda: explain(model, pictures, "smoothgrad"))
    assert total == (3 + 3 * 6, 3 * 6, 1 + 1)  # the predictions in one call; 18 noisy rows fit one chunk of 16 x 16 images


def test_batched_grad_cam_equals_captum_layer_grad_cam_with_per_image_targets():
    captum_attr = require("captum.attr")
    model = classifier()
    pictures = images(model)
    together = explain(model, pictures, "grad_cam", output="logit", layer="3")
    batch = torch.stack([model.encode(image).pixels for image in pictures]).double()
    targets = [e.target.index for e in together]
    layer = captum_attr.LayerGradCam(model.model, model.model[3]).attribute(batch, target=targets, relu_attributions=True)
    expected = F.interpolate(layer, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    for e, reference in zip(together, expected, strict=True):
        close(e.token_scores, reference.reshape(-1).detach().numpy())


# ------------------------------------------------------------------ what is not shared
@pytest.mark.parametrize("method", ["grad_cam", "smoothgrad", "guided_backprop"])
def test_several_targets_per_image_are_explained_alone(method):
    model = classifier()
    pictures = images(model)
    alone = [explain(model, image, method, target=[0, 2]) for image in pictures]
    together = explain(model, pictures, method, target=[0, 2])
    for listed, single in zip(together, alone, strict=True):
        same(listed, single)
    # the same rows; only the predictions are shared (one call instead of three)
    totals = [tuple(map(sum, zip(*map(cost, explanations)))) for explanations in (together, alone)]
    assert totals[0] == (totals[1][0], totals[1][1], totals[1][2] - 2)


def test_only_images_of_one_grid_share():
    """No preprocessing: tensors of any size; the two 16 x 16 images share a call, the 12 x 20 one not."""
    model = ImageClassifier(relu_cnn(), labels=LABELS, name="relu-cnn")
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 16, 16, generator=generator, dtype=torch.float64),
               torch.randn(3, 12, 20, generator=generator, dtype=torch.float64),
               torch.randn(3, 16, 16, generator=generator, dtype=torch.float64)]
    alone = [explain(model, t, "grad_cam") for t in tensors]
    together, total = counted(model, lambda: explain(model, tensors, "grad_cam"))
    for listed, single in zip(together, alone, strict=True):
        same(listed, single)
    # predictions: one call per grid; 16 x 16: probe + one call of 2 rows; 12 x 20: probe + one call of 1 row
    assert total == (3 + 1 + 2 + 1 + 1, 3, 2 + 2 + 2)


def test_text_models_explain_a_list_input_by_input(toy):
    """The long text's noisy rows take more calls than the short one's: an even split of a shared
    run's cost would show."""
    texts = ["the film was good", "the film was good and the plot was dull " * 6]
    alone = [explain(toy, text, "smoothgrad", n_samples=40) for text in texts]
    together = explain(toy, texts, "smoothgrad", n_samples=40)
    for listed, single in zip(together, alone, strict=True):
        close(listed.scores, single.scores)
        assert cost(listed) == cost(single)
    assert alone[0].cost.model_calls < alone[1].cost.model_calls


# ------------------------------------------------------------------ the adapter's paired layer maps
@pytest.mark.parametrize("grad", [True, False])
def test_paired_layer_maps_equal_row_by_row_reads(grad):
    model = classifier()
    rows = torch.stack([model.input_and_baseline(model.encode(image), "zero")[0] for image in images(model)])
    encoded = model.encode(photo())
    targets = [Target(2, "bird", "log_odds"), Target(0, "cat", "log_odds"), Target(2, "bird", "log_odds")]
    paired = model.layer_maps(encoded, rows, targets, "3", grad=grad, paired=True)
    assert paired.outputs.shape == (3, 1) and paired.activations.shape == (3, 8, 8, 8)
    for i, target in enumerate(targets):
        one = model.layer_maps(encoded, rows[i:i + 1], [target], "3", grad=grad)
        close(paired.outputs[i], one.outputs[0])
        close(paired.activations[i], one.activations[0])
        if grad:
            close(paired.gradients[i], one.gradients[0])
    assert paired.gradients is None if not grad else paired.gradients.shape == (3, 1, 8, 8, 8)


def test_paired_layer_maps_need_one_target_per_row():
    model = classifier()
    encoded = model.encode(photo())
    rows = model.input_and_baseline(encoded, "zero")[0][None].expand(2, -1, -1)
    with pytest.raises(ParameterError, match="paired layer maps need one target per row: 1 targets for 2 rows"):
        model.layer_maps(encoded, rows, [Target(0, "cat", "logit")], None, grad=True, paired=True)


def test_predict_many_equals_predict_in_order_one_call_per_grid():
    model = ImageClassifier(relu_cnn(), labels=LABELS, name="relu-cnn")
    generator = torch.Generator().manual_seed(1)
    encoded = [model.encode(torch.randn(3, *size, generator=generator, dtype=torch.float64))
               for size in ((16, 16), (12, 20), (16, 16), (16, 16))]
    predictions, total = counted(model, lambda: model.predict_many(encoded))
    assert total == (4, 0, 2)
    for prediction, e in zip(predictions, encoded, strict=True):
        alone = model.predict(e)
        assert prediction.index == alone.index and prediction.label == alone.label
        close(prediction.probabilities, alone.probabilities)
