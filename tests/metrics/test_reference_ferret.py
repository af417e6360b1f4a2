"""Salience's faithfulness and plausibility metrics against ferret's evaluators (Attanasio et al.,
2023, ferret-xai 0.5.0, github.com/g8a9/ferret), written out here: ferret is not a dependency (it
pins other packages).

Each ``ferret_*`` function below mirrors one ferret function line for line, with ferret's defaults
(``remove_first_last=True``, ``only_pos=True``, ``removal_args = {"remove_tokens": True,
"based_on": "perc", "thresholds": np.arange(0.1, 1.1, 0.1)}``, ``top_k_rationale=5``), on the tiny
float64 BERT of ``tests/toy.py`` at token level (ferret scores subword tokens; its scores and
rationales carry a value for [CLS] and [SEP], which it strips). ferret perturbs by deleting token
ids, decoding the ids to text and re-tokenising that text; Salience deletes the ids. On the toy's
whole-word sentences the round trip gives back the deleted ids (checked for every perturbed row),
so the two must agree once the bins and k are aligned as docs/metrics.md ("Comparing with ferret")
says; the differences by design are pinned by the last tests.

Tolerance 1e-12: the model runs in float64 and both sides feed it the same ids; only the padding
and the batch each row shares differ (ferret: 8 texts a batch padded to the longest; Salience:
rows bucketed by length), which changes float64 summation order (rounding ~1e-16 per operation;
the largest difference measured here is about 1e-16). ferret's own runs use float32 models, where
the issue's 1e-7 is the right scale.
"""

from __future__ import annotations

import copy
import math
import random
from statistics import mean
from typing import Any

import numpy as np
import pytest
import torch

from oracles import require
from salience.core.explanation import Explanation
from salience.core.target import Prediction, Target
from salience.metrics import evaluate_metric
from toy import NEGATIVE, POSITIVE, sentence

stats = require("scipy.stats")
sk_metrics = require("sklearn.metrics")

TOL = 1e-12  # float64 model, same ids on both sides: see the module docstring
FERRET_THRESHOLDS = np.arange(0.1, 1.1, 0.1)  # ferret.evaluators.utils_from_soft_to_discrete.parse_evaluator_args
SEEDS = range(8)


# ------------------------------------------------------------------ ferret, written out
def ferret_forward(model: Any, texts: list[str], target: int) -> np.ndarray:
    """ferret/modeling/text_helpers.py, ``BaseTextTaskHelper._forward`` (batches of 8 texts,
    ``np.array_split``, tokenised with ``padding="longest", truncation=True``), then the
    evaluators' ``logits.softmax(-1)[:, target_pos_idx]``."""
    batches = np.array_split(np.array(texts, dtype=object), math.ceil(len(texts) / 8))
    logits = []
    with torch.no_grad():
        for batch in batches:
            item = model.tokenizer(batch.tolist(), return_tensors="pt", truncation=True, padding="longest")
            logits.append(model.model(**item).logits)
    return torch.cat(logits).softmax(-1)[:, target].double().numpy()


def ferret_input_ids(model: Any, text: str) -> list[int]:
    """``helper._tokenize(text)``, the ids under the attention mask, ``[1:-1]`` (remove_first_last)."""
    item = model.tokenizer(text, return_tensors="pt", truncation=True)
    input_len = int(item["attention_mask"].sum())
    return item["input_ids"][0][:input_len].tolist()[1:-1]


def ferret_top_k(soft_scores: np.ndarray, k: int, only_pos: bool = True) -> list[int] | None:
    """utils_from_soft_to_discrete.py, ``_get_id_tokens_top_k``."""
    if only_pos:
        id_top_k = [i for i in np.array(soft_scores).argsort()[-k:][::-1] if soft_scores[i] > 0]
    else:
        id_top_k = list(np.array(soft_scores).argsort()[-k:][::-1])
    return None if id_top_k == [] else id_top_k


