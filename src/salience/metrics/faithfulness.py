"""Faithfulness metrics: does removing the features an explanation ranks highest change the model?

Every metric here re-encodes the explanation's input, checks that the features are the ones the
explanation scored, ranks them by signed score (descending, ties kept in input order) and sends all
the perturbed rows of one explanation, the unperturbed input first, through ONE
``model.score_perturbed`` call (which batches). The probability read is always the probability of
the explanation's target class, whatever output (logit, log-probability) the explanation explained.

Removing a feature means what the ``baseline`` parameter says. Text: ``"delete"`` (the default of
the ERASER metrics, deletion/insertion and the leave-one-out correlation) drops its tokens from the
sequence; ``"mask"`` (the default of log-odds), ``"pad"`` or ``"unk"`` replace them. Images: its
pixels take the values of an image baseline (``"mean"``, 0 in the normalised space, by default;
``"black"``, ``"blur[:SIGMA]"``, ``"noise[:SEED]"`` or a (C, H, W) tensor); insertion starts from
``"blur:5"`` (RISE). Image explanations are scored on the encoded input they explained.

A causal LM's generation (T targets, a (T, F) score matrix) is scored target by target: comprehensiveness,
sufficiency, their AOPC and the deletion / insertion curves rank, for each generated token, the
prompt features that can influence it by that token's row (``context="preceding"``: also the
generated tokens before it), remove them as above, and read the probability of that token under
teacher forcing of the original continuation (:mod:`salience.metrics.generation_faithfulness`);
the value is the mean over targets, the per-target values are in ``details["per_target"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from salience.core.explanation import Explanation
from salience.core.target import Target
from salience.errors import ParameterError
from salience.metrics.base import MetricError, MetricResult, register_metric
from salience.metrics.generation_faithfulness import candidates, score_matrix, target_probabilities, teacher_forced
from salience.metrics.image_input import image_encoded
from salience.models.base import Encoded

AOPC_BINS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5)
PROBABILITY_FLOOR = 1e-12  # log-odds: probabilities are floored here so that log(0) stays finite
IMAGE_REMOVAL = "mean"  # images: a removed pixel takes 0 in the normalised space (the mean colour), as RISE
IMAGE_INSERTION = "blur:5"  # RISE's insertion substrate: a Gaussian blur of sigma 5 model pixels
CURVE_STEPS = 50  # deletion / insertion: points on the curve when neither max_steps nor step is given


# ------------------------------------------------------------------ shared helpers
def describe(explanation: Explanation) -> str:
    """A short name of the explained example for one-line error messages."""
    text = explanation.input if isinstance(explanation.input, str) else " / ".join(explanation.input)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def encode_checked(model: Any, explanation: Explanation) -> Encoded:
    """Re-encode the explanation's input; raise :class:`MetricError` when its features differ from
    the ones the explanation scored (another tokenizer, level or truncation). Image explanations
    give the encoded image they explained (:func:`salience.metrics.image_input.image_encoded`)."""
    if explanation.kind == "image":
        return image_encoded(model, explanation, "this metric")  # type: ignore[no-any-return]
    refuse_generation(explanation)
    encoded: Encoded = model.encode(explanation.input, truncate=explanation.truncated)
    if encoded.features(explanation.level) != list(explanation.features):
        raise MetricError(
            f"the explanation's {explanation.level} features do not match what {getattr(model, 'name', 'the model')} "
            f"encodes for {describe(explanation)} (another model, tokenizer or truncation?)"
        )
    return encoded


def refuse_generation(explanation: Explanation) -> None:
    """Raise :class:`MetricError` for a causal LM's generation (for metrics that read one class probability)."""
    if explanation.kind == "generation":
        raise MetricError("this metric reads one class probability p(y|x); it does not take a causal LM's generation "
                          "(comprehensiveness, sufficiency, their AOPC, deletion_auc, insertion_auc, top_k_drop, "
                          "linear_datamodeling_score and the complexity metrics do)")


def probability_target(explanation: Explanation) -> Target:
    """The probability of the explanation's target class (whatever output was explained)."""
    return Target(explanation.target.index, explanation.target.label, "probability")


