"""Image features over the model grid (pixels, clipped patches, SLIC superpixels), their JSON
layouts, and maps from the model grid back to the user's image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salience.core.features import FeatureSet
from salience.core.grid import (
    features_from_layout,
    geometry,
    identity_geometry,
    patch_features,
    pixel_features,
    slic_labels,
    stretch_geometry,
    superpixel_features,
    to_original_grid,
    window_starts,
)
from salience.zoo.efficientnet_lite0 import ImagePreprocess


def _members(features: FeatureSet) -> list[set[int]]:
    groups: list[set[int]] = [set() for _ in range(len(features))]
    for f, p in features.pairs.T.tolist():
        groups[f].add(p)
    return groups


def test_pixels_are_positions_in_row_major_order_described_on_demand():
    features = pixel_features((3, 5))
    assert len(features) == 15 and features.positions == 15
    assert features._items is None  # nothing materialised
    assert features[7].box == (1, 2, 2, 3) and features[7].tokens == (7,) and features[-1].tokens == (14,)
    scores = torch.arange(15.0)
    assert torch.equal(features.aggregate(scores), scores.double())


@pytest.mark.parametrize(("length", "size", "stride", "starts"), [
    (12, 4, 4, [0, 4, 8]), (12, 4, 2, [0, 2, 4, 6, 8]), (12, 5, 5, [0, 5, 10]), (10, 4, 3, [0, 3, 6]), (3, 8, 8, [0]),
])
def test_window_starts_cover_the_grid_and_clip_the_last_window(length, size, stride, starts):
    assert window_starts(length, size, stride) == starts
    covered = set().union(*(range(s, min(s + size, length)) for s in starts))
    assert covered == set(range(length))


def test_patches_partition_the_grid_when_stride_equals_size_and_clip_at_the_edges():
    features = patch_features((7, 10), 4)
    groups = _members(features)
    assert len(features) == 2 * 3
    assert sorted(p for g in groups for p in g) == list(range(70))  # each pixel in exactly one patch
    last = features[len(features) - 1]
    assert last.box == (4, 8, 7, 10) and len(groups[-1]) == 3 * 2  # clipped, not shifted
    assert features[1].box == (0, 4, 4, 8) and set(features[1].tokens) == groups[1]


def test_overlapping_patches_spread_the_mean_of_covering_windows():
    features = patch_features((6, 6), 4, 2)  # starts 0, 2 per axis: 4 windows, centre pixels in all 4
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    spread = features.spread(scores).reshape(6, 6)
    assert spread[0, 0] == 1.0 and spread[5, 5] == 4.0
    assert spread[2, 2] == pytest.approx(2.5) and spread[0, 3] == pytest.approx(1.5)


def test_superpixels_follow_the_image_and_their_layout_rebuilds_them():
    image = np.zeros((12, 16, 3))
    image[:, 8:] = 1.0  # two flat halves
    labels = slic_labels(image, n_segments=2, compactness=10.0, sigma=0.0)
    assert labels.shape == (12, 16) and set(np.unique(labels)) == {0, 1}
    assert len(np.unique(labels[:, :8])) == 1 and len(np.unique(labels[:, 8:])) == 1
    features = superpixel_features(labels, {"method": "slic", "n_segments": 2})
    assert features.layout["n_segments"] == 2 and features[0].box is not None
    rebuilt = features_from_layout(features.layout)
    assert torch.equal(rebuilt.pairs, features.pairs) and rebuilt.level == "superpixel"


@pytest.mark.parametrize("features", [pixel_features((5, 4)), patch_features((9, 9), 4, 3)], ids=["pixel", "patch"])
def test_layouts_rebuild_the_same_features(features):
    rebuilt = features_from_layout(features.layout)
    assert torch.equal(rebuilt.pairs, features.pairs) and len(rebuilt) == len(features)
    assert [f.box for f in rebuilt] == [f.box for f in features]


def test_identity_geometry_returns_the_map_itself():
    grid_map = np.random.default_rng(0).normal(size=(6, 9))
    np.testing.assert_allclose(to_original_grid(grid_map, identity_geometry((6, 9))), grid_map, rtol=0, atol=1e-15)


def test_stretch_geometry_maps_onto_a_non_square_original():
    grid_map = np.tile(np.arange(4.0), (4, 1))  # value = column
    mapped = to_original_grid(grid_map, stretch_geometry((8, 6), (4, 4)))  # original 8 wide, 6 high
    assert mapped.shape == (6, 8)
    np.testing.assert_allclose(mapped[0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])  # bilinear at pixel centres, edges clamped


def test_cropped_geometry_leaves_unseen_pixels_nan_as_the_zoo_preprocess_maps_them():
    preprocess = ImagePreprocess(crop=8, resize_short_side=8)
    size = (20, 10)  # wide image: resized to 16 x 8, centre 8 x 8 kept
    scale, box = preprocess.geometry(size)
    grid_map = np.random.default_rng(1).normal(size=(8, 8))
    mapped = to_original_grid(grid_map, geometry(size, (8, 8), scale, box))
    expected = preprocess.heatmap_to_original(torch.from_numpy(grid_map), size, fill=float("nan")).numpy()
    np.testing.assert_array_equal(mapped, expected)
    assert mapped.shape == (10, 20)
    assert np.isnan(mapped[:, :5]).all() and np.isnan(mapped[:, 15:]).all() and np.isfinite(mapped[:, 5:15]).all()
