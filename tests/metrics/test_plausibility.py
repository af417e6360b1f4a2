"""Plausibility metrics against hand-computed values and scikit-learn's average precision."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import salience
from conftest import TOY_PAIR, TOY_TEXT
from oracles import require
from salience.core.explanation import Explanation, Feature
from salience.core.target import Prediction, Target
from salience.errors import ParameterError
from salience.metrics import evaluate_metric
from salience.metrics.base import MetricError
from salience.metrics.plausibility import average_precision, spans


def made_up(scores, segments=None) -> Explanation:
    """An explanation over words w0 w1 ... (no model needed: plausibility metrics take model=None)."""
    segments = segments or [0] * len(scores)
    features = [Feature(f"w{i}", 3 * i, 3 * i + 2, s, (i + 1,)) for i, s in enumerate(segments)]
    return Explanation(input=" ".join(f.text for f in features), features=features, scores=np.asarray(scores, dtype=float),
                       method="occlusion", params={}, model="none", target=Target(1, "positive"),
                       prediction=Prediction(1, "positive", (0.2, 0.8)))


SCORES = [0.9, -0.8, 0.1, 0.0, 0.5]
HUMAN = [1, 1, 0, 0, 0]


def test_token_f1_hand_computed():
    e = made_up(SCORES)
    r = evaluate_metric("token_f1", None, e, rationale=HUMAN)  # |score| ranking: w0, w1 -> exact match
    assert r.value == 1.0 and r.details["k"] == 2 and r.forward_passes == 0
    signed = evaluate_metric("token_f1", None, e, rationale=HUMAN, rank_by="score")  # w0, w4: one hit of two
    assert signed.value == pytest.approx(0.5)
    three = evaluate_metric("token_f1", None, e, rationale=HUMAN, k=3)  # w0, w1, w4: P = 2/3, R = 1
    assert three.value == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))


def test_graded_rationale_is_binarised_with_threshold():
    e = made_up(SCORES)
    graded = [0.5, 0.2, 0.0, 0.0, 0.0]
    assert evaluate_metric("token_f1", None, e, rationale=graded).value == 1.0
    only_w0 = evaluate_metric("precision_at_k", None, e, rationale=graded, threshold=0.3)
    assert only_w0.details["k"] == 1 and only_w0.value == 1.0


def test_spans_break_at_gaps_and_between_texts():
    selected = np.array([1, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert spans(selected, [0] * 8) == [(0, 2), (3, 6), (7, 8)]
    assert spans(selected, [0, 0, 0, 0, 1, 1, 1, 1]) == [(0, 2), (3, 4), (4, 6), (7, 8)]


def test_iou_f1_hand_computed():
    human = [0, 1, 1, 1, 0, 0, 1, 0]  # spans [1, 4) and [6, 7)
    # top 4 = w1 w2 w6 w7: spans [1, 3) (IOU 2/3 with [1, 4)) and [6, 8) (IOU 1/2 with [6, 7)): both match
    both = made_up([0, 0.9, 0.8, 0, 0, 0, 0.7, 0.6])
    r = evaluate_metric("iou_f1", None, both, rationale=human)
    assert r.value == 1.0 and r.details["best_iou"] == pytest.approx([2 / 3, 1 / 2])
    # top 4 = w1 w2 w3 w5: [1, 4) matches exactly, [5, 6) matches nothing -> P = R = 1/2
    half = made_up([0, 0.9, 0.8, 0.7, 0, 0.6, 0, 0])
    assert evaluate_metric("iou_f1", None, half, rationale=human).value == pytest.approx(0.5)
    # top 4 = w2 w3 w4 w5: one span [2, 6), IOU 2/5 with [1, 4) -> no match
    none = made_up([0, 0, 0.9, 0.8, 0.7, 0.6, 0, 0])
    assert evaluate_metric("iou_f1", None, none, rationale=human).value == 0.0
    # a lower IOU threshold accepts it: P = 1/1, R = 1/2
    assert evaluate_metric("iou_f1", None, none, rationale=human, iou_threshold=0.4).value == pytest.approx(2 / 3)


def test_auprc_hand_computed_and_matches_sklearn():
    # ranking: 1 0 1 0 -> AP = 1 * 1/2 + 2/3 * 1/2
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    e = made_up(SCORES)
    r = evaluate_metric("auprc", None, e, rationale=HUMAN)
    assert r.value == 1.0 and r.details["chance"] == pytest.approx(0.4)
    metrics = require("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(30):
        labels = rng.integers(0, 2, size=15)
        labels[0] = 1
        scores = np.round(rng.normal(size=15), 1)  # rounding makes ties
        assert average_precision(labels, scores) == pytest.approx(metrics.average_precision_score(labels, scores), abs=1e-12)


def test_precision_at_k():
    e = made_up(SCORES)
    marked = [0, 0, 1, 0, 1]
    assert evaluate_metric("precision_at_k", None, e, rationale=marked).value == 0.0  # |score|: w0 w1
    assert evaluate_metric("precision_at_k", None, e, rationale=marked, k=3).value == pytest.approx(1 / 3)  # w0 w1 w4
    assert evaluate_metric("precision_at_k", None, e, rationale=marked, rank_by="score").value == pytest.approx(0.5)  # w0 w4


@pytest.mark.parametrize("name", ["token_f1", "iou_f1", "auprc", "precision_at_k"])
def test_errors(name):
    e = made_up(SCORES)
    with pytest.raises(MetricError, match="rationale"):
        evaluate_metric(name, None, e)  # no rationale given
    with pytest.raises(MetricError, match="4 values but"):
        evaluate_metric(name, None, e, rationale=[1, 0, 0, 0])
    with pytest.raises(MetricError, match="marks no feature"):
        evaluate_metric(name, None, e, rationale=[0, 0, 0, 0, 0])
    with pytest.raises(MetricError, match=">= 0"):
        evaluate_metric(name, None, e, rationale=[1, -1, 0, 0, 0])
    with pytest.raises(ParameterError):
        evaluate_metric(name, None, e, rationale=HUMAN, rank_by="magnitude")


def test_toy_planted_words(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    planted = [1 if f.text in ("good", "dull") else 0 for f in e.features]
    for name in ("token_f1", "iou_f1", "auprc", "precision_at_k"):
        r = evaluate_metric(name, toy, e, rationale=planted)
        assert 0.0 <= r.value <= 1.0 and r.forward_passes == 0
    pair = salience.explain(toy, TOY_PAIR, method="occlusion")
    marks = [1 if f.text in ("superb", "dull") else 0 for f in pair.features]
    assert evaluate_metric("auprc", toy, pair, rationale=marks).value > marks.count(1) / len(marks)  # above chance


def test_toy_mismatched_features_raise(toy):
    e = salience.explain(toy, TOY_TEXT, method="occlusion")
    planted = [1] + [0] * (len(e.features) - 1)
    with pytest.raises(MetricError, match="features do not match"):
        evaluate_metric("token_f1", toy, dataclasses.replace(e, input=TOY_TEXT.upper() + " extra"), rationale=planted)