def ranking(scores: np.ndarray) -> np.ndarray:
    """Feature indices by signed score, highest first; ties keep input order (stable sort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def top_k(fraction: float, n_features: int) -> int:
    """Number of features in the top ``fraction``: ``max(1, round(fraction * F))`` (Python's round,
    half to even), at most F."""
    if not 0.0 < fraction <= 1.0:
        raise ParameterError(f"fraction must be in (0, 1], got {fraction}")
    return min(n_features, max(1, round(fraction * n_features)))


def check_baseline(model: Any, explanation: Explanation, baseline: Any, text_default: str,
                   image_default: str = IMAGE_REMOVAL) -> str:
    """The removal baseline's recorded name: ``baseline``, or when None the default of the
    explanation's kind. Images ask the adapter (a one-line error lists the image baselines; a tensor
    is kept by the adapter under its name); text refuses ``zero`` (a gradient baseline). A causal
    LM's generation: the adapter's own choice, ``delete`` where it can delete (else its first
    baseline), and any removal it can build (``zero``, the zero embedding, included)."""
    if explanation.kind == "generation":
        known = tuple(getattr(model, "baselines", ()))
        chosen = baseline if baseline is not None else ("delete" if "delete" in known or not known else known[0])
        return str(model.check_baseline(chosen, perturbation=True))
    if baseline is None:
        baseline = image_default if explanation.kind == "image" else text_default
    if explanation.kind == "image":
        return str(model.check_baseline(baseline, perturbation=True))
    if baseline == "zero":
        raise ParameterError("baseline 'zero' exists for gradient methods only; use delete, mask, pad or unk")
    return str(baseline)


def _probabilities(model: Any, explanation: Explanation, keep: torch.Tensor, baseline: str,
                   batch_size: int | None, target: Target | None = None) -> tuple[Encoded, np.ndarray]:
    """Re-encode, then the target-class probability (or the output of ``target``) for each row of
    ``keep`` (one batched call); ``baseline`` as :func:`check_baseline` returned it."""
    encoded = encode_checked(model, explanation)
    values = model.score_perturbed(encoded, keep, explanation.features, baseline,
                                   target or probability_target(explanation), batch_size=batch_size)
    return encoded, np.asarray(torch.as_tensor(values).detach().double().cpu().numpy(), dtype=np.float64)


def _keep_rows(n_features: int, rows: Sequence[Sequence[int] | np.ndarray], *, kept: bool) -> torch.Tensor:
    """Row 0 keeps everything; row r+1 removes (``kept=False``) or keeps only (``kept=True``) the
    features in ``rows[r]``."""
    keep = torch.ones(len(rows) + 1, n_features, dtype=torch.bool)
    for r, indices in enumerate(rows, start=1):
        if kept:
            keep[r] = False
            keep[r, list(indices)] = True
        else:
            keep[r, list(indices)] = False
    return keep


def _need_features(explanation: Explanation, metric: str) -> int:
    n = len(explanation.features)
    if n == 0:
        raise MetricError(f"{metric}: the explanation of {describe(explanation)} has no features")
    return n


# ------------------------------------------------------------------ ERASER
Removal = tuple[np.ndarray, dict[float, np.ndarray], dict[float, np.ndarray]]


def _removal_at(model: Any, explanation: Explanation, fractions: Sequence[float], baseline: str, batch_size: int | None,
                *, sufficiency: bool, metric: str, context: str | None) -> Removal:
    """Per target (T,): p(y|x) and, for each fraction, k and p(y|x without the top k)
    (comprehensiveness) or p(y|only the top k) (sufficiency); a classifier has T = 1."""
    if explanation.kind == "generation":
        return _generation_removal_at(model, explanation, fractions, baseline, batch_size, sufficiency=sufficiency,
                                      context=context or "prompt")
    _no_context(context, metric)
    n = _need_features(explanation, metric)
    order = ranking(explanation.scores)
    ks = {f: top_k(f, n) for f in fractions}
    distinct = sorted(set(ks.values()))
    keep = _keep_rows(n, [order[:k] for k in distinct], kept=sufficiency)
    _, probs = _probabilities(model, explanation, keep, baseline, batch_size)
    removed = {k: float(p) for k, p in zip(distinct, probs[1:], strict=True)}
    return np.array([probs[0]]), {f: np.array([k]) for f, k in ks.items()}, {f: np.array([removed[k]]) for f, k in ks.items()}


def _generation_removal_at(model: Any, explanation: Explanation, fractions: Sequence[float], baseline: str,
                           batch_size: int | None, *, sufficiency: bool, context: str) -> Removal:
    """:func:`_removal_at` for a generation: target t ranks its candidates (its row's scores) and
    k = max(1, round(fraction * its number of candidates)); sufficiency keeps only the top k of the
    candidates (every other feature is kept)."""
    for fraction in fractions:  # checked before any model pass
        top_k(fraction, 1)
    encoded, sets, keeps, counts = _generation_rows(
        model, explanation, context, lambda n: sorted({top_k(f, n) for f in fractions}), keep_only=sufficiency)
    ks = {f: np.array([top_k(f, len(chosen)) for chosen in sets]) for f in fractions}
    full, values = target_probabilities(model, explanation, encoded, keeps, baseline, batch_size)
    perturbed = {f: np.array([values[t][list(counts[t]).index(ks[f][t])] for t in range(len(sets))]) for f in fractions}
    return full, ks, perturbed


def _generation_rows(model: Any, explanation: Explanation, context: str, counts_of: Callable[[int], Sequence[int]], *,
                     keep_only: bool) -> tuple[Encoded, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The teacher-forced sequence, each target's candidates, and its kept-feature rows: for each m
    of ``counts_of(its number of candidates)``, its top m candidates removed or (``keep_only``) the
    only candidates kept; features that are not candidates are always kept."""
    what = describe(explanation)
    encoded = teacher_forced(model, explanation, what)
    sets = candidates(model, explanation, encoded, context, what)
    scores = score_matrix(explanation)
    keeps, counts = [], []
    for t, chosen in enumerate(sets):
        order = chosen[ranking(scores[t, chosen])]
        points = np.asarray(counts_of(len(chosen)), dtype=np.int64)
        rows = np.ones((len(points), len(explanation.features)), dtype=bool)
        for row, m in enumerate(points):
            if keep_only:
                rows[row, chosen] = False
                rows[row, order[:m]] = True
            else:
                rows[row, order[:m]] = False
        keeps.append(rows)
        counts.append(points)
    return encoded, sets, keeps, counts


def _no_context(context: str | None, metric: str) -> None:
    if context is not None:
        raise ParameterError(f"{metric}: context applies to a causal LM's generation only")


def _per_target(explanation: Explanation, values: np.ndarray) -> Any:
    """A classifier's one value as a number (as before generations were scored), a generation's as a list."""
    if explanation.kind == "generation":
        return [v.item() for v in np.asarray(values)]
    return np.asarray(values)[0].item()


def _eraser(model: Any, explanation: Explanation, fraction: float, baseline: Any, batch_size: int | None,
            context: str | None, *, sufficiency: bool, name: str) -> MetricResult:
    baseline = check_baseline(model, explanation, baseline, "delete")
    full, ks, perturbed = _removal_at(model, explanation, [fraction], baseline, batch_size, sufficiency=sufficiency,
                                      metric=name, context=context)
    drops = full - perturbed[fraction]
    details = {"k": _per_target(explanation, ks[fraction]), "fraction": fraction, "p_full": _per_target(explanation, full),
               "p_perturbed": _per_target(explanation, perturbed[fraction]), "baseline": baseline}
    if explanation.kind == "generation":
        details.update(per_target=drops.tolist(), context=context or "prompt")
    return MetricResult(name, float(np.mean(drops)), not sufficiency, details)


@register_metric("comprehensiveness", higher_is_better=True, summary="p(y|x) - p(y|x without the top-k features) (ERASER)")
def comprehensiveness(model: Any, explanation: Explanation, *, fraction: float = 0.2, baseline: Any = None,
                      batch_size: int | None = None, context: str | None = None) -> MetricResult:
    """ERASER comprehensiveness (DeYoung et al., 2020): ``p(y|x) - p(y|x without the top-k)``, the top
    ``k = max(1, round(fraction * F))`` features by signed score. Higher is better: the features
    ranked first carried the prediction. 2 forward passes. A generation: the mean over its targets
    of ``p(y_t|x) - p(y_t|x without target t's top k)``, y_t teacher-forced (``context``: which
    features a target ranks, ``"prompt"`` or ``"preceding"``); at most 1 + T forward rows."""
    return _eraser(model, explanation, fraction, baseline, batch_size, context, sufficiency=False, name="comprehensiveness")


@register_metric("sufficiency", higher_is_better=False, summary="p(y|x) - p(y|only the top-k features) (ERASER)")
def sufficiency(model: Any, explanation: Explanation, *, fraction: float = 0.2, baseline: Any = None,
                batch_size: int | None = None, context: str | None = None) -> MetricResult:
    """ERASER sufficiency (DeYoung et al., 2020): ``p(y|x) - p(y|only the top-k kept)``. Lower is
    better: the top features alone nearly reproduce the prediction (negative when they are more
    convincing than the whole input). 2 forward passes. A generation: the mean over its targets,
    only target t's top k of its candidates kept (other features untouched); at most 1 + T rows."""
    return _eraser(model, explanation, fraction, baseline, batch_size, context, sufficiency=True, name="sufficiency")


def _aopc(model: Any, explanation: Explanation, bins: Sequence[float], baseline: Any, batch_size: int | None,
          context: str | None, *, sufficiency: bool, name: str) -> MetricResult:
    baseline = check_baseline(model, explanation, baseline, "delete")
    bins = tuple(float(b) for b in bins)
    if not bins:
        raise ParameterError(f"{name}: bins must not be empty")
    full, ks, perturbed = _removal_at(model, explanation, bins, baseline, batch_size, sufficiency=sufficiency, metric=name,
                                      context=context)
    drops = np.stack([full - perturbed[b] for b in bins])  # (bins, T)
    per_bin = drops.mean(axis=1)
    details = {"bins": list(bins), "values": per_bin.tolist(), "k": [_per_target(explanation, ks[b]) for b in bins],
               "p_full": _per_target(explanation, full), "baseline": baseline}
    if explanation.kind == "generation":
        details.update(per_target=drops.mean(axis=0).tolist(), context=context or "prompt")
    return MetricResult(name, float(np.mean(per_bin)), not sufficiency, details)


@register_metric("aopc_comprehensiveness", higher_is_better=True,
                 summary="comprehensiveness averaged over the top 1, 5, 10, 20, 50 % (ERASER AOPC)")
def aopc_comprehensiveness(model: Any, explanation: Explanation, *, bins: Sequence[float] = AOPC_BINS,
                           baseline: Any = None, batch_size: int | None = None, context: str | None = None) -> MetricResult:
    """ERASER's AOPC comprehensiveness: the mean over ``bins`` (fractions of the features) of
    comprehensiveness. Higher is better. 1 + (distinct k over the bins) forward passes (a
    generation: the mean over targets, at most 1 + T x distinct k rows)."""
    return _aopc(model, explanation, bins, baseline, batch_size, context, sufficiency=False, name="aopc_comprehensiveness")


@register_metric("aopc_sufficiency", higher_is_better=False,
                 summary="sufficiency averaged over the top 1, 5, 10, 20, 50 % (ERASER AOPC)")
def aopc_sufficiency(model: Any, explanation: Explanation, *, bins: Sequence[float] = AOPC_BINS,
                     baseline: Any = None, batch_size: int | None = None, context: str | None = None) -> MetricResult:
    """ERASER's AOPC sufficiency: the mean over ``bins`` of sufficiency. Lower is better.
    1 + (distinct k over the bins) forward passes (a generation: as AOPC comprehensiveness)."""
    return _aopc(model, explanation, bins, baseline, batch_size, context, sufficiency=True, name="aopc_sufficiency")


# ------------------------------------------------------------------ log-odds
@register_metric("log_odds", higher_is_better=False, summary="log p(y|top 20 % masked) - log p(y|x) (DIG, SIG)")
def log_odds(model: Any, explanation: Explanation, *, fraction: float = 0.2, baseline: Any = None,
             batch_size: int | None = None) -> MetricResult:
    """Log-odds (Sanyal & Ren, 2021; used again by Enguehard's SIG, 2023):
    ``log(p(y|x with the top-k replaced by the baseline) / p(y|x))``. Lower (more negative) is
    better. Both probabilities are floored at ``1e-12`` before the logarithm, so a probability that
    underflows to 0 gives a large finite value instead of -inf. 2 forward passes."""
    refuse_generation(explanation)
    baseline = check_baseline(model, explanation, baseline, "mask")
    n = _need_features(explanation, "log_odds")
    k = top_k(fraction, n)
    keep = _keep_rows(n, [ranking(explanation.scores)[:k]], kept=False)
    _, probs = _probabilities(model, explanation, keep, baseline, batch_size)
    full, masked = float(probs[0]), float(probs[1])
    value = float(np.log(max(masked, PROBABILITY_FLOOR)) - np.log(max(full, PROBABILITY_FLOOR)))
    return MetricResult("log_odds", value, False,
                        {"k": k, "fraction": fraction, "p_full": full, "p_perturbed": masked, "baseline": baseline,
                         "floor": PROBABILITY_FLOOR})


# ------------------------------------------------------------------ deletion / insertion curves
def curve_counts(n_features: int, max_steps: int | None = None, *, step: int | None = None) -> np.ndarray:
    """Numbers of features removed (or inserted) at each curve point: 0..F one at a time, or
    ``max_steps + 1`` evenly spaced counts from 0 to F when F > ``max_steps`` (default
    :data:`CURVE_STEPS`); or, with ``step``, ``step`` features per point: 0, step, 2 step, ..., F (the
    last step takes what is left; RISE removes 224 pixels per step at 224 x 224)."""
    if step is not None:
        if max_steps is not None:
            raise ParameterError("give max_steps or step, not both")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
            raise ParameterError(f"step must be a positive number of features, got {step!r}")
        return np.r_[np.arange(0, n_features, int(step)), n_features]
    max_steps = CURVE_STEPS if max_steps is None else max_steps
    if max_steps < 1:
        raise ParameterError(f"max_steps must be at least 1, got {max_steps}")
    if n_features <= max_steps:
        return np.arange(n_features + 1)
    return np.unique(np.round(np.linspace(0, n_features, max_steps + 1)).astype(int))


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the piecewise-linear curve through (x, y)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def _curve(model: Any, explanation: Explanation, *, insertion: bool, max_steps: int | None, step: int | None,
           baseline: Any, batch_size: int | None, name: str, context: str | None) -> MetricResult:
    baseline = check_baseline(model, explanation, baseline, "delete", IMAGE_INSERTION if insertion else IMAGE_REMOVAL)
    if explanation.kind == "generation":
        return _generation_curve(model, explanation, insertion=insertion, max_steps=max_steps, step=step, baseline=baseline,
                                 batch_size=batch_size, name=name, context=context or "prompt")
    _no_context(context, name)
    n = _need_features(explanation, name)
    order = ranking(explanation.scores)
    counts = curve_counts(n, max_steps, step=step)
    keep = torch.ones(len(counts), n, dtype=torch.bool)
    for row, m in enumerate(counts):
        if insertion:
            keep[row] = False
            keep[row, order[:m]] = True
        else:
            keep[row, order[:m]] = False
    _, probs = _probabilities(model, explanation, keep, baseline, batch_size)
    x = counts / n
    return MetricResult(name, trapezoid(x, probs), insertion,
                        {"x": [float(v) for v in x], "y": [float(v) for v in probs], "counts": [int(c) for c in counts],
                         "baseline": baseline})


def _generation_curve(model: Any, explanation: Explanation, *, insertion: bool, max_steps: int | None, step: int | None,
                      baseline: str, batch_size: int | None, name: str, context: str) -> MetricResult:
    """:func:`_curve` for a generation: one curve per target over its own candidates (F_t of them,
    x = counts / F_t; insertion starts with every candidate removed), the area the mean of theirs."""
    encoded, sets, keeps, counts = _generation_rows(
        model, explanation, context, lambda n: curve_counts(n, max_steps, step=step), keep_only=insertion)
    _, curves = target_probabilities(model, explanation, encoded, keeps, baseline, batch_size)
    xs = [points / len(chosen) for points, chosen in zip(counts, sets, strict=True)]
    areas = np.array([trapezoid(x, y) for x, y in zip(xs, curves, strict=True)])
    return MetricResult(name, float(np.mean(areas)), insertion,
                        {"x": [x.tolist() for x in xs], "y": [y.tolist() for y in curves],
                         "counts": [points.tolist() for points in counts], "per_target": areas.tolist(),
                         "baseline": baseline, "context": context})


@register_metric("deletion_auc", higher_is_better=False,
                 summary="area under p(y) as top-ranked features are removed one by one")
def deletion_auc(model: Any, explanation: Explanation, *, max_steps: int | None = None, step: int | None = None,
                 baseline: Any = None, batch_size: int | None = None,
                 context: str | None = None) -> MetricResult:
    """Deletion curve (Petsiuk et al., 2018, RISE; for text as in Enguehard, 2023): starting from x,
    remove features (pixels at pixel level, or patches, superpixels, words) in ranked order; the
    target probability against the fraction of features removed (0 to 1); value = trapezoid area.
    Lower is better. Removal: ``baseline`` (text ``delete``; images ``mean``, 0 in the normalised
    space as RISE, or ``black``, ...). Points: ``max_steps`` + 1 evenly spaced counts (default 50), or
    one every ``step`` features. ``details["x"]``, ``details["y"]`` hold the curve.
    Forward passes: the number of points, min(F, max_steps) + 1 or ceil(F / step) + 1."""
    return _curve(model, explanation, insertion=False, max_steps=max_steps, step=step, baseline=baseline,
                  batch_size=batch_size, name="deletion_auc", context=context)


@register_metric("insertion_auc", higher_is_better=True,
                 summary="area under p(y) as top-ranked features are added back one by one")
def insertion_auc(model: Any, explanation: Explanation, *, max_steps: int | None = None, step: int | None = None,
                  baseline: Any = None, batch_size: int | None = None,
                  context: str | None = None) -> MetricResult:
    """Insertion curve (Petsiuk et al., 2018): starting from the input with every feature removed
    (text: ``delete``; images: a blurred copy, ``blur:5``, as RISE), put features back in ranked
    order; value = trapezoid area of the target probability against the fraction inserted. Higher is
    better. Points and passes as :func:`deletion_auc`."""
    return _curve(model, explanation, insertion=True, max_steps=max_steps, step=step, baseline=baseline,
                  batch_size=batch_size, name="insertion_auc", context=context)


# ------------------------------------------------------------------ leave-one-out correlation
def kendall_tau_b(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b, ``(n_c - n_d) / sqrt((n_0 - n_x)(n_0 - n_y))`` with ``n_x``, ``n_y`` the
    pairs tied in x, in y (scipy.stats.kendalltau's default). NaN when x or y is constant.
    O(F^2) memory and time."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("kendall_tau_b needs two 1-d arrays of the same length")
    upper = np.triu_indices(a.shape[0], k=1)
    sa = np.sign(a[:, None] - a[None, :])[upper]
    sb = np.sign(b[:, None] - b[None, :])[upper]
    denominator = np.sqrt(float(np.count_nonzero(sa)) * float(np.count_nonzero(sb)))
    return float(np.sum(sa * sb) / denominator) if denominator > 0 else float("nan")


@register_metric("loo_kendall_tau", higher_is_better=True,
                 summary="Kendall tau-b between the scores and leave-one-out probability drops")
def loo_kendall_tau(model: Any, explanation: Explanation, *, baseline: Any = None,
                    batch_size: int | None = None) -> MetricResult:
    """Kendall's tau-b between the explanation's scores and the leave-one-out scores
    ``p(y|x) - p(y|x without feature i)`` (the same removal as ``baseline``). Higher is better (1:
    same order as the model's own single-feature drops). F + 1 forward passes."""
    refuse_generation(explanation)
    baseline = check_baseline(model, explanation, baseline, "delete")
    n = _need_features(explanation, "loo_kendall_tau")
    if n < 2:
        raise MetricError(f"loo_kendall_tau needs at least 2 features; {describe(explanation)} has {n}")
    keep = _keep_rows(n, [[i] for i in range(n)], kept=False)
    _, probs = _probabilities(model, explanation, keep, baseline, batch_size)
    loo = probs[0] - probs[1:]
    tau = kendall_tau_b(explanation.scores, loo)
    if not np.isfinite(tau):
        which = "explanation's scores" if np.ptp(explanation.scores) == 0 else "leave-one-out scores"
        raise MetricError(f"loo_kendall_tau is undefined for {describe(explanation)}: all {which} are equal")
    return MetricResult("loo_kendall_tau", tau, True, {"loo_scores": [float(v) for v in loo], "p_full": float(probs[0]),
                                                        "baseline": baseline})


# ------------------------------------------------------------------ faithfulness correlation
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation coefficient; NaN when either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    return float(np.sum(a * b) / denominator) if denominator > 0 else float("nan")


def correlation_subset(n_features: int, subset_size: int | None) -> int:
    """Features per random subset: ``subset_size``, by default 224 (Quantus's, a row of a 224-pixel
    image) but at most a quarter of the features (at least 1); must be below F."""
    if subset_size is None:
        return max(1, min(224, n_features // 4))
    if isinstance(subset_size, bool) or not isinstance(subset_size, (int, np.integer)) or not 1 <= subset_size < n_features:
        raise ParameterError(f"subset_size must be between 1 and F - 1 = {n_features - 1}, got {subset_size!r}")
    return int(subset_size)


@register_metric("faithfulness_correlation", higher_is_better=True,
                 summary="Pearson correlation of random subsets' score sums with the output drop they cause (Bhatt et al.)")
def faithfulness_correlation(model: Any, explanation: Explanation, *, n_runs: int = 100, subset_size: int | None = None,
                             baseline: Any = None, output: str | None = None, seed: int = 0,
                             batch_size: int | None = None) -> MetricResult:
    """Faithfulness correlation (Bhatt et al., 2020, "Evaluating and aggregating feature-based model
    explanations"; Quantus's FaithfulnessCorrelation): ``n_runs`` times, a random subset of
    ``subset_size`` features (uniform, without replacement; default 224, at most F / 4) is set to the
    ``baseline`` (images: ``black``, as Quantus; text: ``delete``); value = Pearson correlation, over
    the runs, between the sum of the subset's scores and the drop ``f(x) - f(x with the subset
    removed)``. f is the explained ``output`` of the target class (default: the one the explanation
    explained, e.g. log-odds; Quantus reads logits). Higher is better (1: the scores add up like the
    model's own drops; -1: signs flipped). Seeded by ``seed``. ``n_runs`` + 1 forward passes.
    Quantus's "black" is the input's minimum value; here it is the preprocessing's black image.
    """
    refuse_generation(explanation)
    n = _need_features(explanation, "faithfulness_correlation")
    if n < 2:
        raise MetricError(f"faithfulness_correlation needs at least 2 features; {describe(explanation)} has {n}")
    if isinstance(n_runs, bool) or not isinstance(n_runs, (int, np.integer)) or n_runs < 2:
        raise ParameterError(f"n_runs must be an integer >= 2, got {n_runs!r}")
    size = correlation_subset(n, subset_size)
    baseline = check_baseline(model, explanation, baseline, "delete", "black")
    target = Target(explanation.target.index, explanation.target.label, output or explanation.target.output)
    rng = np.random.default_rng(seed)
    subsets = [rng.choice(n, size=size, replace=False) for _ in range(n_runs)]
    keep = _keep_rows(n, subsets, kept=False)
    _, values = _probabilities(model, explanation, keep, baseline, batch_size, target)
    scores = np.asarray(explanation.scores, dtype=np.float64)
    sums = np.array([scores[subset].sum() for subset in subsets])
    drops = values[0] - values[1:]
    rho = pearson(sums, drops)
    if not np.isfinite(rho):
        which = "score sums" if np.ptp(sums) == 0 else "output drops"
        raise MetricError(f"faithfulness_correlation is undefined for {describe(explanation)}: all {which} are equal")
    return MetricResult("faithfulness_correlation", rho, True,
                        {"subset_size": size, "n_runs": int(n_runs), "output": target.output, "baseline": baseline,
                         "seed": seed, "score_sums": sums.tolist(), "drops": drops.tolist(), "f_full": float(values[0])})
