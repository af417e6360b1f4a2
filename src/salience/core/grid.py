"""Image features over a model's pixel grid, and maps from that grid back to the user's image.

Positions are the H x W pixels of the model input in row-major order (position ``p`` is row
``p // W``, column ``p % W``); channels are colour channels. Three feature levels:

* ``pixel``: one feature per position (F = H x W; features are described on demand, never listed);
* ``patch``: square windows of ``size`` pixels every ``stride`` pixels (overlapping when
  ``stride < size``). Windows start at 0, stride, 2 stride, ... until one reaches the bottom/right
  edge; the last row/column of windows is *clipped* at the edge (smaller, never shifted), so the
  whole grid is covered and ``stride == size`` gives a partition;
* ``superpixel``: the segments of scikit-image's SLIC on the model-grid image, its parameters and
  label map recorded.

Each :class:`~salience.core.features.FeatureSet` carries a JSON-ready ``layout`` that
:func:`features_from_layout` turns back into the same features.

Geometry (``Explanation.extras["geometry"]``, JSON-ready), the convention of
``salience.zoo.efficientnet_lite0.ImagePreprocess``: ``original_size = [W0, H0]`` of the image the
user gave, ``grid = [H, W]`` of the model input, ``scale = [sx, sy]`` resized pixels per original
pixel, ``crop_box = [left, top, right, bottom]`` the model input as a box of the resized image.
Coordinates are continuous with pixel edges at integers; original point (x, y) is grid point
(x sx - left, y sy - top). ``exact`` is False when the mapping was assumed (a preprocessing
function that does not describe its geometry is taken to resize the whole image onto the grid).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from salience.core.explanation import decode_array, encode_array
from salience.core.features import Feature, FeatureSet

if TYPE_CHECKING:
    from salience.core.explanation import Explanation

LEVELS = ("pixel", "patch", "superpixel")


# ------------------------------------------------------------------ features
def pixel_features(grid: tuple[int, int]) -> FeatureSet:
    """One feature per pixel of an (H, W) grid, feature i = position i."""
    height, width = grid
    positions = torch.arange(height * width)

    def describe(i: int) -> Feature:
        row, col = divmod(i, width)
        return Feature(f"pixel ({row}, {col})", -1, -1, 0, (i,), (row, col, row + 1, col + 1))

    return FeatureSet(height * width, height * width, torch.stack([positions, positions]), describe, level="pixel",
                      layout={"kind": "pixel", "grid": [height, width]})


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts 0, stride, ... of windows of ``size`` along ``length`` pixels, up to the first window
    that reaches the end (so every pixel is covered; the last window may be clipped)."""
    starts = [0]
    while starts[-1] + size < length:
        starts.append(starts[-1] + stride)
    return starts


def patch_features(grid: tuple[int, int], size: int, stride: int | None = None) -> FeatureSet:
    """Square patches of ``size`` pixels every ``stride`` (default ``size``) pixels, in row-major
    order of their top-left corners; edge patches clipped at the grid's bottom/right edge."""
    stride = size if stride is None else stride
    if size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be at least 1, got size={size}, stride={stride}")
    height, width = grid
    tops, lefts = window_starts(height, size, stride), window_starts(width, size, stride)

    def box(j: int) -> tuple[int, int, int, int]:
        top, left = tops[j // len(lefts)], lefts[j % len(lefts)]
        return top, left, min(top + size, height), min(left + size, width)

    def members(j: int) -> np.ndarray:
        top, left, bottom, right = box(j)
        return (np.arange(top, bottom)[:, None] * width + np.arange(left, right)[None]).reshape(-1)

    def describe(j: int) -> Feature:
        top, left, bottom, right = box(j)
        return Feature(f"patch rows {top}-{bottom - 1}, cols {left}-{right - 1}", -1, -1, 0, tuple(members(j).tolist()),
                       (top, left, bottom, right))

    count = len(tops) * len(lefts)
    groups = [members(j) for j in range(count)]
    pairs = torch.stack([torch.from_numpy(np.repeat(np.arange(count), [len(g) for g in groups])),
                         torch.from_numpy(np.concatenate(groups))])
    layout = {"kind": "patch", "grid": [height, width], "size": size, "stride": stride, "edge": "clipped"}
    return FeatureSet(count, height * width, pairs, describe, level="patch", layout=layout)


def slic_labels(image: np.ndarray, *, n_segments: int, compactness: float, sigma: float) -> np.ndarray:
    """SLIC superpixels (scikit-image) of an (H, W, C) image with values in [0, 1]: labels (H, W),
    0..K-1 without gaps (Lab colour space for 3 channels, as scikit-image does)."""
    from skimage.segmentation import slic

    labels = slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0, channel_axis=-1,
                  convert2lab=image.shape[-1] == 3)
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape)


