"""Image metrics against hand-computed values on hand-built models and hand-made maps: deletion and
insertion curves (the text metrics, made to work on images), faithfulness correlation, ROAD and its
noisy linear imputation, localisation against boxes mapped through the preprocessing geometry,
sparseness / complexity, max-sensitivity and cascading randomisation on the tiny CNN.

Tolerances: the hand-built models are float64 and every expected value is a short sum of exact
decimals, so values agree to 1e-12 (round-off of a few dozen additions); imputation solves a
sparse system whose exact solution is the ramp, so it agrees to 1e-12 as well.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

import salience
from oracles import require
from salience.core.explanation import Explanation
from salience.core.grid import original_mask_to_grid, pixel_features
from salience.core.target import Target
from salience.errors import ParameterError
from salience.metrics import evaluate_metric, get_metric
from salience.metrics.base import MetricError
from salience.metrics.complexity import gini
from salience.metrics.imputation import linear_imputation, noisy_linear_imputation
from salience.metrics.sanity import cascade_steps
from salience.models.image import ImageClassifier
from salience.zoo.efficientnet_lite0 import ImagePreprocess
from tiny_cnn import LABELS, build_tiny_cnn, photo, tiny_classifier


# ------------------------------------------------------------------ hand-built models
class Presence(nn.Module):
    """p(class 0 | x) = c + sum_i w_i x_i over the pixels of a 1-channel image, exactly: the logits
    are (log p, log(1 - p)), whose softmax is (p, 1 - p)."""

    def __init__(self, weights: np.ndarray, c: float = 0.1) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(weights, dtype=torch.float64).reshape(-1), requires_grad=False)
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.c + x.reshape(x.shape[0], -1) @ self.w
        return torch.stack([p.log(), (1 - p).log()], dim=1)


# 4 x 4 pixels: four of weight 0.05, four of 0.02, four of 0.01, four of 0, shuffled over the grid
ORDERED = np.array([0.05] * 4 + [0.02] * 4 + [0.01] * 4 + [0.0] * 4)
WEIGHTS = ORDERED[np.random.default_rng(0).permutation(16)]


def presence_model(weights: np.ndarray = WEIGHTS, side: int = 4) -> ImageClassifier:
    return ImageClassifier(Presence(weights), labels=["object", "other"], input_shape=(1, side, side), name="presence")


def with_map(explanation: Explanation, scores: np.ndarray) -> Explanation:
    """The explanation with hand-made pixel scores (feature and per-pixel scores alike)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return dataclasses.replace(explanation, scores=scores, token_scores=scores.copy())


def explained(model: ImageClassifier, image: object, target: object = 0, **options: object) -> Explanation:
    e = salience.explain(model, image, "saliency", target=target, output="probability", level="pixel", **options)
    assert isinstance(e, Explanation)
    return e


@pytest.fixture()
def presence() -> tuple[ImageClassifier, Explanation]:
    model = presence_model()
    ones = torch.ones(1, 4, 4, dtype=torch.float64)  # every pixel 1: removing pixel i to "mean" (0) lowers p by w_i
    return model, with_map(explained(model, ones), WEIGHTS)


# ------------------------------------------------------------------ deletion / insertion
def test_deletion_and_insertion_auc_equal_the_hand_computed_values(presence):
    model, e = presence
    # deletion, 2 pixels per step (9 points at 0, 2/16, ..., 1): p = 0.42 - the weights removed so far
    d = evaluate_metric("deletion_auc", model, e, step=2)
    np.testing.assert_allclose(d.details["y"], [0.42, 0.32, 0.22, 0.18, 0.14, 0.12, 0.10, 0.10, 0.10], rtol=0, atol=1e-12)
    # trapezoid with spacing 1/8: (sum - first/2 - last/2) / 8 = (1.70 - 0.21 - 0.05) / 8
    assert d.value == pytest.approx(0.18, abs=1e-12) and not d.higher_is_better
    assert d.details["baseline"] == "mean" and d.forward_passes == 9
    # insertion from the "mean" image: p = 0.1 + the weights inserted so far
    i = evaluate_metric("insertion_auc", model, e, step=2, baseline="mean")
    np.testing.assert_allclose(i.details["y"], [0.10, 0.20, 0.30, 0.34, 0.38, 0.40, 0.42, 0.42, 0.42], rtol=0, atol=1e-12)
    assert i.value == pytest.approx((2.98 - 0.05 - 0.21) / 8, abs=1e-12) and i.higher_is_better  # 0.34
    # linear model: deletion + insertion = p(x) + p(baseline) = 0.42 + 0.10
    assert d.value + i.value == pytest.approx(0.52, abs=1e-12)


