"""Complexity metrics: how concentrated is an explanation? Computed from its scores alone, over the
explanation's features (pixels, patches, superpixels, words, tokens), for every model kind; no
forward passes (``model`` is not used and may be None). Both read ``|score|``: they measure where
the attribution mass is, not its sign.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from salience.core.explanation import Explanation
from salience.metrics.base import MetricError, MetricResult, register_metric
from salience.metrics.faithfulness import describe


def _magnitudes(explanation: Explanation, metric: str) -> np.ndarray:
    """|scores| (F,) of a one-target explanation, not all zero."""
    if explanation.multi_target:
        raise MetricError(f"{metric} scores one explained target; the explanation of {describe(explanation)} has "
                          f"{explanation.scores.shape[0]}")
    values = np.abs(np.asarray(explanation.scores, dtype=np.float64))
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise MetricError(f"{metric}: the explanation of {describe(explanation)} has no (finite) scores")
    if not values.any():
        raise MetricError(f"{metric} is undefined for {describe(explanation)}: every score is 0")
    return values


def gini(values: np.ndarray) -> float:
    """Gini index of non-negative values, not all zero: ``sum_i (2 i - n - 1) a_(i) / (n sum a)`` with
    ``a_(1) <= ... <= a_(n)`` sorted. 0 when all are equal; (n - 1) / n when one value holds
    everything."""
    a = np.sort(np.asarray(values, dtype=np.float64))
    n = a.shape[0]
    weights = 2 * np.arange(1, n + 1) - n - 1
    return float(np.sum(weights * a) / (n * np.sum(a)))


@register_metric("sparseness", higher_is_better=True, summary="Gini index of |scores| (Chalasani et al.)")
def sparseness(model: Any, explanation: Explanation) -> MetricResult:
    """Sparseness (Chalasani et al., 2020, "Concise explanations of neural networks using adversarial
    training"; Quantus's Sparseness): the Gini index of the features' ``|score|``, in [0, (F - 1) / F].
    Higher is better (sparser: a few features hold the attribution); 0 for a uniform map. Quantus
    adds 1e-7 to every value to avoid 0 / 0; an all-zero explanation is refused here instead.
    No forward passes."""
    values = _magnitudes(explanation, "sparseness")
    return MetricResult("sparseness", gini(values), True, {"features": int(values.shape[0])})


@register_metric("complexity", higher_is_better=False, summary="entropy of |scores| / sum |scores| (Bhatt et al.)")
def complexity(model: Any, explanation: Explanation) -> MetricResult:
    """Complexity (Bhatt et al., 2020, "Evaluating and aggregating feature-based model explanations";
    Quantus's Complexity): the Shannon entropy (natural log) of the distribution
    ``p_i = |score_i| / sum_j |score_j|`` over the features, 0 log 0 = 0; in [0, log F]. Lower is better
    (less complex: the attribution sits on few features); log F for a uniform map, 0 when one feature
    holds everything. ``details["max"]`` is log F. No forward passes."""
    values = _magnitudes(explanation, "complexity")
    p = values / values.sum()
    nonzero = p[p > 0]
    entropy = float(-np.sum(nonzero * np.log(nonzero)))
    return MetricResult("complexity", entropy, False, {"features": int(values.shape[0]), "max": float(np.log(values.shape[0]))})
