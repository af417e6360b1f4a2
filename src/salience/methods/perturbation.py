"""Perturbation methods: they only ask the model for outputs on inputs with features removed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from salience.core.registry import register
from salience.errors import ParameterError
from salience.methods.base import Attribution, Context


def perturbed_outputs(ctx: Context, keep: np.ndarray, baseline: str) -> np.ndarray:
    """Explained output of every target for each row of ``keep`` (B, F) bool (features not kept are
    removed): (B, T). One set of rows serves every target."""
    rows = torch.as_tensor(keep, dtype=torch.bool)
    values = ctx.model.score_perturbed(ctx.encoded, rows, ctx.features, baseline, ctx.targets, ctx.batch_size)
    return values.double().cpu().numpy().reshape(len(keep), len(ctx.targets))


@register("occlusion", aliases=("leave_one_out", "loo", "feature_ablation", "ablation"), kind="perturbation",
          cost="features + 1 forward", summary="Output drop when one feature is removed (leave-one-out)")
@dataclass
class Occlusion:
    """Feature score = F(x) - F(x without the feature); the feature is replaced by the ``baseline``
    (text: the [MASK] token by default, "pad", "unk", or "delete"; images: the adapter's baselines,
    e.g. a black or blurred patch). With the same baseline this equals exact SIG. All targets share
    the F + 1 rows."""

    baseline: str | None = None

    def attribute(self, ctx: Context) -> Attribution:
        baseline = ctx.baseline(self.baseline, "mask", perturbation=True)
        n = len(ctx.features)
        keep = np.vstack([np.ones((1, n), bool), ~np.eye(n, dtype=bool)])
        values = perturbed_outputs(ctx, keep, baseline)  # (F + 1, T)
        return Attribution(scores=(values[0][None] - values[1:]).T, output_value=values[0], details={"baseline": baseline})


@register("lime", kind="perturbation", cost="n_samples forward",
          summary="Weighted ridge surrogate fitted on random feature removals")
@dataclass
class Lime:
    """LIME for text (Ribeiro et al., 2016), as the ``lime`` package samples: row 0 is the input,
    each other row removes k ~ U{1..F} features chosen uniformly. Rows are weighted by
    sqrt(exp(-d^2 / kernel_width^2)), d = 100 x cosine distance to the input's all-ones vector; the
    score is the coefficient of a weighted ridge regression (penalty ``alpha``, intercept
    unpenalised) of the output on the kept-feature indicators. All targets share the rows; each
    target's surrogate is fitted on the features that can influence it (all, for a classifier).
    ``baseline=None``: words deleted for text (as the lime package does), the adapter's default
    otherwise."""

    n_samples: int = 500
    kernel_width: float = 25.0
    alpha: float = 1.0
    baseline: str | None = None

    def attribute(self, ctx: Context) -> Attribution:
        if self.n_samples < 2:
            raise ParameterError("lime needs n_samples >= 2")
        baseline = ctx.baseline(self.baseline, "delete", perturbation=True)
        keep = lime_samples(len(ctx.features), self.n_samples, ctx.rng())
        values = perturbed_outputs(ctx, keep, baseline)
        scores = np.full((len(ctx.targets), len(ctx.features)), np.nan)
        intercepts = []
        for t, columns in enumerate(ctx.available):
            coef, intercept = fit_lime(keep[:, columns], values[:, t], self.kernel_width, self.alpha)
            scores[t, columns] = coef
            intercepts.append(intercept)
        return Attribution(scores=scores, output_value=values[0],
                           details={"baseline": baseline, "intercept": intercepts[0] if len(intercepts) == 1 else intercepts})


def lime_samples(n_features: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Kept-feature rows (n_samples, F): row 0 keeps all, each other removes k ~ U{1..F} features."""
    keep = np.ones((n_samples, n_features), dtype=bool)
    for row, k in enumerate(rng.integers(1, n_features + 1, size=n_samples - 1), start=1):
        keep[row, rng.choice(n_features, size=k, replace=False)] = False
    return keep


def fit_lime(keep: np.ndarray, values: np.ndarray, kernel_width: float, alpha: float) -> tuple[np.ndarray, float]:
    """Coefficients and intercept of the weighted ridge surrogate, weights from the cosine kernel."""
    if keep.shape[1] == 0:
        return np.zeros(0), float(values[0])
    kept = keep.sum(1)
    cosine_distance = 1.0 - kept / np.sqrt(np.maximum(kept, 1) * keep.shape[1])
    weights = np.sqrt(np.exp(-((100 * cosine_distance) ** 2) / kernel_width**2))
    return weighted_ridge(keep.astype(np.float64), values, weights, alpha)


def weighted_ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """argmin_b,c sum_i w_i (y_i - x_i b - c)^2 + alpha |b|^2 (intercept c unpenalised), as
    scikit-learn's ``Ridge(alpha).fit(x, y, sample_weight=w)``."""
    share = w / w.sum()
    x_mean, y_mean = share @ x, float(share @ y)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ (w[:, None] * xc) + alpha * np.eye(x.shape[1])
    coef = np.linalg.solve(gram, xc.T @ (w * yc))
    return coef, y_mean - float(x_mean @ coef)


@register("kernel_shap", aliases=("shap", "kernelshap", "shapley"), kind="perturbation",
          cost="2^features forward (exact) or n_samples + 2 forward",
          summary="Shapley values of features: exact by enumeration for few features, else paired KernelSHAP")