def superpixel_features(labels: np.ndarray, params: dict[str, Any]) -> FeatureSet:
    """Disjoint features from a label map (H, W) (SLIC's); ``params`` (its settings) go in the layout."""
    labels = np.asarray(labels, dtype=np.int64)
    height, width = labels.shape
    flat = labels.reshape(-1)
    dtype = np.uint16 if flat.max(initial=0) < 2**16 else np.int32

    def describe(k: int) -> Feature:
        where = np.flatnonzero(flat == k)
        rows, cols = where // width, where % width
        return Feature(f"superpixel {k}", -1, -1, 0, tuple(where.tolist()),
                       (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1))

    layout = {"kind": "superpixel", "grid": [height, width], **params, "labels": encode_array(labels.astype(dtype))}
    return FeatureSet.from_assignment(flat, describe, level="superpixel", layout=layout)


def features_from_layout(layout: dict[str, Any]) -> FeatureSet:
    """Rebuild the features an image explanation was computed on from their JSON ``layout``."""
    grid = (int(layout["grid"][0]), int(layout["grid"][1]))
    kind = layout["kind"]
    if kind == "pixel":
        return pixel_features(grid)
    if kind == "patch":
        return patch_features(grid, int(layout["size"]), int(layout["stride"]))
    if kind == "superpixel":
        labels = decode_array(layout["labels"]).astype(np.int64).reshape(grid)
        return superpixel_features(labels, {k: v for k, v in layout.items() if k not in ("kind", "grid", "labels")})
    raise ValueError(f"unknown image feature layout {kind!r}; one of {', '.join(LEVELS)}")


# ------------------------------------------------------------------ geometry
def geometry(original_size: tuple[int, int], grid: tuple[int, int], scale: tuple[float, float],
             crop_box: tuple[int, int, int, int], *, exact: bool = True) -> dict[str, Any]:
    """The JSON-ready geometry dict described in this module's docstring."""
    return {"original_size": [int(original_size[0]), int(original_size[1])], "grid": [int(grid[0]), int(grid[1])],
            "scale": [float(scale[0]), float(scale[1])], "crop_box": [int(v) for v in crop_box], "exact": bool(exact)}


def identity_geometry(grid: tuple[int, int]) -> dict[str, Any]:
    """The geometry of an input given at the model's size (a tensor): grid = original image."""
    height, width = grid
    return geometry((width, height), grid, (1.0, 1.0), (0, 0, width, height))


def stretch_geometry(original_size: tuple[int, int], grid: tuple[int, int]) -> dict[str, Any]:
    """Assumed geometry of an unknown preprocessing: the whole image resized onto the grid."""
    height, width = grid
    return geometry(original_size, grid, (width / original_size[0], height / original_size[1]), (0, 0, width, height),
                    exact=False)