def test_a_step_that_does_not_divide_the_pixels_ends_with_a_shorter_step(presence):
    model, e = presence
    d = evaluate_metric("deletion_auc", model, e, step=3)
    assert d.details["counts"] == [0, 3, 6, 9, 12, 15, 16]
    np.testing.assert_allclose(d.details["y"], [0.42, 0.27, 0.18, 0.13, 0.10, 0.10, 0.10], rtol=0, atol=1e-12)
    # x = counts / 16: five steps of 3/16 and a last one of 1/16
    # (RISE's auc() spaces its points evenly by step number and would give (1.30 - 0.26) / 6 = 0.1733)
    expected = 3 / 32 * (0.69 + 0.45 + 0.31 + 0.23 + 0.20) + 1 / 32 * 0.20
    assert d.value == pytest.approx(expected, abs=1e-12)  # 0.1825


def test_a_bad_map_scores_worse_and_the_default_steps_are_one_pixel_each(presence):
    model, e = presence
    reverse = with_map(e, -WEIGHTS)  # ranks the useless pixels first
    good, bad = evaluate_metric("deletion_auc", model, e), evaluate_metric("deletion_auc", model, reverse)
    assert good.details["counts"] == list(range(17)) and good.value < bad.value
    assert evaluate_metric("insertion_auc", model, e, baseline="mean").value > \
        evaluate_metric("insertion_auc", model, reverse, baseline="mean").value


def test_insertion_starts_from_the_blurred_image_by_default():
    model = presence_model(np.full(16, 0.05))
    rows, cols = np.mgrid[0:4, 0:4]
    image = (rows * 4 + cols) / 15.0  # a ramp from 0 to 1
    e = with_map(explained(model, torch.from_numpy(image[None])), image)
    i = evaluate_metric("insertion_auc", model, e, step=4)
    blurred = gaussian_filter(image, sigma=5, mode="reflect")  # scipy directly: sigma 5 pixels, edges reflected
    assert i.details["baseline"] == "blur:5"
    assert i.details["y"][0] == pytest.approx(0.1 + 0.05 * blurred.sum(), abs=1e-12)
    assert i.details["y"][-1] == pytest.approx(0.1 + 0.05 * image.sum(), abs=1e-12)
    # the brightest row is inserted first (scores = the image): after one step it holds its own values
    first = blurred.copy()
    first[3] = image[3]
    assert i.details["y"][1] == pytest.approx(0.1 + 0.05 * first.sum(), abs=1e-12)


def test_the_other_faithfulness_metrics_take_the_image_default_baseline(presence):
    model, e = presence
    c = evaluate_metric("comprehensiveness", model, e, fraction=0.25)  # the 4 pixels of weight 0.05 set to 0
    assert c.details["baseline"] == "mean" and c.value == pytest.approx(0.20, abs=1e-12)
    assert evaluate_metric("log_odds", model, e, fraction=0.25).value == pytest.approx(math.log(0.22 / 0.42), abs=1e-12)


def test_curve_parameter_errors(presence):
    model, e = presence
    with pytest.raises(ParameterError, match="step"):
        evaluate_metric("deletion_auc", model, e, step=0)
    with pytest.raises(ParameterError, match="not both"):
        evaluate_metric("deletion_auc", model, e, step=2, max_steps=4)
    with pytest.raises(ParameterError, match="unknown image baseline"):
        evaluate_metric("deletion_auc", model, e, baseline="delete")  # a text baseline


# ------------------------------------------------------------------ faithfulness correlation
def linear_rgb(seed: int = 0) -> tuple[ImageClassifier, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).double().eval()
    return ImageClassifier(net, labels=["a", "b"], input_shape=(3, 8, 8), name="linear"), torch.randn(3, 8, 8,
                                                                                                     dtype=torch.float64)


