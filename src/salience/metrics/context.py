"""Metrics of context attribution for a causal LM's response (ContextCite's evaluation, Cohen-Wang
et al. 2024, section 4): does removing the sources an explanation ranks highest lower the
response's probability, and do its scores, read as a linear model, predict what random ablations
of the context do?

Both re-run the explained prompt with its response teacher-forced (the same tokens: a different
tokenisation is a :class:`MetricError`) and remove sources as the explanation's method did
(``params["baseline"]``, by default deletion). The quantity read is the log-probability S of the
explanation's target ``target`` (its span of response tokens, or its one token), in nats: the sum
of log p(y_j | context, y_<j) over its tokens. Sources are the features scored (finite) for that
target.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from salience.core.explanation import Explanation
from salience.core.features import as_feature_set
from salience.core.target import Target
from salience.errors import ParameterError
from salience.methods.context_cite import ablation_masks, response_tokens
from salience.metrics.base import MetricError, MetricResult, register_metric
from salience.metrics.faithfulness import describe, pearson, ranking
from salience.models.base import Encoded

__all__ = ["linear_datamodeling_score", "response_log_probabilities", "spearman", "top_k_drop"]


def response_log_probabilities(model: Any, explanation: Explanation, keep: np.ndarray, *, target: int = 0,
                               baseline: str | None = None, batch_size: int | None = None) -> np.ndarray:
    """S (nats) of target ``target`` for each row of ``keep`` (B, F) bool (features not kept removed):
    one batched ``score_perturbed`` call, all its tokens' log-probabilities read in one pass per row."""
    if not 0 <= target < len(explanation.targets):
        raise ParameterError(f"target {target} is out of range: the explanation has {len(explanation.targets)} targets")
    encoded = _encoded(model, explanation)
    tokens, groups = response_tokens([_as_log_probability(explanation.targets[target])])
    removal = baseline or str(explanation.params.get("baseline", "delete"))
    features = as_feature_set(list(explanation.features), encoded.length, explanation.level)
    values = model.score_perturbed(encoded, torch.as_tensor(keep, dtype=torch.bool), features, removal, tokens,
                                   batch_size=batch_size)
    return np.asarray(values.double().cpu().numpy(), dtype=np.float64).reshape(len(keep), -1)[:, groups[0]].sum(axis=1)


@register_metric("top_k_drop", higher_is_better=True,
                 summary="Drop of the response's log-probability when the k top-scored context sources are removed (ContextCite)")