@dataclass
class KernelShap:
    """Shapley values of the game v(S) = F(x with only the features in S kept; the rest replaced by
    ``baseline`` or deleted). Exact by enumerating all 2^F coalitions when F <= ``max_exact``;
    otherwise KernelSHAP (Lundberg & Lee, 2017) with ``n_samples`` coalitions: small and large
    coalition sizes enumerated whole while the budget allows, the rest drawn from the Shapley
    kernel and paired with their complements (see :func:`kernel_shap_design`), solved as weighted
    least squares under the efficiency constraint, so scores sum to F(x) - v(empty set).

    All targets share the coalitions. A feature that cannot influence a target (a causal LM's later
    token) is a null player: exactly 0 in the enumeration; the sampled regression of that target
    is solved over the features that can influence it. ``baseline=None``: [MASK] for text, the
    adapter's default otherwise."""

    n_samples: int = 512
    max_exact: int = 10
    baseline: str | None = None

    def attribute(self, ctx: Context) -> Attribution:
        baseline = ctx.baseline(self.baseline, "mask", perturbation=True)
        n = len(ctx.features)
        if n <= self.max_exact:
            keep = ((np.arange(2**n)[:, None] >> np.arange(n)[None]) & 1).astype(bool)
            values = perturbed_outputs(ctx, keep, baseline)  # row r keeps the features whose bits are set in r
            scores = np.stack([exact_shapley(keep, values[:, t]) for t in range(values.shape[1])])
            full, empty = values[-1], values[0]
            details: dict[str, object] = {"exact": True, "coalitions": 2**n}
        else:
            keep, weights = kernel_shap_design(n, self.n_samples, ctx.rng())
            ends = np.vstack([np.ones((1, n), bool), np.zeros((1, n), bool)])
            values = perturbed_outputs(ctx, np.vstack([ends, keep]), baseline)
            full, empty = values[0], values[1]
            scores = np.full((values.shape[1], n), np.nan)
            for t, columns in enumerate(ctx.available):
                scores[t, columns] = constrained_kernel_regression(keep[:, columns].astype(np.float64), values[2:, t] - empty[t],
                                                                   weights, full[t] - empty[t])
            details = {"exact": False, "coalitions": len(keep)}
        delta = np.nansum(scores, axis=1) - (full - empty)
        return Attribution(scores=scores, output_value=full, baseline_value=empty, delta=delta,
                           details={**details, "baseline": baseline})


def exact_shapley(keep: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Shapley values from the value of every coalition (rows of ``keep``, all 2^F of them)."""
    n = keep.shape[1]
    codes = keep.astype(np.int64) @ (1 << np.arange(n))
    by_code = np.empty(2**n)
    by_code[codes] = values
    sizes = keep.sum(1)
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
    scores = np.zeros(n)
    for i in range(n):
        without = codes[~keep[:, i]]
        gains = by_code[without | (1 << i)] - by_code[without]
        scores[i] = float(weight[sizes[~keep[:, i]]] @ gains)
    return scores


def kernel_shap_design(n: int, n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions (rows, n) and their regression weights for KernelSHAP.

    The Shapley kernel gives coalition size s the total mass (n - 1) / (s (n - s)). Size layers are
    taken from the outside in (s and n - s together): a layer that fits in the remaining budget is
    enumerated whole, each coalition weighted with its exact kernel weight; the remaining mass is
    sampled (sizes proportional to their mass, each draw paired with its complement) with equal
    weights. With n_samples >= 2^n - 2 every coalition is enumerated and the result is exact.
    """
    sizes = np.arange(1, n)
    mass = (n - 1) / (sizes * (n - sizes))
    rows: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    budget = n_samples
    remaining = list(range(1, n // 2 + 1)) if n > 1 else []  # s <= n // 2: layer {s, n - s} once
    while remaining:
        small = remaining[0]
        layer = sorted({small, n - small})
        count = sum(math.comb(n, s) for s in layer)
        if count > budget:
            break
        for s in layer:
            members = _all_coalitions(n, s)
            rows.append(members)
            weights.append(np.full(len(members), mass[s - 1] / len(members)))
        budget -= count
        remaining.pop(0)
    left = [s for small in remaining for s in sorted({small, n - small})]
    if left and budget >= 2:
        p = mass[np.array(left) - 1] / mass[np.array(left) - 1].sum()
        half = budget // 2
        drawn = np.zeros((half, n), dtype=bool)
        for row, size in enumerate(rng.choice(left, size=half, p=p)):
            drawn[row, rng.choice(n, size=size, replace=False)] = True
        rows.append(np.vstack([drawn, ~drawn]))
        weights.append(np.full(2 * half, mass[np.array(left) - 1].sum() / (2 * half)))
    if not rows:
        return np.zeros((0, n), dtype=bool), np.zeros(0)
    return np.vstack(rows), np.concatenate(weights)


def _all_coalitions(n: int, size: int) -> np.ndarray:
    members = np.zeros((math.comb(n, size), n), dtype=bool)
    for row, chosen in enumerate(combinations(range(n), size)):
        members[row, list(chosen)] = True
    return members


def constrained_kernel_regression(z: np.ndarray, y: np.ndarray, w: np.ndarray, total: float) -> np.ndarray:
    """argmin_phi sum_i w_i (y_i - z_i phi)^2 subject to sum(phi) = total, in closed form (KKT)."""
    if z.shape[1] == 0:
        return np.zeros(0)
    a = z.T @ (w[:, None] * z)
    b = z.T @ (w * y)
    a_inv_b = np.linalg.lstsq(a, b, rcond=None)[0]
    a_inv_1 = np.linalg.lstsq(a, np.ones(len(b)), rcond=None)[0]
    return a_inv_b - a_inv_1 * (a_inv_b.sum() - total) / a_inv_1.sum()
