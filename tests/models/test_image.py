"""The image-classifier adapter: every generic method runs on images, matches Captum where Captum
has the method, batches without changing results, leaves the model as it found it, maps heatmaps
back to the user's image, serialises compactly, and refuses bad input with one clear line.

Tolerances: the tiny CNN is float64 and Salience and Captum run the same graph, so saliency and
input x gradient agree to round-off (1e-12 of the largest score). Captum's integrated gradients
casts its quadrature weights to float32 (as in tests/methods/test_reference_captum.py) and its
Occlusion divides the summed window differences by the window counts as float32
(``single_attrib.float() / weight``), so those two agree to float32 rounding: 1e-7 and 2e-7 of the
largest score.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from oracles import require
from salience.api import SalienceWarning
from salience.core.batching import PIXELS, choose_batch_size
from salience.core.grid import model_grid_scores
from salience.errors import InputError, ModelOutputError, ParameterError
from salience.models.image import EncodedImage, ImageClassifier
from tiny_cnn import GRID, LABELS, build_tiny_cnn, photo, tiny_classifier
from toy import explain_probability

# the tiny CNN has no ReLU: guided_backprop and the like refuse it (tests/methods/test_guided.py runs them on a ReLU CNN);
# DeepLIFT and LRP explain logits, not the probability read here (test_deeplift.py and test_lrp.py run them;
# their batching on images: test_logit_only_methods_batched_equal_unbatched below)
LOGIT_ONLY = ("deeplift", "deeplift_shap", "lrp", "attnlrp")
TOKEN_ONLY = ("reagent",)  # replaces tokens by vocabulary tokens: refused on images (tests/methods/test_reagent.py)
ALL = [info.name for info in salience.methods()
       if info.kind != "attention"
       and info.name not in {"guided_backprop", "deconvnet", "guided_gradcam", *LOGIT_ONLY, *TOKEN_ONLY}]
# small settings; perturbation and per-feature methods on 4 x 4 patches (16 features)
PARAMS = {
    "smoothgrad": {"n_samples": 5},
    "gradient_shap": {"n_samples": 5, "stdev": 0.1},
    "integrated_gradients": {"steps": 12},
    "lime": {"n_samples": 40, "patch_size": 4},
    "kernel_shap": {"n_samples": 40, "max_exact": 0, "patch_size": 4},
    "occlusion": {"patch_size": 4},
    "sequential_integrated_gradients": {"patch_size": 4, "form": "path", "steps": 6},
    "rise": {"n_masks": 40, "patch_size": 4},
    "neuromask": {"iterations": 10},
}


@pytest.fixture()
def model() -> ImageClassifier:
    return tiny_classifier()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return photo()


def _probabilities(net: nn.Module):
    return lambda x: torch.softmax(net(x), dim=-1)


def _input(model: ImageClassifier, image: np.ndarray) -> torch.Tensor:
    return model.preprocess.to_tensor(Image.fromarray(image)).double()[None]  # (1, C, H, W), independent of the adapter


# ------------------------------------------------------------------ every method
@pytest.mark.parametrize("method", ALL)
def test_every_method_runs_and_maps_back_to_the_image(model, image, method):
    e = explain_probability(model, image, method=method, **PARAMS.get(method, {}))
    assert e.kind == "image" and e.extras["geometry"]["grid"] == [GRID, GRID]
    assert e.level == ("pixel" if method in ("saliency", "input_x_gradient", "smoothgrad", "gradient_shap",
                                              "integrated_gradients", "neuromask")
                       or salience.core.registry.get_method(method).kind == "cam"
                       else "patch")
    assert e.scores.shape == (len(e.features),) and np.isfinite(e.scores).all()
    assert e.heatmap().shape == image.shape[:2]  # non-square original: (20, 30)


@pytest.mark.parametrize("method", ALL)
def test_batched_equals_unbatched(model, image, method):
    params = PARAMS.get(method, {})
    one = explain_probability(model, image, method=method, batch_size=1, **params)
    many = explain_probability(model, image, method=method, batch_size=64, **params)
    # float64 model; only the summation order inside the convolutions differs between batch shapes
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-9, atol=1e-12)
    if one.token_scores is not None:
        np.testing.assert_allclose(one.token_scores, many.token_scores, rtol=1e-9, atol=1e-12)
    assert one.cost.forward_passes == many.cost.forward_passes
    assert one.cost.model_calls > many.cost.model_calls or many.cost.model_calls == many.cost.forward_passes  # or nothing to merge


@pytest.mark.parametrize("method", LOGIT_ONLY)
def test_logit_only_methods_batched_equal_unbatched(model, image, method):
    options = {"composite": "epsilon"} if "lrp" in method else {}  # the tiny CNN's Tanh/Softplus: no z^B bounds needed
    one = salience.explain(model, image, method=method, output="logit", batch_size=1, **options)
    many = salience.explain(model, image, method=method, output="logit", batch_size=64, **options)
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-9, atol=1e-12)  # float64; summation order only
    assert np.isfinite(one.scores).all() and np.ptp(one.scores) > 0


def test_attention_methods_name_the_models_that_have_attention(model, image):
    with pytest.raises(ParameterError, match="text classifiers"):
        explain_probability(model, image, method="attention")


# ------------------------------------------------------------------ against Captum
@pytest.mark.parametrize("target", [0, 2])
def test_saliency_and_input_x_gradient_match_captum(model, image, target):
    captum_attr = require("captum.attr")
    x = _input(model, image).requires_grad_(True)
    forward = _probabilities(model.model)
    for method, reference in (("saliency", captum_attr.Saliency(forward).attribute(x, target=target, abs=True)),
                              ("input_x_gradient", captum_attr.InputXGradient(forward).attribute(x, target=target))):
        e = explain_probability(model, image, method=method, target=target)
        expected = reference[0].sum(0).detach().numpy().reshape(-1)  # summed over channels, row-major pixels
        np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        np.testing.assert_allclose(e.scores, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_integrated_gradients_matches_captum_with_the_same_rule_and_baseline(model, image):
    captum_attr = require("captum.attr")
    x = _input(model, image)
    black = torch.full_like(x, -1.0)  # pixel value 0 scaled to [-1, 1]
    reference = captum_attr.IntegratedGradients(_probabilities(model.model)).attribute(
        x, baselines=black, target=1, n_steps=32, method="gausslegendre")
    e = explain_probability(model, image, method="ig", target=1, steps=32, rule="gausslegendre", baseline="black")
    expected = reference[0].sum(0).detach().numpy().reshape(-1)
    np.testing.assert_allclose(e.token_scores, expected, rtol=0, atol=1e-7 * np.abs(expected).max())


@pytest.mark.parametrize(("size", "stride"), [(4, 4), (4, 2)], ids=["tiled", "overlapping"])
@pytest.mark.parametrize("baseline", ["black", "mean"])
def test_occlusion_matches_captum_per_pixel(model, image, size, stride, baseline):
    captum_attr = require("captum.attr")
    x = _input(model, image)
    value = -1.0 if baseline == "black" else 0.0
    reference = captum_attr.Occlusion(_probabilities(model.model)).attribute(
        x, sliding_window_shapes=(3, size, size), strides=(3, stride, stride), baselines=value, target=0)
    e = explain_probability(model, image, method="occlusion", target=0, level="patch", patch_size=size, stride=stride,
                         baseline=baseline)
    expected = reference[0, 0].detach().numpy()  # every channel of a pixel gets the same value
    np.testing.assert_allclose(model_grid_scores(e), expected, rtol=0, atol=2e-7 * np.abs(expected).max())


# ------------------------------------------------------------------ identities
def test_integrated_gradients_completeness_within_the_reported_delta(model, image):
    e = explain_probability(model, image, method="ig", target="dog")  # adaptive
    x = _input(model, image)
    with torch.no_grad():
        probabilities = _probabilities(model.model)(torch.cat([x, torch.full_like(x, -1.0)]))[:, 1]
    assert e.output_value == pytest.approx(float(probabilities[0]), abs=1e-12)
    assert e.baseline_value == pytest.approx(float(probabilities[1]), abs=1e-12)
    gap = e.output_value - e.baseline_value
    assert e.delta == pytest.approx(e.scores.sum() - gap, abs=1e-12)
    assert abs(e.delta) <= 1e-3 * abs(gap)  # a smooth model: the adaptive rule converges


def test_exact_kernel_shap_on_patches_is_efficient(model, image):
    e = explain_probability(model, image, method="kernel_shap", level="patch", patch_size=8)  # 4 patches: exact
    assert e.params["exact"] and len(e.features) == 4
    assert e.scores.sum() == pytest.approx(e.output_value - e.baseline_value, abs=1e-12)


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_lime_and_kernel_shap_run_on_superpixels(method):
    model = tiny_classifier(grid=32)
    params = {"n_samples": 60} if method == "lime" else {"n_samples": 60, "max_exact": 0}
    e = explain_probability(model, photo(48, 64), method=method, level="superpixel", n_segments=12, compactness=5.0, **params)
    layout = e.features.layout
    assert layout["kind"] == "superpixel" and layout["method"] == "slic" and layout["n_segments"] == 12
    assert 4 <= len(e.features) <= 20 and np.isfinite(e.scores).all()
    assert e.heatmap().shape == (48, 64)


def test_several_targets_share_passes_and_equal_separate_runs(model, image):
    both = explain_probability(model, image, method="ig", target=[0, 2], steps=8)
    assert both.scores.shape == (2, GRID * GRID)
    for row, target in enumerate((0, 2)):
        alone = explain_probability(model, image, method="ig", target=target, steps=8)
        np.testing.assert_allclose(both.scores[row], alone.scores, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(both.heatmap(row), alone.heatmap(), rtol=1e-9, atol=1e-14, equal_nan=True)
    occluded = explain_probability(model, image, method="occlusion", target="all", patch_size=4)
    assert occluded.scores.shape == (3, 16) and occluded.cost.forward_passes == 1 + 17  # predict + shared rows


# ------------------------------------------------------------------ state
def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules())


def _state(net: nn.Module) -> tuple:
    return (_hooks(net), [p.requires_grad for p in net.parameters()], [m.training for m in net.modules()],
            [p.grad is None for p in net.parameters()])


@pytest.mark.parametrize("method", ALL)
def test_no_state_left_behind_also_after_an_exception_inside_the_model(model, image, method):
    net = model.model
    net[0].weight.requires_grad_(False)  # a user's own choice
    calls = {"n": 0, "fail_at": None}

    def count_or_fail(_module, _inputs, _output):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("boom")

    before = _state(net)
    handle = net[3].register_forward_hook(count_or_fail)
    params = PARAMS.get(method, {})
    explain_probability(model, image, method=method, batch_size=4, **params)  # a clean run counts the calls
    n_calls, calls["n"] = calls["n"], 0
    calls["fail_at"] = n_calls // 2 + 1  # the middle call
    with pytest.raises(RuntimeError, match="boom"):
        explain_probability(model, image, method=method, batch_size=4, **params)
    assert calls["n"] == calls["fail_at"]
    handle.remove()
    assert _state(net) == before


def test_memory_budget_probe_leaves_no_hooks(model, image):
    before = _state(model.model)
    e = explain_probability(model, image, method="ig", steps=8, max_memory="4MB")
    assert _state(model.model) == before
    assert model.bytes_per_row(GRID * GRID, backward=True) > model.bytes_per_row(GRID * GRID, backward=False) > 0
    assert e.cost.model_calls > 3  # a 4 MB budget splits the 16 + 2 rows


def test_image_chunks_come_from_the_pixel_budget():
    assert choose_batch_size(224 * 224, backward=False, budget=PIXELS) == 8
    assert choose_batch_size(224 * 224, backward=True, budget=PIXELS) == 8
    assert choose_batch_size(32 * 32, backward=True, budget=PIXELS) == 256  # capped at MAX_ROWS_PER_CHUNK


# ------------------------------------------------------------------ inputs and geometry
def test_every_input_kind_gives_the_same_model_input(model, image, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    encoded = [model.encode(x) for x in (image, Image.fromarray(image), str(path), path)]
    for other in encoded[1:]:
        assert torch.equal(other.pixels, encoded[0].pixels) and other.geometry == encoded[0].geometry
    assert encoded[2].input == str(path) and encoded[0].input == "array 20x30x3 uint8"
    as_tensor = model.encode(encoded[0].pixels.clone())  # a tensor is the model input itself
    assert as_tensor.geometry["original_size"] == [GRID, GRID] and torch.equal(as_tensor.pixels, encoded[0].pixels)
    assert explain_probability(model, encoded[0].pixels, method="saliency").heatmap().shape == (GRID, GRID)


def test_heatmap_of_a_cropping_preprocess_is_nan_where_the_model_saw_nothing(image):
    from salience.zoo.efficientnet_lite0 import ImagePreprocess

    model = ImageClassifier(build_tiny_cnn(), ImagePreprocess(crop=GRID, resize_short_side=GRID), LABELS)
    heat = explain_probability(model, image, method="saliency").heatmap()
    assert heat.shape == (20, 30)
    assert np.isnan(heat[:, :5]).all() and np.isnan(heat[:, -5:]).all() and np.isfinite(heat[:, 5:25]).all()


def test_a_plain_preprocessing_function_gets_an_assumed_stretch_geometry(image):
    def to_tensor(picture: Image.Image) -> torch.Tensor:
        resized = np.asarray(picture.resize((GRID, GRID)), dtype=np.float64) / 255.0
        return torch.from_numpy(resized).permute(2, 0, 1) * 2 - 1

    model = ImageClassifier(build_tiny_cnn(), to_tensor, LABELS)
    e = explain_probability(model, image, method="ig", steps=4)
    assert e.extras["geometry"]["exact"] is False and e.heatmap().shape == (20, 30)
    assert e.params["baseline"] == "black"  # black level found by preprocessing a black image


def test_greyscale_and_rgba_images_are_converted_with_a_note(model, image):
    for mode in ("L", "RGBA"):
        picture = Image.fromarray(image).convert(mode)
        with pytest.warns(SalienceWarning, match=f"the {mode} image was converted to RGB"):
            e = explain_probability(model, picture, method="saliency")
        assert any("converted to RGB" in w for w in e.warnings)


def test_baselines_are_named_recorded_and_seeded(model, image):
    encoded = model.encode(image)
    x, black = model.input_and_baseline(encoded, "black")
    assert torch.equal(black, torch.full_like(x, -1.0))
    assert torch.equal(model.input_and_baseline(encoded, "mean")[1], torch.zeros_like(x))
    _, blur = model.input_and_baseline(encoded, "blur:1.5")
    assert blur.std() < x.std() and abs(float(blur.mean() - x.mean())) < 0.05
    noise = model.input_and_baseline(encoded, "noise")[1]
    assert torch.equal(noise, model.input_and_baseline(encoded, "noise")[1])
    assert not torch.equal(noise, model.input_and_baseline(encoded, "noise:1")[1])
    assert noise.min() >= -1 and noise.max() <= 1 and noise.std() > 0.4
    custom = torch.full((3, GRID, GRID), 0.123456789)
    e = explain_probability(model, image, method="ig", steps=4, baseline=custom)
    assert e.params["baseline"].startswith("tensor 3x16x16 sha1:")
    assert "0.123456" not in e.to_json() and "_image" not in json.loads(e.to_json())["extras"]
    with pytest.raises(InputError, match=r"baseline tensor has shape \(3, 4, 4\)"):
        explain_probability(model, image, method="occlusion", baseline=torch.zeros(3, 4, 4), patch_size=8)


def test_json_round_trip_is_compact_and_heatmap_works_after_loading(image):
    model = tiny_classifier(grid=64)  # 4,096 pixels
    for method, params in (("ig", {"steps": 4}), ("occlusion", {"level": "superpixel", "n_segments": 10})):
        e = explain_probability(model, photo(40, 90), method=method, **params)
        text = e.to_json()

        def longest_list(value) -> int:
            if isinstance(value, dict):
                return max([0, *map(longest_list, value.values())])
            if isinstance(value, list):
                return max([len(value), *map(longest_list, value)])
            return 0

        assert longest_list(json.loads(text)) <= 256  # large arrays are base64, never JSON lists
        loaded = salience.Explanation.from_json(text)
        assert loaded.kind == "image" and "_image" not in loaded.extras
        np.testing.assert_array_equal(loaded.heatmap(), e.heatmap())
        assert loaded.heatmap().shape == (40, 90)
        assert [f.box for f in loaded.features[:5]] == [f.box for f in e.features[:5]]


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_one_clear_line(model, image, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    bare = ImageClassifier(build_tiny_cnn(), input_shape=(3, GRID, GRID))
    cases = [
        (model, str(fake), InputError, "is not an image file"),
        (model, str(tmp_path / "missing.jpg"), InputError, "no image file at"),
        (model, image.astype(np.float32), InputError, "uint8"),
        (model, torch.zeros(1, 3, GRID, GRID), InputError, r"must be \(C, H, W\)"),
        (bare, torch.zeros(1, GRID, GRID), InputError, "expects 3 channels, got 1"),
        (bare, torch.zeros(3, 10, GRID), InputError, "expects 16x16 pixels \\(H x W\\), got 10x16"),
        (bare, image, InputError, "has no preprocessing"),
        (model, 42, InputError, "cannot read a int as an image"),
    ]
    for adapter, inputs, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            explain_probability(adapter, inputs, method="saliency")
        assert "\n" not in str(caught.value)
    # channels come from the first convolution when no input_shape is given
    with pytest.raises(InputError, match="expects 3 channels, got 4"):
        explain_probability(ImageClassifier(build_tiny_cnn()), torch.zeros(4, 8, 8), method="saliency")


def test_model_and_option_errors(model, image):
    with pytest.raises(ParameterError, match="unknown image baseline 'gray'"):
        explain_probability(model, image, method="occlusion", baseline="gray")
    with pytest.raises(ParameterError, match="black level is unknown"):
        explain_probability(ImageClassifier(build_tiny_cnn()), torch.zeros(3, 8, 8), method="ig", baseline="black")
    with pytest.raises(ParameterError, match="unknown level 'word'"):
        explain_probability(model, image, method="saliency", level="word")
    with pytest.raises(ParameterError, match="patch_size is an option of level 'patch'"):
        explain_probability(model, image, method="saliency", patch_size=4)
    with pytest.raises(ParameterError, match="patch_size must be a positive integer"):
        explain_probability(model, image, method="occlusion", patch_size=0)

    class NotANumber(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3)) * float("nan")

    with pytest.raises(ModelOutputError, match="NaN or infinite"):
        explain_probability(ImageClassifier(NotANumber(), input_shape=(3, 4, 4)), torch.zeros(3, 4, 4), method="saliency")
    with pytest.raises(ModelOutputError, match="returned 3 classes but 2 labels"):
        explain_probability(ImageClassifier(build_tiny_cnn(), labels=["a", "b"]), torch.zeros(3, 8, 8), method="saliency")


def test_labels_default_to_class_indices(image):
    model = ImageClassifier(build_tiny_cnn())
    assert model.labels == ["0", "1", "2"]
    e = explain_probability(model, model.encode(torch.zeros(3, 8, 8)), method="saliency", target="2")
    assert e.target.index == 2 and isinstance(model.encode(torch.zeros(3, 8, 8)), EncodedImage)


# ------------------------------------------------------------------ the bundled model
def test_efficientnet_lite0_explains_chelsea_with_patch_occlusion():
    from skimage import data

    model = salience.load_model("zoo:efficientnet-lite0")
    assert isinstance(model, salience.ImageClassifier)
    chelsea = data.chelsea()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SalienceWarning)
        e = explain_probability(model, chelsea, method="occlusion", level="patch", patch_size=32)
    assert e.prediction.index == 285 and e.prediction.label == "Egyptian cat"
    assert len(e.features) == 49 and e.cost.forward_passes == 1 + 50
    heat = e.heatmap()
    assert heat.shape == chelsea.shape[:2] and np.isfinite(heat).all()