def top_k_drop(model: Any, explanation: Explanation, *, k: int = 3, target: int = 0, baseline: str | None = None,
               batch_size: int | None = None) -> MetricResult:
    """S(full context) - S(context without the ``k`` sources of highest score for ``target``), nats
    (ties: the earlier source first; k is capped at the number of sources). Higher is better: the
    sources ranked first are the ones the response needs. 2 forward rows."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ParameterError(f"k must be a positive number of sources, got {k!r}")
    scores, sources = _source_scores(explanation, target)
    top = sources[ranking(scores[sources])[:min(int(k), len(sources))]]
    keep = np.ones((2, len(explanation.features)), dtype=bool)
    keep[1, top] = False
    full, removed = response_log_probabilities(model, explanation, keep, target=target, baseline=baseline, batch_size=batch_size)
    return MetricResult("top_k_drop", float(full - removed), True,
                        {"k": len(top), "removed": top.tolist(), "log_probability": float(full), "log_probability_removed": float(removed)})


@register_metric("linear_datamodeling_score", higher_is_better=True,
                 summary="Spearman correlation of the scores' linear predictions with held-out context ablations (ContextCite's LDS)")
def linear_datamodeling_score(model: Any, explanation: Explanation, *, n_ablations: int = 32, keep_prob: float = 0.5,
                              seed: int = 1, target: int = 0, baseline: str | None = None,
                              batch_size: int | None = None) -> MetricResult:
    """Spearman's rho between sum_i score_i m_i (the scores read as a linear model of the kept-source
    masks m; an intercept changes no rank) and the response's log-probability S under each of
    ``n_ablations`` held-out masks (each source kept with probability ``keep_prob``,
    ``numpy.random.default_rng(seed)``; use a seed other than the explanation's so the masks are
    not the ones it was fitted on). A ContextCite surrogate predicts log-odds, an increasing
    function of S: the ranks, hence rho, are the same. In [-1, 1], higher is better. n_ablations
    forward rows."""
    if isinstance(n_ablations, bool) or not isinstance(n_ablations, (int, np.integer)) or n_ablations < 3:
        raise ParameterError(f"n_ablations must be at least 3, got {n_ablations!r}")
    if not 0.0 < keep_prob < 1.0:
        raise ParameterError(f"keep_prob is a probability strictly between 0 and 1, got {keep_prob}")
    scores, sources = _source_scores(explanation, target)
    masks = ablation_masks(len(sources), int(n_ablations), keep_prob, np.random.default_rng(seed))
    keep = np.ones((len(masks), len(explanation.features)), dtype=bool)
    keep[:, sources] = masks
    actual = response_log_probabilities(model, explanation, keep, target=target, baseline=baseline, batch_size=batch_size)
    predicted = masks.astype(np.float64) @ scores[sources]
    rho = spearman(predicted, actual)
    if not np.isfinite(rho):
        raise MetricError(f"linear_datamodeling_score is undefined for {describe(explanation)}: the predictions or the "
                          "ablations' log-probabilities are all equal")
    return MetricResult("linear_datamodeling_score", rho, True,
                        {"predicted": predicted.tolist(), "log_probability": actual.tolist(), "seed": seed})


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their average
    rank); NaN when either is constant."""
    return pearson(_average_ranks(a), _average_ranks(b))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def _source_scores(explanation: Explanation, target: int) -> tuple[np.ndarray, np.ndarray]:
    """The scores of row ``target`` and the indices of the features scored for it (finite)."""
    scores = np.asarray(explanation.scores, dtype=np.float64)
    scores = scores[None] if scores.ndim == 1 else scores
    if not 0 <= target < scores.shape[0]:
        raise ParameterError(f"target {target} is out of range: the explanation has {scores.shape[0]} targets")
    sources = np.flatnonzero(np.isfinite(scores[target]))
    if len(sources) == 0:
        raise MetricError(f"the explanation of {describe(explanation)} scores no source for target {target}")
    return scores[target], sources


def _as_log_probability(target: Target) -> Target:
    """The same tokens read as their log-probability (a contrast's foil dropped: the response's own)."""
    return replace(target, output="log_probability", foil=None)


def _encoded(model: Any, explanation: Explanation) -> Encoded:
    """The explained prompt with its response teacher-forced, checked to give the same tokens: a given
    continuation is tokenised again, a generated one generated again (its decoding passes count)."""
    extras = explanation.extras
    if "continuation" not in extras or "prompt" not in extras:
        raise MetricError(f"the explanation of {describe(explanation)} is not of a causal LM's response")
    prompt = extras.get("messages") or extras["prompt"]
    if extras.get("generated"):  # generated again (greedy, or sampled with its seed): a decoded text may not re-tokenise alike
        new = len(explanation.tokens) - int(extras["prompt_length"])
        encoded: Encoded = model.encode(prompt, max_new_tokens=new, sample=bool(extras.get("sample", False)),
                                        seed=int(extras.get("seed", 0)), truncate=explanation.truncated, step_scores=False)
    else:
        encoded = model.encode(prompt, continuation=extras["continuation"], truncate=explanation.truncated)
    if list(encoded.tokens) != list(explanation.tokens):
        raise MetricError(f"re-encoding {describe(explanation)} gives other tokens than the explanation's "
                          "(another model or tokenizer?)")
    return encoded