def test_faithfulness_correlation_is_one_for_exact_attributions_and_minus_one_flipped():
    model, x = linear_rgb()
    # input x gradient of the logit, summed over channels: exactly the logit drop when a pixel goes to 0 ("mean")
    e = salience.explain(model, x, "input_x_gradient", target=0, output="logit")
    r = evaluate_metric("faithfulness_correlation", model, e, baseline="mean")
    assert r.value == pytest.approx(1.0, abs=1e-12) and r.higher_is_better
    assert r.details["subset_size"] == 16 and r.details["output"] == "logit" and r.forward_passes == 101  # F = 64: F / 4
    np.testing.assert_allclose(r.details["score_sums"], r.details["drops"], rtol=0, atol=1e-12)
    flipped = evaluate_metric("faithfulness_correlation", model, dataclasses.replace(e, scores=-e.scores), baseline="mean")
    assert flipped.value == pytest.approx(-1.0, abs=1e-12)
    again = evaluate_metric("faithfulness_correlation", model, e, baseline="mean", n_runs=10, seed=3)
    same = evaluate_metric("faithfulness_correlation", model, e, baseline="mean", n_runs=10, seed=3)
    other = evaluate_metric("faithfulness_correlation", model, e, baseline="mean", n_runs=10, seed=4)
    assert again.details["score_sums"] == same.details["score_sums"] != other.details["score_sums"]  # seeded


def test_faithfulness_correlation_reads_the_output_asked_and_refuses_bad_settings():
    model, x = linear_rgb()
    e = salience.explain(model, x, "input_x_gradient", target=0, output="logit")
    probability = evaluate_metric("faithfulness_correlation", model, e, baseline="mean", output="probability", n_runs=20)
    assert probability.details["output"] == "probability" and -1.0 <= probability.value < 1.0 - 1e-6  # not linear
    with pytest.raises(ParameterError, match="subset_size"):
        evaluate_metric("faithfulness_correlation", model, e, baseline="mean", subset_size=64)
    with pytest.raises(ParameterError, match="black level is unknown"):  # no preprocessing: Quantus's default refused
        evaluate_metric("faithfulness_correlation", model, e)
    with pytest.raises(MetricError, match="score sums are equal"):
        evaluate_metric("faithfulness_correlation", model, dataclasses.replace(e, scores=np.zeros(64)), baseline="mean")


# ------------------------------------------------------------------ ROAD
def test_linear_imputation_fills_a_ramp_exactly_and_renormalises_at_the_border():
    rows, cols = np.mgrid[0:9, 0:11].astype(np.float64)
    ramp = np.stack([2.0 * rows - cols + 1.0, 0.5 * rows + 3.0 * cols])  # (2, 9, 11), linear in both channels
    removed = np.zeros((9, 11), dtype=bool)
    removed[3:6, 4:8] = True  # an interior block: every equation has all 8 neighbours
    removed[1, 1] = removed[7, 9] = True
    np.testing.assert_allclose(linear_imputation(ramp, removed), ramp, rtol=0, atol=1e-12)
    # a corner has 3 neighbours, weights 1/6, 1/6, 1/12 renormalised: (2 right + 2 below + diagonal) / 5
    image = np.arange(12, dtype=np.float64).reshape(1, 3, 4) ** 2
    corner = np.zeros((3, 4), dtype=bool)
    corner[0, 0] = True
    expected = (2 * image[0, 0, 1] + 2 * image[0, 1, 0] + image[0, 1, 1]) / 5
    assert linear_imputation(image, corner)[0, 0, 0] == pytest.approx(expected, abs=1e-12)


