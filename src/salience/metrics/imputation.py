"""Noisy linear imputation (Rong et al., 2022, "A consistent and efficient evaluation strategy for
attribution methods", ROAD): removed pixels are filled from their surroundings instead of being set
to a constant, so the model cannot tell WHERE pixels were removed from the shape of the hole.

Each removed pixel's value is the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct
neighbours, 1/12 for the 4 diagonal ones, as the authors' ``NoisyLinearImputer``; renormalised over
the neighbours inside the image), whether those are kept or removed themselves. Written for every
removed pixel this is one sparse linear system, solved with scipy, so a removed region is filled
smoothly from its border. Gaussian noise of standard deviation ``noise`` is then added to each
imputed value (kept pixels are unchanged).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve

# (row offset, column offset), weight: the ROAD authors' neighbourhood
NEIGHBOURS: tuple[tuple[tuple[int, int], float], ...] = (
    ((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12),
    ((0, -1), 1 / 6), ((0, 1), 1 / 6),
    ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12),
)


def linear_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """``image`` (C, H, W) with the pixels of ``removed`` (H, W) bool replaced by the solution of
    ``v_i = sum_j w_ij u_j / sum_j w_ij`` over the in-image neighbours j of each removed pixel i
    (``u_j`` the neighbour's image value if kept, its unknown ``v_j`` if removed). Needs at least
    one kept pixel (otherwise nothing anchors the system)."""
    image = np.asarray(image, dtype=np.float64)
    removed = np.asarray(removed, dtype=bool)
    channels, height, width = image.shape
    if removed.shape != (height, width):
        raise ValueError(f"removed has shape {removed.shape}; the image is {height} x {width}")
    out = image.copy()
    if not removed.any():
        return out
    if removed.all():
        raise ValueError("cannot impute an image with every pixel removed")
    rows, cols = np.nonzero(removed)
    count = rows.shape[0]
    variable = np.full((height, width), -1, dtype=np.int64)
    variable[rows, cols] = np.arange(count)
    flat = image.reshape(channels, -1)
    diagonal = np.zeros(count)
    right = np.zeros((count, channels))
    entries_i, entries_j, entries_w = [], [], []
    for (dr, dc), weight in NEIGHBOURS:
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        diagonal[inside] += weight
        equations = np.flatnonzero(inside)
        neighbour = variable[r[inside], c[inside]]
        unknown = neighbour >= 0
        entries_i.append(equations[unknown])
        entries_j.append(neighbour[unknown])
        entries_w.append(np.full(int(unknown.sum()), -weight))
        known = equations[~unknown]
        right[known] += weight * flat[:, r[inside][~unknown] * width + c[inside][~unknown]].T
    i = np.concatenate([np.arange(count), *entries_i])
    j = np.concatenate([np.arange(count), *entries_j])
    w = np.concatenate([diagonal, *entries_w])
    system = coo_matrix((w, (i, j)), shape=(count, count)).tocsc()
    solution = np.asarray(spsolve(system, right)).reshape(count, channels)
    out[:, rows, cols] = solution.T
    return out


def noisy_linear_imputation(image: np.ndarray, removed: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """:func:`linear_imputation` plus Gaussian noise (standard deviation ``noise``, in the image's
    units) on every imputed value, drawn from ``rng``."""
    out = linear_imputation(image, removed)
    if noise > 0:
        rows, cols = np.nonzero(np.asarray(removed, dtype=bool))
        out[:, rows, cols] += rng.normal(0.0, noise, size=(out.shape[0], rows.shape[0]))
    return out
