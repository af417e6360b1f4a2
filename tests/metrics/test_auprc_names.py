"""Average precision and the trapezoid AUPRC under their literature names, against hand-computed
rankings and scikit-learn (the functions ERASER and ferret call)."""

from __future__ import annotations

import numpy as np
import pytest

from oracles import require
from salience.core.explanation import Explanation, Feature
from salience.core.target import Prediction, Target
from salience.metrics import evaluate_metric
from salience.metrics.base import MetricError
from salience.metrics.plausibility import average_precision, pr_curve_area

NAMES = ("auprc", "average_precision", "auprc_trapezoid")


def made_up(scores) -> Explanation:
    features = [Feature(f"w{i}", 3 * i, 3 * i + 2, 0, (i + 1,)) for i in range(len(scores))]
    return Explanation(input=" ".join(f.text for f in features), features=features, scores=np.asarray(scores, dtype=float),
                       method="occlusion", params={}, model="none", target=Target(1, "positive"),
                       prediction=Prediction(1, "positive", (0.2, 0.8)))


def test_hand_ranking():
    # ranking 1 0 1 0: points (R, P) = (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2) after (0, 1)
    labels, scores = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(labels, scores) == pytest.approx(1 / 2 * 1 + 1 / 2 * 2 / 3, abs=1e-15)  # 5/6
    # trapezoids: 1/2 * (1 + 1) / 2 + 0 + 1/2 * (1/2 + 2/3) / 2 + 0 = 19/24
    assert pr_curve_area(labels, scores) == pytest.approx(19 / 24, abs=1e-15)
    # a tie between a marked and an unmarked word: one point (R, P) = (1/2, 1/2), then (1, 2/3)
    tied = np.array([0.5, 0.5, 0.2, 0.1])
    assert average_precision(labels, tied) == pytest.approx(1 / 2 * 1 / 2 + 1 / 2 * 2 / 3, abs=1e-15)
    assert pr_curve_area(labels, tied) == pytest.approx(1 / 2 * (1 + 1 / 2) / 2 + 1 / 2 * (1 / 2 + 2 / 3) / 2, abs=1e-15)


def test_against_sklearn_on_random_rankings():
    metrics = require("sklearn.metrics")
    rng = np.random.default_rng(1)
    gaps = []
    for size in (2, 5, 15, 40):
        for _ in range(40):
            labels = rng.integers(0, 2, size=size)
            labels[rng.integers(size)] = 1  # at least one marked feature
            scores = np.round(rng.normal(size=size), 1)  # rounding makes ties
            precision, recall, _ = metrics.precision_recall_curve(labels, scores)
            # 1e-12: the same sums in another order (float64 rounding only)
            assert pr_curve_area(labels, scores) == pytest.approx(metrics.auc(recall, precision), abs=1e-12)
            assert average_precision(labels, scores) == pytest.approx(metrics.average_precision_score(labels, scores), abs=1e-12)
            gaps.append(pr_curve_area(labels, scores) - average_precision(labels, scores))
    assert min(gaps) < -0.1  # the two names are not one number (here down to -0.25)


def test_trapezoid_is_at_most_average_precision_without_ties():
    # a positive entering at rank n: trapezoid credits (P_{n-1} + P_n) / 2 <= P_n, since
    # P_{n-1} = (tp - 1) / (n - 1) <= tp / n; ranking (0, 1): 1/2 * (0 + 1/2) / 2 = 1/4 against AP 1/2
    assert pr_curve_area(np.array([0, 1]), np.array([1.0, 0.0])) == pytest.approx(0.25, abs=1e-15)
    assert average_precision(np.array([0, 1]), np.array([1.0, 0.0])) == pytest.approx(0.5, abs=1e-15)
    rng = np.random.default_rng(2)
    for _ in range(50):
        labels = rng.integers(0, 2, size=12)
        labels[0] = 1
        scores = rng.permutation(12).astype(float)  # no ties
        assert pr_curve_area(labels, scores) <= average_precision(labels, scores) + 1e-15


@pytest.mark.parametrize("rank_by", ["abs", "score"])
def test_metrics_by_name_rank_the_explanation(rank_by):
    metrics = require("sklearn.metrics")
    scores = [0.9, -0.8, 0.1, 0.0, 0.5, -0.3, 0.05]
    human = [0, 1, 0, 1, 1, 0, 1]
    e = made_up(scores)
    ranking = np.abs(scores) if rank_by == "abs" else np.asarray(scores)
    precision, recall, _ = metrics.precision_recall_curve(human, ranking)
    expected = {"auprc": metrics.average_precision_score(human, ranking),
                "average_precision": metrics.average_precision_score(human, ranking),
                "auprc_trapezoid": metrics.auc(recall, precision)}
    for name in NAMES:
        result = evaluate_metric(name, None, e, rationale=human, rank_by=rank_by)
        assert result.name == name and result.higher_is_better
        assert result.value == pytest.approx(expected[name], abs=1e-12)
        assert result.details["chance"] == pytest.approx(4 / 7)
    # graded rationale: binarised at the threshold like the other plausibility metrics
    graded = [0.0, 0.7, 0.2, 0.9, 0.6, 0.1, 0.8]
    assert evaluate_metric("auprc_trapezoid", None, e, rationale=graded, threshold=0.5, rank_by=rank_by).value == \
        pytest.approx(expected["auprc_trapezoid"], abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_errors(name):
    e = made_up([0.9, -0.8, 0.1])
    with pytest.raises(MetricError, match="rationale"):
        evaluate_metric(name, None, e)
    with pytest.raises(MetricError, match="marks no feature"):
        evaluate_metric(name, None, e, rationale=[0, 0, 0])