def ferret_percentage(soft_scores: np.ndarray, percentage: float, only_pos: bool = True) -> list[int] | None:
    """utils_from_soft_to_discrete.py, ``_get_id_tokens_percentage``: k = int(percentage * F) (floor)."""
    v = int(percentage * len(soft_scores))
    return ferret_top_k(soft_scores, v, only_pos) if 0 < v <= len(soft_scores) else None


def ferret_aopc(model: Any, text: str, scores: np.ndarray, target: int, *, sufficiency: bool,
                thresholds: Any = FERRET_THRESHOLDS, based_on: str = "perc", only_pos: bool = True,
                ) -> tuple[float, list[list[int]], list[str]]:
    """faithfulness_measures.py, ``AOPC_Comprehensiveness_Evaluation.compute_evaluation`` and
    ``AOPC_Sufficiency_Evaluation.compute_evaluation`` with ``remove_tokens=True``. ``scores`` has
    one value per token including [CLS] and [SEP]. Returns the value, the deleted (or kept) id rows
    before decoding and the decoded texts ferret forwards."""
    baseline = float(ferret_forward(model, [text], target)[0])
    input_ids = ferret_input_ids(model, text)
    score_explanation = scores[1:-1]  # tokenizer.cls_token == explanation.tokens[0]
    rationale = {"perc": ferret_percentage, "k": ferret_top_k}[based_on]
    texts, rows, last_id_top = [], [], None
    for v in thresholds:
        id_top = rationale(score_explanation, v, only_pos)
        if id_top is not None and last_id_top is not None and set(id_top) == last_id_top:
            id_top = None
        if id_top is None:
            continue
        last_id_top = set(id_top)
        sample = np.array(copy.copy(input_ids))
        ids = sample[np.sort(id_top)] if sufficiency else np.delete(sample, id_top)
        rows.append(ids.tolist())
        texts.append(model.tokenizer.decode(ids, skip_special_tokens=False))
    if not texts:
        return (1.0 if sufficiency else 0.0), rows, texts
    removal_importance = baseline - ferret_forward(model, texts, target)
    return float(mean(removal_importance)), rows, texts


def ferret_tau_loo(model: Any, text: str, scores: np.ndarray, target: int) -> tuple[float, list[list[int]], list[str]]:
    """faithfulness_measures.py, ``TauLOO_Evaluation.compute_evaluation`` (perturbation.py,
    ``PertubationHelper.edit_one_token`` with ``strategy="remove"``, then ``batch_decode``)."""
    score_explanation = scores[1:-1]
    baseline = float(ferret_forward(model, [text], target)[0])
    input_ids = ferret_input_ids(model, text)
    samples_ids = []
    for occ_idx in range(len(input_ids)):
        sample = copy.copy(input_ids)
        sample.pop(occ_idx)
        samples_ids.append(sample)
    samples = model.tokenizer.batch_decode(samples_ids, skip_special_tokens=False)
    leave_one_out_removal = ferret_forward(model, samples, target)
    loo_scores = -1 * (leave_one_out_removal - baseline)
    return float(stats.kendalltau(loo_scores, score_explanation)[0]), samples_ids, samples


def ferret_discrete_top_k(scores: np.ndarray, top_k: int, only_pos: bool = True) -> list[int] | None:
    """utils_from_soft_to_discrete.py, ``get_discrete_explanation_topK`` (one-hot of the top k)."""
    topk_indices = ferret_top_k(scores, top_k, only_pos)
    if topk_indices is None:
        return None
    return [1 if i in topk_indices else 0 for i in range(len(scores))]


def ferret_token_f1(scores: np.ndarray, rationale: list[int], top_k: int = 5, only_pos: bool = True) -> float:
    """plausibility_measures.py, ``Tokenf1_PlausibilityEvaluation.compute_evaluation`` (instance
    F1, ``accumulate_result=False``)."""
    predicted = ferret_discrete_top_k(scores[1:-1], top_k, only_pos)
    if predicted is None:
        return 0.0
    true, pred = np.array(rationale[1:-1]), np.array(predicted)
    tp, pos, pred_pos = (true & pred).sum(), true.sum(), pred.sum()
    p, r = tp / pred_pos, tp / pos
    return 0.0 if p == 0 or r == 0 else float(2 * p * r / (p + r))


