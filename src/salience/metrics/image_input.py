"""What image metrics read from an image explanation: the input it explained (as the model saw it),
its map over the model grid, and a box or mask of the user's image mapped onto that grid.

Coordinates of boxes and masks are those of the ORIGINAL image the user gave (before resizing and
cropping): ``box = (left, top, right, bottom)`` in pixels, Pillow's convention (right and bottom
exclusive: the box (0, 0, 2, 1) covers the two top-left pixels), or ``mask`` an (H0, W0) boolean
array. They reach the model grid through the explanation's geometry (``extras["geometry"]``,
:mod:`salience.core.grid`): a grid pixel is inside when its centre falls in a pixel of the region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salience.core.explanation import Explanation
from salience.core.grid import model_grid_scores, original_mask_to_grid
from salience.metrics.base import MetricError


def _what(explanation: Explanation) -> str:
    text = str(explanation.input)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def require_image(explanation: Explanation, metric: str) -> None:
    """Raise :class:`MetricError` unless ``explanation`` explains an image classifier's input."""
    if explanation.kind != "image" or "geometry" not in explanation.extras:
        raise MetricError(f"{metric} is an image metric; the explanation of {_what(explanation)} is a "
                          f"{explanation.kind} explanation")


def single_row(explanation: Explanation, metric: str) -> np.ndarray:
    """The explanation's scores (F,) as float64; one target and finite scores required."""
    if explanation.multi_target:
        raise MetricError(f"{metric} scores one explained class; the explanation of {_what(explanation)} has "
                          f"{explanation.scores.shape[0]} targets (explain one class)")
    scores = np.asarray(explanation.scores, dtype=np.float64)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise MetricError(f"{metric}: the explanation of {_what(explanation)} has no (finite) scores")
    return scores


def image_encoded(model: Any, explanation: Explanation, metric: str) -> Any:
    """The encoded image the explanation explained: kept in memory (``extras["_encoded"]``) by the
    process that explained it, else re-encoded from ``explanation.input`` when that is an image file
    (explanations loaded from JSON keep no pixels). The model grid must match the explanation's."""
    require_image(explanation, metric)
    encoded = explanation.extras.get("_encoded")
    if encoded is None:
        path = Path(str(explanation.input))
        if not path.is_file():
            raise MetricError(f"{metric}: the explanation of {_what(explanation)} keeps no pixels (loaded from JSON?) "
                              "and its input is not an image file; re-explain it in this process")
        encoded = model.encode(str(path))
    grid = list(getattr(encoded, "grid", ()))
    positions = getattr(explanation.features, "positions", None)
    if grid != list(explanation.extras["geometry"]["grid"]) or positions not in (None, encoded.length):
        raise MetricError(f"{metric}: the explanation of {_what(explanation)} was computed on a "
                          f"{explanation.extras['geometry']['grid']} grid; {getattr(model, 'name', 'the model')} "
                          f"encodes it as {grid} (another model?)")
    return encoded


def grid_map(explanation: Explanation, metric: str) -> np.ndarray:
    """The map (H, W) over the model grid: per-pixel scores where the method has them, else each
    pixel gets the mean score of the features covering it (what ``heatmap()`` shows)."""
    require_image(explanation, metric)
    single_row(explanation, metric)
    values = model_grid_scores(explanation)
    if not np.all(np.isfinite(values)):
        raise MetricError(f"{metric}: the map of {_what(explanation)} has pixels no feature covers")
    return values


def original_region(explanation: Explanation, box: Sequence[float] | None, mask: Any, metric: str) -> np.ndarray:
    """The region (H0, W0) bool of the original image given by ``box`` or ``mask`` (exactly one)."""
    require_image(explanation, metric)
    width, height = explanation.extras["geometry"]["original_size"]
    if box is None and mask is None:
        raise MetricError(f"{metric} needs a box (box=(left, top, right, bottom)) or a mask of the object for "
                          f"{_what(explanation)}")
    if box is not None and mask is not None:
        raise MetricError(f"{metric}: give a box or a mask for {_what(explanation)}, not both")
    if mask is not None:
        region = np.asarray(mask)
        if region.shape != (height, width):
            raise MetricError(f"{metric}: the mask has shape {region.shape}; the image {_what(explanation)} is "
                              f"{height} x {width} (H x W)")
        region = region.astype(bool)
    else:
        region = _box_region(box, width, height, explanation, metric)
    if not region.any():
        raise MetricError(f"{metric}: the mask for {_what(explanation)} marks no pixel")
    return region


def _box_region(box: Sequence[float], width: int, height: int, explanation: Explanation, metric: str) -> np.ndarray:
    try:
        left, top, right, bottom = (float(v) for v in box)
    except (TypeError, ValueError):
        raise MetricError(f"{metric}: a box is four numbers (left, top, right, bottom), got {box!r}") from None
    inside = 0 <= left < right <= width and 0 <= top < bottom <= height
    if not inside or not all(math.isfinite(v) for v in (left, top, right, bottom)):
        raise MetricError(f"{metric}: the box {tuple(box)} is not inside the {width} x {height} (W x H) image "
                          f"{_what(explanation)} (need 0 <= left < right <= W, 0 <= top < bottom <= H)")
    cols = np.arange(width) + 0.5  # pixel centres
    rows = np.arange(height) + 0.5
    return ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]


def grid_region(explanation: Explanation, box: Sequence[float] | None, mask: Any, metric: str, *,
                tolerance: float = 0.0) -> np.ndarray:
    """The box or mask as a boolean mask (H, W) over the model grid, grown by ``tolerance`` original
    pixels (centre-to-centre distance) first. Raises :class:`MetricError` when no grid pixel is in
    it (e.g. the object lies in a part of the image the model's crop cut away)."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise MetricError(f"{metric}: tolerance must be a finite number >= 0, got {tolerance}")
    region = original_region(explanation, box, mask, metric)
    if tolerance > 0:
        from scipy.ndimage import distance_transform_edt

        region = distance_transform_edt(~region) <= tolerance
    on_grid = original_mask_to_grid(region, explanation.extras["geometry"])
    if not on_grid.any():
        raise MetricError(f"{metric}: the box or mask of {_what(explanation)} covers no pixel of the model's input "
                          "(cut away by the crop, or smaller than one model pixel)")
    return on_grid