def test_the_imputation_noise_has_the_asked_standard_deviation_and_is_seeded():
    ramp = np.broadcast_to(np.arange(16.0), (3, 16, 16)).copy()
    removed = np.zeros((16, 16), dtype=bool)
    removed[4:12, 4:12] = True  # 64 pixels x 3 channels = 192 noisy values
    a = noisy_linear_imputation(ramp, removed, 0.01, np.random.default_rng(1))
    b = noisy_linear_imputation(ramp, removed, 0.01, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    residual = (a - ramp)[:, removed]
    assert 0.008 < residual.std() < 0.012  # sample std of 192 normal draws: 0.01 +- 5 % (1 sigma)
    assert np.array_equal(a[:, ~removed], ramp[:, ~removed])


class Detector(nn.Module):
    """logit(object) = 8 x (mean of the 2 x 2 object pixels - 0.5): the object is bright (1) on a dark
    (0) background, so imputing it from its surroundings removes the evidence."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(8, 8, dtype=torch.float64)
        mask[3:5, 3:5] = 0.25
        self.mask = nn.Parameter(mask.reshape(-1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 8.0 * (x.reshape(x.shape[0], -1) @ self.mask - 0.5)
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_road_curves_of_a_good_map_beat_a_random_map():
    model = ImageClassifier(Detector(), labels=["object", "none"], input_shape=(1, 8, 8))
    image = torch.zeros(1, 8, 8, dtype=torch.float64)
    image[0, 3:5, 3:5] = 1.0
    e = explained(model, image)
    good = with_map(e, image.numpy())  # relevance on the object
    noise = with_map(e, np.random.default_rng(0).normal(size=64))
    morf_good, morf_random = (evaluate_metric("road_morf", model, x) for x in (good, noise))
    lerf_good, lerf_random = (evaluate_metric("road_lerf", model, x) for x in (good, noise))
    assert morf_good.value < morf_random.value and lerf_good.value > lerf_random.value
    assert not morf_good.higher_is_better and lerf_good.higher_is_better
    # 10 % of 64 pixels = 6 (floor): MoRF already imputes the whole object (its 4 pixels come first)
    assert morf_good.details["pixels_removed"][0] == 6 and morf_good.details["y"][0] < 0.05
    assert morf_good.forward_passes == 10 and len(morf_good.details["y"]) == 9
    assert morf_good.details["p_full"] == pytest.approx(1 / (1 + math.exp(-4.0)), abs=1e-12)
    assert evaluate_metric("road_morf", model, good).details["y"] == morf_good.details["y"]  # seeded
    with pytest.raises(ParameterError, match="percentages"):
        evaluate_metric("road_morf", model, good, percentages=[50, 20])


# ------------------------------------------------------------------ boxes through the geometry
@pytest.fixture(scope="module")
def stretched() -> Explanation:
    """The tiny CNN on a 30 x 20 (W x H) photo stretched onto its 16 x 16 grid: scale (16/30, 16/20)."""
    return explained(tiny_classifier(), photo(20, 30), target=None)


def test_a_box_maps_onto_the_grid_pixels_whose_centres_it_holds(stretched):
    geometry = stretched.extras["geometry"]
    assert geometry["original_size"] == [30, 20] and geometry["scale"] == [16 / 30, 16 / 20]
    # grid column c has its centre at x = (c + 0.5) x 30 / 16, row r at y = (r + 0.5) x 20 / 16:
    # x >= 15 from c = 8 (8.5 x 1.875 = 15.94; c = 7 gives 14.06), y >= 10 from r = 8 (10.63; r = 7: 9.38)
    mask = np.zeros((20, 30), dtype=bool)
    mask[10:20, 15:30] = True
    expected = np.zeros((16, 16), dtype=bool)
    expected[8:, 8:] = True
    np.testing.assert_array_equal(original_mask_to_grid(mask, geometry), expected)
    # a small box in the corner: x < 4 holds centres c = 0, 1 (2.81 < 4 < 4.69), y < 3 holds r = 0, 1 (1.88 < 3 < 3.13)
    corner = np.zeros((20, 30), dtype=bool)
    corner[0:3, 0:4] = True
    assert np.argwhere(original_mask_to_grid(corner, geometry)).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def grid_map(values: dict[tuple[int, int], float], fill: float = 0.0) -> np.ndarray:
    out = np.full((16, 16), fill)
    for (row, col), value in values.items():
        out[row, col] = value
    return out


BOX = (15, 10, 30, 20)  # the bottom-right quadrant of the 30 x 20 photo: grid rows 8-15, columns 8-15


def test_pointing_game_hits_misses_ties_and_tolerance(stretched):
    def point(scores, **kw):
        return evaluate_metric("pointing_game", None, with_map(stretched, scores), box=BOX, **kw)

    hit = point(grid_map({(10, 12): 5.0}))
    assert hit.value == 1.0 and hit.details["maxima"] == 1 and hit.forward_passes == 0
    assert point(grid_map({(2, 3): 5.0})).value == 0.0
    assert point(grid_map({(2, 3): 5.0, (9, 9): 5.0})).value == 1.0  # a tie with one maximum on the object
    blank = point(grid_map({}))  # all pixels tie (e.g. a CAM that ReLU made all zero): points nowhere
    assert blank.value == 0.0 and blank.details["constant"] and not point(grid_map({(2, 3): 5.0})).details["constant"]
    # row 7 (centre y = 9.38, original pixel row 9) is 1 original pixel above the box's first row (10)
    near = grid_map({(7, 12): 5.0})
    assert point(near).value == 0.0 and point(near, tolerance=1.0).value == 1.0 and point(near, tolerance=15).value == 1.0
    mask = np.zeros((20, 30), dtype=bool)
    mask[10:20, 15:30] = True
    assert evaluate_metric("pointing_game", None, with_map(stretched, near), mask=mask).value == 0.0
    assert get_metric("pointing_game").needs == ("box",)


def test_energy_relevance_mass_and_rank_on_hand_made_maps(stretched):
    inside = np.zeros((16, 16), dtype=bool)
    inside[8:, 8:] = True  # 64 of 256 grid pixels

    def score(name, scores, **kw):
        return evaluate_metric(name, None, with_map(stretched, scores), box=BOX, **kw).value

    # energy: min-max normalised; inside 2, outside 1, one outside pixel 0 -> inside 1, outside 0.5 (191 px), 0 (1 px)
    graded = np.where(inside, 2.0, 1.0)
    graded[0, 0] = 0.0
    assert score("energy_pointing_game", graded) == pytest.approx(64 / (64 + 191 * 0.5), abs=1e-12)
    assert score("energy_pointing_game", inside * 3.0 + 1.0) == pytest.approx(1.0, abs=1e-12)
    # relevance mass: +1 inside (64), outside +1 on 96 pixels and -1 on 96
    signed = np.where(inside, 1.0, 0.0)
    outside = np.flatnonzero(~inside.reshape(-1))
    signed.reshape(-1)[outside[:96]] = 1.0
    signed.reshape(-1)[outside[96:]] = -1.0
    assert score("relevance_mass_accuracy", signed) == pytest.approx(64 / 160, abs=1e-12)
    assert score("relevance_mass_accuracy", signed, relevance="absolute") == pytest.approx(64 / 256, abs=1e-12)
    # rank accuracy: K = 64; the 64 highest are 32 inside and 32 outside
    ranked = np.zeros((16, 16))
    ranked.reshape(-1)[np.flatnonzero(inside.reshape(-1))[:32]] = 2.0
    ranked.reshape(-1)[outside[:32]] = 2.0
    r = evaluate_metric("relevance_rank_accuracy", None, with_map(stretched, ranked), box=BOX)
    assert r.value == 0.5 and r.details["k"] == 64 and r.details["chance"] == 0.25


def test_box_errors(stretched, presence):
    e = with_map(stretched, grid_map({(10, 12): 5.0}))
    with pytest.raises(MetricError, match="needs a box"):
        evaluate_metric("pointing_game", None, e)
    with pytest.raises(MetricError, match=r"not inside the 30 x 20"):
        evaluate_metric("pointing_game", None, e, box=(20, 5, 35, 15))  # right edge beyond the image
    with pytest.raises(MetricError, match="not inside"):
        evaluate_metric("relevance_mass_accuracy", None, e, box=(10, 10, 5, 15))  # right < left
    with pytest.raises(MetricError, match="not both"):
        evaluate_metric("pointing_game", None, e, box=BOX, mask=np.ones((20, 30), dtype=bool))
    with pytest.raises(MetricError, match="mask has shape"):
        evaluate_metric("pointing_game", None, e, mask=np.ones((30, 20), dtype=bool))
    with pytest.raises(MetricError, match="constant"):
        evaluate_metric("energy_pointing_game", None, with_map(stretched, np.ones(256)), box=BOX)


def test_a_box_in_the_cropped_away_part_covers_no_model_pixel():
    model = ImageClassifier(build_tiny_cnn(), ImagePreprocess(crop=16, resize_short_side=20), LABELS)
    e = explained(model, photo(20, 30), target=None)
    assert e.extras["geometry"]["crop_box"] == [7, 2, 23, 18]  # 30 x 20 kept at scale 1, centre 16 x 16 cut out
    with pytest.raises(MetricError, match="covers no pixel"):
        evaluate_metric("pointing_game", model, e, box=(0, 0, 5, 20))  # left of the crop
    assert evaluate_metric("relevance_rank_accuracy", model, e, box=(7, 2, 23, 18)).value == 1.0  # the whole grid


def test_image_metrics_refuse_a_text_explanation():
    e = text_explanation([0.1, 0.2, 0.3])
    for name in ("pointing_game", "road_morf", "relevance_mass_accuracy"):
        with pytest.raises(MetricError, match="is an image metric; .* is a text explanation"):
            evaluate_metric(name, None, e, **({} if name == "road_morf" else {"box": BOX}))


# ------------------------------------------------------------------ complexity
def text_explanation(scores: list[float]) -> Explanation:
    words = [salience.Feature(f"w{i}", 3 * i, 3 * i + 2) for i in range(len(scores))]
    return Explanation(input=" ".join(f.text for f in words), features=words, scores=np.array(scores), method="occlusion",
                       params={}, model="none", target=Target(1, "positive", "probability"), prediction=None)


def test_sparseness_and_complexity_closed_forms():
    f = 8
    uniform, one_hot = text_explanation([0.3] * f), text_explanation([0.0] * 3 + [-2.0] + [0.0] * 4)
    assert evaluate_metric("sparseness", None, uniform).value == pytest.approx(0.0, abs=1e-12)
    assert evaluate_metric("sparseness", None, one_hot).value == pytest.approx((f - 1) / f, abs=1e-12)
    assert evaluate_metric("complexity", None, uniform).value == pytest.approx(math.log(f), abs=1e-12)
    assert evaluate_metric("complexity", None, one_hot).value == 0.0
    # [0, 0, 1, 3]: sorted weights (2i - n - 1) = -3, -1, 1, 3 -> (1 + 9) / (4 x 4); entropy of (1/4, 3/4)
    small = text_explanation([0.0, 3.0, 0.0, -1.0])
    assert evaluate_metric("sparseness", None, small).value == pytest.approx(10 / 16, abs=1e-12)
    assert evaluate_metric("complexity", None, small).value == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)),
                                                                             abs=1e-12)
    with pytest.raises(MetricError, match="every score is 0"):
        evaluate_metric("complexity", None, text_explanation([0.0, 0.0]))


def test_gini_is_the_mean_absolute_difference_over_twice_the_mean_and_entropy_is_scipys():
    stats = require("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(10):
        a = np.abs(rng.normal(size=23)) * (rng.random(23) < 0.6)
        a[0] = 1.0
        mean_difference = np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size**2 * a.mean())
        assert gini(a) == pytest.approx(mean_difference, abs=1e-12)
        signed = a * np.where(rng.random(23) < 0.5, -1, 1)
        assert evaluate_metric("complexity", None, text_explanation(list(signed))).value == \
            pytest.approx(stats.entropy(a), abs=1e-12)


def test_complexity_of_an_image_map_is_over_its_features(stretched):
    single = with_map(stretched, grid_map({(3, 3): -1.0}))
    assert evaluate_metric("sparseness", None, single).value == pytest.approx(255 / 256, abs=1e-12)
    assert evaluate_metric("complexity", None, single).details["max"] == pytest.approx(math.log(256))


# ------------------------------------------------------------------ max-sensitivity
def test_max_sensitivity_is_zero_when_the_map_cannot_change_and_positive_otherwise():
    model, x = linear_rgb()
    e = salience.explain(model, x, "saliency", target=0, output="logit")  # the gradient of a linear logit: constant
    r = evaluate_metric("max_sensitivity", model, e, n_perturbations=3)
    assert r.value == 0.0 and r.details["radius"] == 0.2 and r.forward_passes == 3
    cnn = tiny_classifier()
    e = explained(cnn, photo(), target=None)
    r = evaluate_metric("max_sensitivity", cnn, e, n_perturbations=3, seed=1)
    assert r.value > 0.01 and r.value == max(r.details["ratios"])
    assert evaluate_metric("max_sensitivity", cnn, e, n_perturbations=3, seed=1).details["ratios"] == r.details["ratios"]
    larger = evaluate_metric("max_sensitivity", cnn, e, n_perturbations=3, seed=1, radius=0.6)
    assert larger.value > r.value  # the same draws scaled up three times
    with pytest.raises(ParameterError, match="fraction and baseline are for text"):
        evaluate_metric("max_sensitivity", cnn, e, fraction=0.2)


def test_max_sensitivity_reexplains_with_the_same_patches():
    cnn = tiny_classifier()
    e = salience.explain(cnn, photo(), "occlusion", output="probability", patch_size=4)
    assert len(e.features) == 16
    r = evaluate_metric("max_sensitivity", cnn, e, n_perturbations=2, radius=0.05)
    assert 0 < r.value < 1 and r.forward_passes == 2 * e.cost.forward_passes  # the same occlusion, twice


# ------------------------------------------------------------------ cascading randomisation
def test_cascade_of_a_plain_sequential_cnn_goes_module_by_module_from_the_top():
    names = [name for name, _ in cascade_steps(build_tiny_cnn())]
    assert names == ["7 (Linear)", "3 (Conv2d)", "1 (BatchNorm2d)", "0 (Conv2d)"]


def test_model_randomisation_on_the_tiny_cnn_lowers_the_similarity():
    cnn = tiny_classifier()
    e = explained(cnn, photo(), target=None)
    before = {k: v.clone() for k, v in cnn.model.state_dict().items()}
    r = evaluate_metric("model_randomisation", cnn, e)
    assert len(r.details["correlations"]) == 4 and r.forward_passes == 4
    assert r.value < 0.5 and not r.details["flagged"]
    assert all(torch.equal(v, before[k]) for k, v in cnn.model.state_dict().items())  # the user's model is untouched


# ------------------------------------------------------------------ explanations read back from JSON
def test_json_explanations_of_a_file_are_re_encoded_others_are_refused(tmp_path, presence):
    cnn = tiny_classifier()
    path = tmp_path / "photo.png"
    Image.fromarray(photo()).save(path)
    e = explained(cnn, str(path), target=None)
    loaded = Explanation.from_json(e.to_json())
    assert "_encoded" in e.extras and "_encoded" not in loaded.extras
    a = evaluate_metric("deletion_auc", cnn, e, max_steps=8)
    b = evaluate_metric("deletion_auc", cnn, loaded, max_steps=8)
    assert a.details["y"] == b.details["y"]
    model, tensor_explanation = presence
    with pytest.raises(MetricError, match="keeps no pixels"):
        evaluate_metric("deletion_auc", model, Explanation.from_json(tensor_explanation.to_json()))
    other_grid = dataclasses.replace(tensor_explanation, features=pixel_features((5, 5)), scores=np.ones(25), token_scores=None)
    with pytest.raises(MetricError, match="computed on a"):
        evaluate_metric("deletion_auc", model, other_grid)


# ------------------------------------------------------------------ the zoo model
def test_efficientnet_cascade_and_metrics_on_a_photo():
    data = require("skimage.data")
    model = salience.load_model("zoo:efficientnet-lite0")
    names = [name for name, _ in cascade_steps(model.model)]
    assert names[0] == "head" and names[1:17] == [f"layer {i}" for i in range(15, -1, -1)] and len(names) == 17
    image = data.chelsea()  # 451 x 300 (W x H), the cat roughly in the box below
    e = salience.explain(model, image, "input_x_gradient", output="probability")
    d = evaluate_metric("deletion_auc", model, e, max_steps=8)
    i = evaluate_metric("insertion_auc", model, e, max_steps=8)
    assert d.details["baseline"] == "mean" and i.details["baseline"] == "blur:5"
    assert d.value < i.value  # measured 0.04 and 0.36 (28 steps)
    morf = evaluate_metric("road_morf", model, e, percentages=[30, 60])
    lerf = evaluate_metric("road_lerf", model, e, percentages=[30, 60])
    assert morf.forward_passes == 3 and morf.value < lerf.value  # measured 0.35 and 0.77 (10 ... 90 %)
    assert 0.0 <= evaluate_metric("relevance_mass_accuracy", model, e, box=(100, 20, 300, 250)).value <= 1.0