def ferret_token_iou(scores: np.ndarray, rationale: list[int], top_k: int = 5, only_pos: bool = True) -> float:
    """plausibility_measures.py, ``TokenIOU_PlausibilityEvaluation.compute_evaluation``."""
    predicted = ferret_discrete_top_k(scores[1:-1], top_k, only_pos)
    if predicted is None:
        return 0.0
    true, pred = np.array(rationale[1:-1]), np.array(predicted)
    denom = (true | pred).sum()
    return 0.0 if denom == 0 else float((true & pred).sum() / denom)


def ferret_auprc(scores: np.ndarray, rationale: list[int], only_pos: bool = True) -> float:
    """plausibility_measures.py, ``AUPRC_PlausibilityEvaluation.compute_evaluation``: negative
    scores set to 0 (only_pos), then ``auc(recall, precision)`` of ``precision_recall_curve``."""
    score_explanation = scores[1:-1]
    if only_pos:
        score_explanation = [v if v > 0 else 0 for v in score_explanation]
    precision, recall, _ = sk_metrics.precision_recall_curve(rationale[1:-1], score_explanation)
    return float(sk_metrics.auc(recall, precision))


# ------------------------------------------------------------------ the alignment (docs/metrics.md)
def aligned_bins(scores: np.ndarray, thresholds: Any = FERRET_THRESHOLDS) -> list[float]:
    """Salience bins that reproduce ferret's default AOPC: k_t = min(floor(t F), number of positive
    scores) for each threshold t, dropping k = 0 and repeated k; bins k / F (Salience's
    ``round(bin * F)`` gives k back)."""
    n, positive = len(scores), int(np.sum(np.asarray(scores) > 0))
    ks = sorted({min(int(t * n), positive) for t in thresholds} - {0})
    return [k / n for k in ks]


def aligned_k(scores: np.ndarray, top_k: int = 5) -> int:
    """Salience's k for ferret's token F1 / IOU (only_pos): min(top_k_rationale, positive scores)."""
    return min(top_k, int(np.sum(np.asarray(scores) > 0)))


def token_iou_from_f1(details: dict[str, Any]) -> float:
    """ferret's token IOU |T n P| / |T u P| from Salience's token_f1 precision p and recall r:
    tp / (tp / p + tp / r - tp) = p r / (p + r - p r) (0 when nothing is hit)."""
    p, r = details["precision"], details["recall"]
    return 0.0 if p == 0 else p * r / (p + r - p * r)


# ------------------------------------------------------------------ inputs
def seeded_inputs(toy: Any, seed: int) -> tuple[str, np.ndarray, int, list[int]]:
    """One toy sentence (odd seeds: two, joined by a comma, 8-25 tokens, so that ferret's floor(t F)
    skips and repeats counts) of whole words, one fixed score per token (seeded normal draws, ~2/3
    positive, no ties), the predicted class and the human rationale per token with [CLS] and [SEP]
    (1 on the planted sentiment words)."""
    rng_text = random.Random(100 + seed)
    text = " , ".join(sentence(rng_text)[0] for _ in range(1 + seed % 2))
    tokens = toy.encode(text).features("token")
    rng = np.random.default_rng(seed)
    scores = rng.normal(loc=0.4, size=len(tokens))
    predicted = int(ferret_forward(toy, [text], 1)[0] > 0.5)
    rationale = [0, *(int(f.text in POSITIVE + NEGATIVE) for f in tokens), 0]
    return text, scores, predicted, rationale