def grid_to_original(heatmap: torch.Tensor, original_size: tuple[int, int], scale: tuple[float, float],
                     crop_box: tuple[int, int, int, int], fill: float = 0.0) -> torch.Tensor:
    """Sample a heatmap (h, w) covering the model grid evenly (h, w = the grid for pixel maps, or a
    coarser map) at every original pixel centre, bilinearly; ``fill`` where the model saw nothing.
    Returns (H0, W0) for ``original_size = (W0, H0)``."""
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be 2-D (h, w), got shape {tuple(heatmap.shape)}")
    width, height = original_size
    (sx, sy), (left, top, right, bottom) = scale, crop_box
    device, dtype = heatmap.device, heatmap.dtype if heatmap.is_floating_point() else torch.float32
    # original pixel centres -> grid coordinates -> grid_sample's [-1, 1] (align_corners=False)
    u = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) * sx - left
    v = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) * sy - top
    gx = (2 * u / (right - left) - 1).to(dtype)
    gy = (2 * v / (bottom - top) - 1).to(dtype)
    points = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    sampled = F.grid_sample(heatmap.to(dtype)[None, None], points, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    inside = ((u >= 0) & (u < right - left))[None, :] & ((v >= 0) & (v < bottom - top))[:, None]
    return torch.where(inside, sampled, torch.full_like(sampled, fill))


def to_original_grid(grid_map: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """A map (H, W) over the model grid as (H0, W0) over the user's image (bilinear at pixel
    centres; NaN where the model saw nothing, e.g. cropped-away borders)."""
    mapped = grid_to_original(torch.as_tensor(np.asarray(grid_map, dtype=np.float64)), tuple(geometry["original_size"]),
                              tuple(geometry["scale"]), tuple(geometry["crop_box"]), fill=math.nan)
    return mapped.numpy()


def model_grid_scores(explanation: Explanation, target: int = 0) -> np.ndarray:
    """Scores (H, W) over the model grid for target number ``target``: the method's per-pixel scores
    when it has them, else each pixel gets the mean score of the features covering it (as Captum's
    Occlusion averages overlapping windows)."""
    height, width = explanation.extras["geometry"]["grid"]
    if explanation.token_scores is not None:
        scores = explanation.token_scores
        return np.asarray(scores[target] if scores.ndim == 2 else scores, dtype=np.float64).reshape(height, width)
    features = explanation.features
    if not isinstance(features, FeatureSet):
        features = FeatureSet.from_features(features, height * width, explanation.level)
    spread = features.spread(torch.as_tensor(explanation.row(target)))
    return spread.numpy().reshape(height, width)


def grid_to_original_points(rows: np.ndarray, cols: np.ndarray, geometry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Original-image coordinates ``(x, y)`` of the centres of model-grid pixels ``(rows, cols)``:
    grid point (u, v) is original point ((u + left) / sx, (v + top) / sy)."""
    (sx, sy), (left, top) = geometry["scale"], geometry["crop_box"][:2]
    x = (np.asarray(cols, dtype=np.float64) + 0.5 + left) / sx
    y = (np.asarray(rows, dtype=np.float64) + 0.5 + top) / sy
    return x, y


def original_mask_to_grid(mask: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """A boolean mask (H0, W0) over the user's image as a boolean mask (H, W) over the model grid,
    the inverse direction of :func:`to_original_grid`: a grid pixel is in the mask when its centre
    falls in a masked original pixel (nearest sampling; a centre on an edge belongs to the pixel on
    its right/below, as with Pillow's pixel squares ``[j, j + 1)``)."""
    mask = np.asarray(mask, dtype=bool)
    width, height = geometry["original_size"]
    if mask.shape != (height, width):
        raise ValueError(f"the mask has shape {mask.shape}; the image is {height} x {width} (H x W)")
    grid_h, grid_w = geometry["grid"]
    x, y = grid_to_original_points(np.arange(grid_h), np.arange(grid_w), geometry)
    cols = np.clip(np.floor(x).astype(np.int64), 0, width - 1)
    rows = np.clip(np.floor(y).astype(np.int64), 0, height - 1)
    return mask[rows[:, None], cols[None, :]]
