"""Per-map and per-pair measures of the binarized-network saliency study (scripts/study_bnn_saliency.py).

A map is a (28, 28) float array of one method's scores on one image (pixel level). The measures are
scale-free, so that maps of different networks and methods, whose values differ by orders of
magnitude, compare:

* :func:`rank_correlation`: Spearman's rho of two maps over the 784 pixels (average ranks for ties;
  NaN when either map is constant).
* :func:`block_means` then :func:`rank_correlation`: the same on 4 x 4-pixel block means (7 x 7
  cells), the maps' coarse structure, insensitive to pixel-level speckle.
* :func:`ssim01`: SSIM (scikit-image's ``structural_similarity``, its defaults: 7 x 7 uniform
  window, K1 0.01, K2 0.03) of the two maps each min-max normalised to [0, 1], ``data_range=1``;
  NaN when either map is constant (two flat maps would score a meaningless 1).
* :func:`tv_ratio`: total variation over L1 norm, sum of |horizontal| and |vertical| neighbour
  differences divided by sum |m| (anisotropic TV; dimensionless; 0 for a flat map, 4 for a
  single bright pixel away from the border, about 4 (n - 1) / (3 n) = 1.29 at n x n = 28 x 28 for
  independent uniform noise; NaN for an all-zero map).
* :func:`garment_mass`: the share of sum |m| that lies on garment pixels (input > 0); its chance
  level is the garment's share of the picture.
* :func:`peak_on_garment`: whether the map's highest-scoring pixel (the first one deletion removes)
  is a garment pixel; None for a constant map.

Pairings for reference values: :func:`derangement` (every image paired with another one) and
:func:`same_class_derangement` (with another image of the same class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

from salience.evaluate.summary import bootstrap_ci
from salience.metrics.sanity import spearman


def is_constant(m: np.ndarray) -> bool:
    """True when every value of ``m`` is the same (a map that ranks nothing)."""
    return bool(np.ptp(m) == 0)


def minmax(m: np.ndarray) -> np.ndarray:
    """``(m - min) / (max - min)`` in [0, 1] (float64); a constant map gives zeros."""
    m = np.asarray(m, dtype=np.float64)
    span = float(np.ptp(m))
    return np.zeros_like(m) if span == 0 else (m - m.min()) / span


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho between two maps of the same shape (NaN when either is constant)."""
    return spearman(np.ravel(a), np.ravel(b))


def block_means(m: np.ndarray, size: int) -> np.ndarray:
    """The 2-D map averaged over ``size`` x ``size`` blocks (its sides must be multiples of ``size``):
    its coarse structure, what the eye compares first (28 x 28 -> 7 x 7 for size 4)."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] % size or m.shape[1] % size:
        raise ValueError(f"block_means needs a 2-D map whose sides are multiples of {size}, got shape {m.shape}")
    return m.reshape(m.shape[0] // size, size, m.shape[1] // size, size).mean(axis=(1, 3))


def ssim01(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 2-D maps, each min-max normalised to [0, 1], ``data_range=1`` (NaN when either
    map is constant)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim01 compares two 2-D maps of one shape, got {a.shape} and {b.shape}")
    if is_constant(a) or is_constant(b):
        return float("nan")
    return float(structural_similarity(minmax(a), minmax(b), data_range=1.0))


def tv_ratio(m: np.ndarray) -> float:
    """Anisotropic total variation of the 2-D map divided by its L1 norm (NaN when all zero)."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"tv_ratio needs a 2-D map, got shape {m.shape}")
    mass = float(np.abs(m).sum())
    if mass == 0:
        return float("nan")
    tv = float(np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum())
    return tv / mass


def garment_mass(m: np.ndarray, garment: np.ndarray) -> float:
    """Share of the map's absolute mass sum |m| on the ``garment`` pixels (boolean, same shape);
    NaN when the map is all zero."""
    weight = np.abs(np.asarray(m, dtype=np.float64))
    total = float(weight.sum())
    return float("nan") if total == 0 else float(weight[garment].sum() / total)


def peak_on_garment(m: np.ndarray, garment: np.ndarray) -> bool | None:
    """Whether the highest-scoring pixel (the first in raster order among ties) is a garment pixel;
    None for a constant map."""
    if is_constant(m):
        return None
    return bool(np.ravel(garment)[int(np.argmax(np.ravel(m)))])


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """``partner[i] != i`` for every i: one random cycle through ``0 .. n-1`` (needs n >= 2)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def same_class_derangement(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``partner[i]``: another image of ``labels[i]``'s class (a random cycle within each class);
    -1 for an image alone in its class."""
    labels = np.asarray(labels)
    partner = np.full(len(labels), -1, dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) >= 2:
            partner[members] = members[derangement(len(members), rng)]
    return partner


@dataclass(frozen=True)
class Stat:
    """Mean of the finite values with a percentile-bootstrap 95 % interval; ``missing`` NaN values
    left out."""

    mean: float
    low: float
    high: float
    n: int
    missing: int

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        text = f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"
        return text + (f" ({self.missing} undefined)" if self.missing else "")


def stat(values: np.ndarray | list[float], seed: int = 0) -> Stat:
    """:class:`Stat` of ``values`` (NaN = undefined, left out and counted); 2,000 bootstrap
    resamples seeded by ``seed`` (:func:`salience.evaluate.summary.bootstrap_ci`)."""
    data = np.asarray(values, dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return Stat(float("nan"), float("nan"), float("nan"), 0, int(data.size))
    low, high = bootstrap_ci(finite, seed=seed)
    return Stat(float(finite.mean()), low, high, int(finite.size), int(data.size - finite.size))