def explanation(toy: Any, text: str, scores: np.ndarray, target: int) -> Explanation:
    label = toy.labels[target]
    return Explanation(input=text, features=toy.encode(text).features("token"), scores=np.asarray(scores, dtype=np.float64),
                       method="fixed", params={}, model=toy.name, target=Target(target, label, "probability"),
                       prediction=Prediction(target, label, (0.5, 0.5)), level="token")


def with_special(scores: np.ndarray) -> np.ndarray:
    """ferret's explanation scores: one for [CLS] and [SEP] too (stripped by remove_first_last)."""
    return np.r_[0.0, scores, 0.0]


def assert_round_trip(toy: Any, rows: list[list[int]], texts: list[str]) -> None:
    """ferret's decode + re-tokenise gives back the ids it deleted: the precondition for equality."""
    for ids, text in zip(rows, texts, strict=True):
        assert ferret_input_ids(toy, text) == ids, (ids, text)


# ------------------------------------------------------------------ agreement
@pytest.mark.parametrize("seed", SEEDS)
def test_aopc_equals_ferret_with_aligned_bins(toy, seed):
    text, scores, target, _ = seeded_inputs(toy, seed)
    e = explanation(toy, text, scores, target)
    bins = aligned_bins(scores)
    for name, sufficiency in (("aopc_comprehensiveness", False), ("aopc_sufficiency", True)):
        expected, rows, texts = ferret_aopc(toy, text, with_special(scores), target, sufficiency=sufficiency)
        assert_round_trip(toy, rows, texts)
        result = evaluate_metric(name, toy, e, bins=bins)
        assert result.details["k"] == [len(r) if sufficiency else len(scores) - len(r) for r in rows]
        assert result.value == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_one_bin_equals_ferret_top_k(toy, seed):
    # ferret with removal_args {"based_on": "k", "thresholds": [3]} is ERASER's comprehensiveness /
    # sufficiency at k = 3: Salience's at fraction 3 / F (the top 3 all positive here)
    text, scores, target, _ = seeded_inputs(toy, seed)
    scores = np.abs(scores)
    e = explanation(toy, text, scores, target)
    for name, sufficiency in (("comprehensiveness", False), ("sufficiency", True)):
        expected, rows, texts = ferret_aopc(toy, text, with_special(scores), target, sufficiency=sufficiency,
                                           thresholds=[3], based_on="k")
        assert_round_trip(toy, rows, texts)
        result = evaluate_metric(name, toy, e, fraction=3 / len(scores))
        assert result.details["k"] == 3
        assert result.value == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_loo_tau_equals_ferret(toy, seed):
    text, scores, target, _ = seeded_inputs(toy, seed)
    expected, rows, texts = ferret_tau_loo(toy, text, with_special(scores), target)
    assert_round_trip(toy, rows, texts)
    result = evaluate_metric("loo_kendall_tau", toy, explanation(toy, text, scores, target), baseline="delete")
    assert result.value == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_token_f1_and_iou_equal_ferret_with_aligned_k(toy, seed):
    text, scores, target, rationale = seeded_inputs(toy, seed)
    e = explanation(toy, text, scores, target)
    # ferret's default k = 5 and the study's k = number of rationale tokens
    for top_k in (5, sum(rationale)):
        k = aligned_k(scores, top_k)
        result = evaluate_metric("token_f1", toy, e, rationale=rationale[1:-1], k=k, rank_by="score")
        # exact: the same counts divided in the same order
        assert result.value == pytest.approx(ferret_token_f1(with_special(scores), rationale, top_k), abs=1e-15)
        iou = token_iou_from_f1(result.details)
        assert iou == pytest.approx(ferret_token_iou(with_special(scores), rationale, top_k), abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
def test_auprc_trapezoid_equals_ferret_on_scores_clipped_at_zero(toy, seed):
    text, scores, target, rationale = seeded_inputs(toy, seed)
    clipped = explanation(toy, text, np.maximum(scores, 0.0), target)  # ferret's only_pos
    expected = ferret_auprc(with_special(scores), rationale)
    for rank_by in ("score", "abs"):  # the same ranking once no score is negative
        result = evaluate_metric("auprc_trapezoid", toy, clipped, rationale=rationale[1:-1], rank_by=rank_by)
        # 1e-12: scikit-learn sums the same trapezoids in another order (float64 rounding only)
        assert result.value == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------ differences by design
def model_on_ids(toy: Any, rows: list[list[int]], target: int) -> np.ndarray:
    """The target probability of the model on each row of ids between [CLS] and [SEP], one row at
    a time (what Salience's "delete" feeds the model)."""
    cls, sep = toy.tokenizer.cls_token_id, toy.tokenizer.sep_token_id
    with torch.no_grad():
        return np.array([float(toy.model(input_ids=torch.tensor([[cls, *ids, sep]])).logits.softmax(-1)[0, target])
                         for ids in rows])


def test_ferret_re_tokenises_after_deleting_a_subword(toy):
    # deleting "un" from a leading "un ##believ ##able": ferret decodes "##believable ..." and
    # re-tokenises it as "#", "#", "believable" (none in the toy's vocabulary: three [UNK]), so its
    # model sees other ids than the ones it deleted; Salience deletes the ids. (Inside a sentence the
    # toy's vocabulary splits the glued text back: "wasbelievable" -> was ##believ ##able.)
    text, target = "unbelievable , the plot was dull", 0
    n = len(toy.encode(text).features("token"))
    scores = np.linspace(1.0, 0.1, n)  # ranks "un", "##believ", "##able", ... first
    e = explanation(toy, text, scores, target)

    _, rows, texts = ferret_tau_loo(toy, text, with_special(scores), target)
    assert toy.tokenizer.convert_ids_to_tokens(rows[0]) == ["##believ", "##able", ",", "the", "plot", "was", "dull"]
    assert texts[0] == "##believable, the plot was dull"
    assert toy.tokenizer.tokenize(texts[0]) == ["[UNK]", "[UNK]", "[UNK]", ",", "the", "plot", "was", "dull"]
    changed = [i for i, (ids, t) in enumerate(zip(rows, texts, strict=True)) if ferret_input_ids(toy, t) != ids]
    assert changed == [0]
    result = evaluate_metric("loo_kendall_tau", toy, e, baseline="delete")
    p_full, on_ids, on_text = result.details["p_full"], model_on_ids(toy, rows, target), ferret_forward(toy, texts, target)
    assert np.allclose(result.details["loo_scores"], p_full - on_ids, atol=TOL, rtol=0)  # Salience: the deleted ids
    assert np.allclose(np.delete(on_ids, changed), np.delete(on_text, changed), atol=TOL, rtol=0)
    assert abs(on_ids[0] - on_text[0]) > 1e-9  # measured 1.2e-5 (float64 noise ~1e-16); tau's ranking survives it

    # AOPC comprehensiveness, all 8 bins: the rows deleting "un" (k = 1) and "un ##believ" (k = 2)
    # start with a "##" piece, so ferret's value is off Salience's by the mean of their differences
    expected, rows, texts = ferret_aopc(toy, text, with_special(scores), target, sufficiency=False)
    changed = [i for i, (ids, t) in enumerate(zip(rows, texts, strict=True)) if ferret_input_ids(toy, t) != ids]
    assert changed == [0, 1]
    ours = evaluate_metric("aopc_comprehensiveness", toy, e, bins=aligned_bins(scores)).value
    on_ids, on_text = model_on_ids(toy, rows, target), ferret_forward(toy, texts, target)
    assert ours == pytest.approx(p_full - on_ids.mean(), abs=TOL)
    assert expected - ours == pytest.approx(np.sum(on_ids[changed] - on_text[changed]) / len(rows), abs=TOL)
    assert abs(expected - ours) > 1e-10


def test_ferret_auprc_ties_negative_scores_at_zero(toy):
    # only_pos sets every negative score to 0, so the negatives tie at the bottom of ferret's
    # ranking; Salience's auprc_trapezoid (rank_by="score") keeps their order. A marked word with
    # the highest negative score ("dull") makes the two differ.
    text = "the film was good and the plot was dull"
    tokens = [f.text for f in toy.encode(text).features("token")]
    rationale = [0, *(int(t in POSITIVE + NEGATIVE) for t in tokens), 0]  # "good", "dull"
    scores = np.array([0.9, -0.1, -0.2, 0.8, -0.3, -0.4, -0.5, -0.6, -0.05])  # "good" 0.8, "dull" -0.05
    e = explanation(toy, text, scores, 1)
    ferret = ferret_auprc(with_special(scores), rationale)
    ours = evaluate_metric("auprc_trapezoid", toy, e, rationale=rationale[1:-1], rank_by="score").value
    # ranking "the" (unmarked), "good", "dull" (marked), ...: from (R, P) = (0, 1) through (0, 0),
    # (1/2, 1/2), (1, 2/3): 0 + 1/2 (0 + 1/2) / 2 + 1/2 (1/2 + 2/3) / 2 = 5/12
    assert ours == pytest.approx(5 / 12, abs=1e-12)
    # ferret: "the", "good", then the 7 other tokens tied at 0 enter together: (0, 0), (1/2, 1/2),
    # (1, 2/9): 1/2 (0 + 1/2) / 2 + 1/2 (1/2 + 2/9) / 2 = 11/36
    assert ferret == pytest.approx(11 / 36, abs=1e-12)
    assert ours > ferret
    clipped = explanation(toy, text, np.maximum(scores, 0.0), 1)
    assert evaluate_metric("auprc_trapezoid", toy, clipped, rationale=rationale[1:-1], rank_by="score").value == \
        pytest.approx(ferret, abs=1e-12)


def test_salience_auprc_is_average_precision_not_ferrets_auprc(toy):
    # Salience's `auprc` is average precision (scikit-learn's average_precision_score); ferret's
    # AUPRC is the trapezoid (Salience's auprc_trapezoid): on the same ranking they differ
    text, scores, target, rationale = seeded_inputs(toy, 1)
    e = explanation(toy, text, np.maximum(scores, 0.0), target)
    labels = rationale[1:-1]
    ap = evaluate_metric("auprc", toy, e, rationale=labels, rank_by="score").value
    trapezoid = evaluate_metric("auprc_trapezoid", toy, e, rationale=labels, rank_by="score").value
    assert ap == pytest.approx(sk_metrics.average_precision_score(labels, np.maximum(scores, 0.0)), abs=1e-12)
    assert trapezoid == pytest.approx(ferret_auprc(with_special(scores), rationale), abs=1e-12)
    assert ap != pytest.approx(trapezoid, abs=1e-3)


def test_salience_defaults_are_not_ferrets(toy):
    # Without alignment the numbers differ: Salience's default bins are ERASER's 1/5/10/20/50 %
    # (k = max(1, round(b F)), a repeated k counted again); ferret's are 10 %..100 % (k = floor(t F),
    # repeats and k = 0 dropped, only positive scores). Token F1: ferret's default k is 5.
    text, scores, target, rationale = seeded_inputs(toy, 0)
    e = explanation(toy, text, scores, target)
    expected, _, _ = ferret_aopc(toy, text, with_special(scores), target, sufficiency=False)
    default = evaluate_metric("aopc_comprehensiveness", toy, e).value
    aligned = evaluate_metric("aopc_comprehensiveness", toy, e, bins=aligned_bins(scores)).value
    assert aligned == pytest.approx(expected, abs=TOL)
    assert abs(default - expected) > 1e-3
    # token F1: Salience's default k is the number of marked tokens (3 here), ranked by |score|
    ours = evaluate_metric("token_f1", toy, e, rationale=rationale[1:-1])
    assert ours.details["k"] == sum(rationale) == 3
    assert ours.value != pytest.approx(ferret_token_f1(with_special(scores), rationale), abs=1e-3)
