"""Plausibility metrics: does the explanation agree with a human rationale?

Every metric takes ``rationale``: one human score per feature of the explanation (same order, same
level), binary (0/1) or graded (>= 0). Graded rationales are binarised as ``rationale > threshold``
(default 0) for F1, IOU, AUPRC / average precision and precision@k. The explanation's ranking is by ``|score|`` by
default (``rank_by="abs"``): human sentiment rationales mark the words that decide the label
whichever way they push, so a strongly negative score on a marked word counts as a hit. Use
``rank_by="score"`` to rank by signed score (only positive evidence counts). Ties keep input order.

The predicted rationale is the top-k features with k = the number of human-marked features unless
``k`` is given. No forward passes: the model is used only to check that the explanation's features
are those it encodes (pass ``model=None`` to skip the check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from salience.core.explanation import Explanation
from salience.errors import ParameterError
from salience.metrics.base import MetricError, MetricResult, register_metric
from salience.metrics.faithfulness import describe, encode_checked

RANK_BY = ("abs", "score")


def _human_marks(model: Any, explanation: Explanation, rationale: Sequence[float] | None, threshold: float,
                 metric: str) -> np.ndarray:
    """The rationale, checked and binarised (``> threshold``)."""
    if rationale is None:
        raise MetricError(f"{metric} needs a human rationale (rationale=...) for {describe(explanation)}")
    values = np.asarray(rationale, dtype=np.float64).reshape(-1)
    n = len(explanation.features)
    if values.shape[0] != n:
        raise MetricError(f"{metric}: the rationale has {values.shape[0]} values but {describe(explanation)} has {n} "
                          f"{explanation.level} features")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise MetricError(f"{metric}: the rationale for {describe(explanation)} must be finite and >= 0")
    if model is not None:
        encode_checked(model, explanation)
    marks = values > threshold
    if not marks.any():
        raise MetricError(f"{metric}: the rationale for {describe(explanation)} marks no feature (above {threshold})")
    return marks


def _ranking_values(explanation: Explanation, rank_by: str) -> np.ndarray:
    if rank_by not in RANK_BY:
        raise ParameterError(f"rank_by must be 'abs' or 'score', got {rank_by!r}")
    return np.abs(explanation.scores) if rank_by == "abs" else np.asarray(explanation.scores, dtype=np.float64)


def _predicted(explanation: Explanation, marks: np.ndarray, rank_by: str, k: int | None) -> tuple[np.ndarray, int]:
    """Boolean mask of the top-k features and k (default: number of human-marked features)."""
    n = len(explanation.features)
    k = int(marks.sum()) if k is None else int(k)
    if not 1 <= k <= n:
        raise ParameterError(f"k must be between 1 and the number of features ({n}), got {k}")
    order = np.argsort(-_ranking_values(explanation, rank_by), kind="stable")
    predicted = np.zeros(n, dtype=bool)
    predicted[order[:k]] = True
    return predicted, k


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@register_metric("token_f1", higher_is_better=True, needs=("rationale",),
                 summary="F1 of the top-k features against the human rationale (ERASER)")
def token_f1(model: Any, explanation: Explanation, *, rationale: Sequence[float] | None = None, threshold: float = 0.0,
             k: int | None = None, rank_by: str = "abs") -> MetricResult:
    """ERASER token-level F1 (DeYoung et al., 2020) of the predicted rationale (top-k features) against
    the human-marked set. Higher is better. 0 forward passes."""
    marks = _human_marks(model, explanation, rationale, threshold, "token_f1")
    predicted, k = _predicted(explanation, marks, rank_by, k)
    hits = int(np.sum(predicted & marks))
    precision, recall = hits / int(predicted.sum()), hits / int(marks.sum())
    return MetricResult("token_f1", _f1(precision, recall), True,
                        {"precision": precision, "recall": recall, "k": k, "predicted": np.flatnonzero(predicted).tolist()})


def spans(selected: np.ndarray, segments: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of consecutive selected features (a run never crosses from one
    text of a pair to the other)."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i, on in enumerate(selected):
        if start is not None and (not on or segments[i] != segments[i - 1]):
            runs.append((start, i))
            start = None
        if on and start is None:
            start = i
    if start is not None:
        runs.append((start, len(selected)))
    return runs


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    intersection = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - intersection
    return intersection / union if union else 0.0


@register_metric("iou_f1", higher_is_better=True, needs=("rationale",),
                 summary="span-level F1, a predicted span matching a human one at IOU >= 0.5 (ERASER)")
def iou_f1(model: Any, explanation: Explanation, *, rationale: Sequence[float] | None = None, threshold: float = 0.0,
           k: int | None = None, rank_by: str = "abs", iou_threshold: float = 0.5) -> MetricResult:
    """ERASER IOU F1 (DeYoung et al., 2020): the predicted rationale (top-k) and the human one are cut
    into maximal contiguous spans of features; a predicted span is a true positive when its best
    IOU with a human span is >= ``iou_threshold``; precision = TP / predicted spans, recall = TP /
    human spans (as ERASER's ``partial_match_score``). Higher is better. 0 forward passes."""
    marks = _human_marks(model, explanation, rationale, threshold, "iou_f1")
    predicted, k = _predicted(explanation, marks, rank_by, k)
    segments = [f.segment for f in explanation.features]
    predicted_spans, human_spans = spans(predicted, segments), spans(marks, segments)
    best = [max(_iou(p, h) for h in human_spans) for p in predicted_spans]
    hits = sum(1 for iou in best if iou >= iou_threshold)
    precision, recall = hits / len(predicted_spans), hits / len(human_spans)
    return MetricResult("iou_f1", _f1(precision, recall), True,
                        {"precision": precision, "recall": recall, "k": k, "predicted_spans": predicted_spans,
                         "human_spans": human_spans, "best_iou": best})


def _pr_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, high to low (tied scores enter
    together), as scikit-learn's ``precision_recall_curve`` before its final (recall 0, precision 1)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # last index of each group of equal scores
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.shape[0] - 1]
    tp = np.cumsum(sorted_labels)[ends]
    precision = tp / (ends + 1)
    recall = tp / labels.sum()
    return precision, recall


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of ``scores`` against binary ``labels``, as scikit-learn's
    ``average_precision_score``: sum over distinct score thresholds (high to low) of
    (R_n - R_{n-1}) * P_n, tied scores entering together (a step function, no interpolation)."""
    precision, recall = _pr_points(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pr_curve_area(labels: np.ndarray, scores: np.ndarray) -> float:
    """Trapezoid area under the precision-recall curve, as ``auc(recall, precision)`` on
    scikit-learn's ``precision_recall_curve`` (the curve starts at recall 0, precision 1): sum of
    (R_n - R_{n-1}) * (P_n + P_{n-1}) / 2. What ERASER and ferret report as "AUPRC". Without ties
    it is never above average precision (a marked feature entering at rank n is credited
    (P_{n-1} + P_n) / 2 <= P_n; ranking (unmarked, marked): 0.25 against 0.5); ties can raise it."""
    precision, recall = _pr_points(labels, scores)
    precision, recall = np.r_[1.0, precision], np.r_[0.0, recall]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def _ranking_metric(name: str, area: Any, model: Any, explanation: Explanation, rationale: Sequence[float] | None,
                    threshold: float, rank_by: str) -> MetricResult:
    marks = _human_marks(model, explanation, rationale, threshold, name)
    value = area(marks, _ranking_values(explanation, rank_by))
    return MetricResult(name, value, True, {"positives": int(marks.sum()), "chance": float(marks.mean())})


@register_metric("auprc", higher_is_better=True, needs=("rationale",),
                 summary="average precision of the feature ranking against the human rationale (= average_precision)")
def auprc(model: Any, explanation: Explanation, *, rationale: Sequence[float] | None = None, threshold: float = 0.0,
          rank_by: str = "abs") -> MetricResult:
    """Average precision (scikit-learn's definition) of the ranking (``|score|`` or score) against the
    binarised human rationale: the same value as ``average_precision`` (ERASER's name), kept under
    its first name so stored results stay readable. Papers' "AUPRC" (ERASER, ferret) is the
    trapezoid area instead: ``auprc_trapezoid``. Higher is better; a random ranking scores about
    the fraction of marked features. 0 forward passes."""
    return _ranking_metric("auprc", average_precision, model, explanation, rationale, threshold, rank_by)


@register_metric("average_precision", higher_is_better=True, needs=("rationale",),
                 summary="average precision of the feature ranking against the human rationale (ERASER's average_precision)")
def average_precision_metric(model: Any, explanation: Explanation, *, rationale: Sequence[float] | None = None,
                             threshold: float = 0.0, rank_by: str = "abs") -> MetricResult:
    """Average precision, sum_n (R_n - R_{n-1}) P_n over distinct thresholds of the ranking
    (``|score|`` or score) against the binarised rationale: scikit-learn's
    ``average_precision_score``, reported by ERASER (DeYoung et al., 2020) as ``average_precision``.
    Higher is better; chance is about the fraction of marked features. 0 forward passes."""
    return _ranking_metric("average_precision", average_precision, model, explanation, rationale, threshold, rank_by)


@register_metric("auprc_trapezoid", higher_is_better=True, needs=("rationale",),
                 summary="trapezoid area under the precision-recall curve (ERASER's and ferret's AUPRC)")
def auprc_trapezoid(model: Any, explanation: Explanation, *, rationale: Sequence[float] | None = None,
                    threshold: float = 0.0, rank_by: str = "abs") -> MetricResult:
    """Area under the precision-recall curve by the trapezoid rule, ``auc(recall, precision)`` on
    scikit-learn's ``precision_recall_curve`` (which starts the curve at recall 0, precision 1): what
    ERASER (DeYoung et al., 2020) and ferret (Attanasio et al., 2023) call AUPRC. Ranking by
    ``|score|`` or score against the binarised rationale. Higher is better; without ties it is at most
    the average precision (by up to 0.25 less on random rankings). 0 forward passes."""
    return _ranking_metric("auprc_trapezoid", pr_curve_area, model, explanation, rationale, threshold, rank_by)


@register_metric("precision_at_k", higher_is_better=True, needs=("rationale",),
                 summary="fraction of the top-k features that are marked (planted) ones")
def precision_at_k(model: Any, explanation: Explanation, *, rationale: Sequence[float] | None = None,
                   threshold: float = 0.0, k: int | None = None, rank_by: str = "abs") -> MetricResult:
    """Precision at k: the fraction of the top-k features that the rationale marks, k = the number
    marked by default (then equal to recall and F1). Meant for ground truth such as planted tokens.
    Higher is better. 0 forward passes."""
    marks = _human_marks(model, explanation, rationale, threshold, "precision_at_k")
    predicted, k = _predicted(explanation, marks, rank_by, k)
    hits = int(np.sum(predicted & marks))
    return MetricResult("precision_at_k", hits / k, True, {"k": k, "hits": hits,
                                                           "predicted": np.flatnonzero(predicted).tolist()})
