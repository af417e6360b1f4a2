"""Image metrics: ROAD (faithfulness with noisy linear imputation) and localisation against a box or
mask of the object (pointing game, energy-based pointing game, relevance mass and rank accuracy).

Deletion / insertion curves, faithfulness correlation, model randomisation and max-sensitivity
work for images too; they live with their text versions (``faithfulness.py``, ``sanity.py``).
Every metric here reads the explanation's map over the model grid (per-pixel scores where the
method has them, else each feature's score on its pixels: what ``Explanation.heatmap`` shows).
Localisation metrics take ``box=(left, top, right, bottom)`` in pixels of the ORIGINAL image the
user gave (Pillow's convention, right and bottom exclusive) or ``mask=`` an (H0, W0) boolean array,
mapped onto the model grid through the explanation's geometry
(:mod:`salience.metrics.image_input`); they need no forward pass (``model`` may be None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from salience.core.explanation import Explanation
from salience.errors import ParameterError
from salience.metrics.base import MetricError, MetricResult, register_metric
from salience.metrics.faithfulness import describe, probability_target, ranking
from salience.metrics.image_input import grid_map, grid_region, image_encoded
from salience.metrics.imputation import noisy_linear_imputation

ROAD_PERCENTAGES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # Quantus: 1, 3, ..., 99 (50 points)
ROAD_NOISE = 0.01  # standard deviation of the imputation noise, normalised-input units (the authors', Quantus's)


# ------------------------------------------------------------------ ROAD
def _percentages(percentages: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(p) for p in percentages)
    if not values or any(not 0 < p < 100 for p in values) or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ParameterError(f"percentages must be increasing numbers strictly between 0 and 100, got {list(percentages)}")
    return values


def _road(model: Any, explanation: Explanation, *, most_relevant_first: bool, percentages: Sequence[float], noise: float,
          seed: int, batch_size: int | None, name: str) -> MetricResult:
    values = _percentages(percentages)
    if not noise >= 0:
        raise ParameterError(f"noise must be >= 0, got {noise}")
    encoded = image_encoded(model, explanation, name)
    scores = grid_map(explanation, name).reshape(-1)
    order = ranking(scores) if most_relevant_first else np.argsort(scores, kind="stable")
    image = encoded.pixels.detach().double().cpu().numpy()
    channels, height, width = image.shape
    positions = height * width
    rng = np.random.default_rng(seed)
    counts = [int(positions * p / 100) for p in values]  # Quantus's int(size * p / 100)
    rows = [image.reshape(channels, positions).T]
    for count in counts:
        removed = np.zeros(positions, dtype=bool)
        removed[order[:count]] = True
        imputed = noisy_linear_imputation(image, removed.reshape(height, width), noise, rng)
        rows.append(imputed.reshape(channels, positions).T)
    batch = torch.from_numpy(np.stack(rows))
    outputs, _ = model.score_inputs(encoded, batch, probability_target(explanation), grad=False, batch_size=batch_size)
    probabilities = outputs.detach().double().cpu().numpy().reshape(-1)
    curve = probabilities[1:]
    return MetricResult(name, float(np.mean(curve)), not most_relevant_first,
                        {"percentages": list(values), "y": curve.tolist(), "pixels_removed": counts,
                         "p_full": float(probabilities[0]), "noise": noise, "seed": seed,
                         "order": "most relevant first" if most_relevant_first else "least relevant first"})


@register_metric("road_morf", higher_is_better=False,
                 summary="mean p(y) with the most relevant 10..90 % of pixels imputed (ROAD, Rong et al.)")
def road_morf(model: Any, explanation: Explanation, *, percentages: Sequence[float] = ROAD_PERCENTAGES,
              noise: float = ROAD_NOISE, seed: int = 0, batch_size: int | None = None) -> MetricResult:
    """ROAD, most relevant first (Rong et al., 2022): for each percentage p, the ``floor(P p / 100)``
    pixels of the model grid with the highest map values (ties in row-major order) are removed by
    noisy linear imputation (:mod:`salience.metrics.imputation`: neighbours' weighted mean plus
    Gaussian noise of std ``noise`` in normalised-input units, seeded) and the target class's
    probability is read. value = the mean of that curve over the percentages (default 10, 20, ..., 90;
    Quantus uses 1, 3, ..., 99). Lower is better: removing what the map ranks first destroys the
    prediction. ``details["y"]`` holds the curve, ``details["p_full"]`` p(y|x).
    len(percentages) + 1 forward passes, and one sparse solve per percentage."""
    return _road(model, explanation, most_relevant_first=True, percentages=percentages, noise=noise, seed=seed,
                 batch_size=batch_size, name="road_morf")


@register_metric("road_lerf", higher_is_better=True,
                 summary="mean p(y) with the least relevant 10..90 % of pixels imputed (ROAD, Rong et al.)")
def road_lerf(model: Any, explanation: Explanation, *, percentages: Sequence[float] = ROAD_PERCENTAGES,
              noise: float = ROAD_NOISE, seed: int = 0, batch_size: int | None = None) -> MetricResult:
    """ROAD, least relevant first (Rong et al., 2022): as :func:`road_morf` but the pixels with the
    LOWEST map values are imputed first (ties in row-major order). Higher is better: what the map
    ranks last does not matter to the model. Same cost as road_morf."""
    return _road(model, explanation, most_relevant_first=False, percentages=percentages, noise=noise, seed=seed,
                 batch_size=batch_size, name="road_lerf")


# ------------------------------------------------------------------ localisation
@register_metric("pointing_game", higher_is_better=True, needs=("box",),
                 summary="1 if the map's maximum lies on the object (box or mask), else 0 (Zhang et al.)")
def pointing_game(model: Any, explanation: Explanation, *, box: Sequence[float] | None = None, mask: Any = None,
                  tolerance: float = 0.0) -> MetricResult:
    """Pointing game (Zhang et al., 2016/2018, "Top-down neural attention by excitation backprop"):
    a hit (1.0) when the maximum of the map over the model grid lies on the object, else 0.0. When
    several grid pixels share the maximum (a patch or superpixel map), any of them on the object is
    a hit (as Quantus's PointingGame), except a constant map (all pixels tie, e.g. a CAM that ReLU
    made all zero): it points nowhere and counts as a miss (``details["constant"]``; Quantus would
    count it as a hit whenever the object is non-empty). ``tolerance``: the object is first grown by this many pixels
    of the ORIGINAL image (default 0, as Quantus; Zhang et al. used 15). Averaged over a dataset it is
    the pointing accuracy. Higher is better. No forward passes."""
    scores = grid_map(explanation, "pointing_game")
    region = grid_region(explanation, box, mask, "pointing_game", tolerance=tolerance)
    maxima = scores == scores.max()
    rows, cols = np.nonzero(maxima)
    constant = bool(maxima.all())
    hit = not constant and bool(np.any(region & maxima))
    return MetricResult("pointing_game", float(hit), True,
                        {"hit": hit, "constant": constant, "maximum": float(scores.max()), "maxima": int(maxima.sum()),
                         "first_maximum": [int(rows[0]), int(cols[0])], "tolerance": tolerance,
                         "region_pixels": int(region.sum())})


@register_metric("energy_pointing_game", higher_is_better=True, needs=("box",),
                 summary="share of the min-max normalised map's energy inside the box or mask (Score-CAM)")
def energy_pointing_game(model: Any, explanation: Explanation, *, box: Sequence[float] | None = None,
                         mask: Any = None) -> MetricResult:
    """Energy-based pointing game (Wang et al., 2020, "Score-CAM"): the map over the model grid is
    min-max normalised to [0, 1] (as Score-CAM's maps are) and value = its sum inside the object /
    its sum over the grid. For a non-negative map whose minimum is 0 (a CAM after ReLU) this is the
    share of positive relevance inside (= relevance_mass_accuracy); for a signed map every pixel
    above the minimum carries some energy. Higher is better (the object's share of the grid is what
    a uniform map scores: ``details["region_share"]``). No forward passes."""
    scores = grid_map(explanation, "energy_pointing_game")
    region = grid_region(explanation, box, mask, "energy_pointing_game")
    low, high = float(scores.min()), float(scores.max())
    if high == low:
        raise MetricError(f"energy_pointing_game is undefined for {describe(explanation)}: the map is constant")
    energy = (scores - low) / (high - low)
    inside, total = float(energy[region].sum()), float(energy.sum())
    return MetricResult("energy_pointing_game", inside / total, True,
                        {"inside": inside, "total": total, "region_share": float(region.mean())})


RELEVANCE = ("positive", "absolute")


@register_metric("relevance_mass_accuracy", higher_is_better=True, needs=("box",),
                 summary="share of the positive relevance that falls inside the box or mask (Arras et al.)")
def relevance_mass_accuracy(model: Any, explanation: Explanation, *, box: Sequence[float] | None = None,
                            mask: Any = None, relevance: str = "positive") -> MetricResult:
    """Relevance mass accuracy (Arras et al., 2022, "CLEVR-XAI"; Quantus's RelevanceMassAccuracy):
    value = R_inside / R_total, the sums over the model grid of the map's positive part
    (``relevance="positive"``, Arras et al.) or of its absolute value (``"absolute"``). In [0, 1];
    higher is better (a uniform map scores the object's share of the grid). Quantus sums the raw,
    signed map (which can leave [0, 1]). No forward passes."""
    if relevance not in RELEVANCE:
        raise ParameterError(f"relevance must be 'positive' or 'absolute', got {relevance!r}")
    scores = grid_map(explanation, "relevance_mass_accuracy")
    region = grid_region(explanation, box, mask, "relevance_mass_accuracy")
    mass = np.maximum(scores, 0.0) if relevance == "positive" else np.abs(scores)
    total = float(mass.sum())
    if total == 0:
        raise MetricError(f"relevance_mass_accuracy is undefined for {describe(explanation)}: the map has no "
                          f"{relevance} relevance")
    inside = float(mass[region].sum())
    return MetricResult("relevance_mass_accuracy", inside / total, True,
                        {"inside": inside, "total": total, "relevance": relevance, "region_share": float(region.mean())})


@register_metric("relevance_rank_accuracy", higher_is_better=True, needs=("box",),
                 summary="share of the K highest-scored pixels inside the box or mask, K its size (Arras et al.)")
def relevance_rank_accuracy(model: Any, explanation: Explanation, *, box: Sequence[float] | None = None,
                            mask: Any = None) -> MetricResult:
    """Relevance rank accuracy (Arras et al., 2022; Quantus's RelevanceRankAccuracy): with K the
    number of model-grid pixels on the object, the fraction of the K pixels with the highest map
    values (signed; ties in row-major order) that lie on it. Higher is better; a random map scores
    about K / P. No forward passes."""
    scores = grid_map(explanation, "relevance_rank_accuracy")
    region = grid_region(explanation, box, mask, "relevance_rank_accuracy").reshape(-1)
    k = int(region.sum())
    top = ranking(scores.reshape(-1))[:k]
    hits = int(region[top].sum())
    return MetricResult("relevance_rank_accuracy", hits / k, True, {"k": k, "hits": hits, "chance": k / region.shape[0]})
