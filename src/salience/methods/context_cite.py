"""ContextCite (Cohen-Wang, Shah, Georgiev and Madry 2024, "ContextCite: Attributing Model Generation
to Context"): which sources of a causal LM's context its response rests on, from a sparse linear
surrogate fitted on random ablations of the context.

What is computed, as the ``context-cite`` package (0.0.4) computes it:

1. The sources are the features available to every target (for ``salience.explain(lm,
   context=..., query=...)``: the context's sentences, words or the user's spans). ``n_ablations``
   masks keep each source independently with probability ``keep_prob`` (numpy's
   ``default_rng(seed)``); row 0 keeps every source (the full context).
2. Every mask is one teacher-forced forward pass over the kept context (+ the rest of the prompt)
   and the response, sources not kept deleted from the sequence (``baseline="delete"``, as the
   package rebuilds the context from the kept sources; it re-tokenises the ablated text, which can
   differ at the joins): n + 1 forward rows in all, through the adapter's batching. Every response
   token's log-probability log p(y_j | kept context, y_<j) is read in that one pass and kept
   (``extras["context_cite"]``), so any sub-span of the response can be scored again without new
   passes (:func:`rescore`).
3. A target's value is its log-probability S (the sum over its tokens), turned into the target's
   output: ``"log_odds"`` (default: the logit of the response's probability, log(P / (1 - P)),
   P = exp(S): the package's target), ``"log_probability"`` (S) or ``"probability"`` (P).
4. Surrogate: y = value / k (k: the target's number of tokens), masks standardised (column mean,
   population standard deviation, 1 for a constant column: scikit-learn's ``StandardScaler``),
   Lasso with penalty ``alpha`` (scikit-learn's objective (1 / 2n) |y - c - Z w|^2 + alpha |w|_1)
   solved to convergence by cyclic coordinate descent; the weights are mapped back to 0/1 masks
   and multiplied by k: score_i = k w_i / sd_i, intercept k (c - sum_i w_i mean_i / sd_i). A score
   is the change of the target's output predicted when source i is kept rather than removed
   (units of the output: nats of log-odds by default; positive: the source supports the response).

Scores of features that are not sources are NaN. Each target is fitted separately on the same
ablations (one per generated token by default; the whole response when explained through
``context=``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from salience.core.registry import register
from salience.core.target import Target
from salience.errors import InputError, ModelOutputError, ParameterError
from salience.methods.base import Attribution, Context
from salience.methods.perturbation import perturbed_outputs
from salience.models.lm_targets import span_bounds

OUTPUTS = ("log_odds", "log_probability", "probability")
CACHE = "context_cite"  # key of the ablations' log-probabilities in Explanation.extras

__all__ = ["ContextCite", "ablation_masks", "fit_surrogate", "lasso", "rescore", "response_output"]


@register("context_cite", aliases=("contextcite",), kind="perturbation", cost="n_ablations + 1 forward",
          summary="Sparse linear surrogate (Lasso) of the response's log-odds on random ablations of the context's sources")
@dataclass
class ContextCite:
    """Score of source i = the Lasso surrogate's weight of keeping source i (see the module's
    docstring): the predicted change of the target's output (log-odds of the response's probability
    by default; nats) when the source is kept rather than deleted. Signed; scores of sources the
    Lasso drops are exactly 0. ``baseline=None`` deletes the ablated sources; a replacement
    baseline (e.g. ``"unk"``) replaces their tokens instead."""

    n_ablations: int = 64
    keep_prob: float = 0.5
    alpha: float = 0.01
    baseline: str | None = None

    default_output: ClassVar[str] = "log_odds"

    def attribute(self, ctx: Context) -> Attribution:
        if self.n_ablations < 2:
            raise ParameterError(f"context_cite needs n_ablations >= 2, got {self.n_ablations}")
        if not 0.0 < self.keep_prob < 1.0:
            raise ParameterError(f"context_cite's keep_prob is a probability strictly between 0 and 1, got {self.keep_prob}")
        if self.alpha < 0:
            raise ParameterError(f"context_cite's alpha (the Lasso penalty) must be >= 0, got {self.alpha}")
        tokens, groups = response_tokens(ctx.targets)
        sources = np.flatnonzero(np.asarray(ctx.available, dtype=bool).all(axis=0))
        if len(sources) < 2:
            raise InputError(f"context_cite needs at least 2 sources before the response, got {len(sources)} "
                             f"{ctx.features.level} feature(s): split the context finer (sources='word') or give spans")
        baseline = ctx.baseline(self.baseline, "delete", perturbation=True)
        masks = ablation_masks(len(sources), self.n_ablations, self.keep_prob, ctx.rng())
        keep = np.ones((self.n_ablations + 1, len(ctx.features)), dtype=bool)
        keep[1:, sources] = masks
        log_probs = perturbed_outputs(dataclasses.replace(ctx, targets=tokens), keep, baseline)  # (n + 1, K)
        scores = np.full((len(ctx.targets), len(ctx.features)), np.nan)
        intercepts, full = [], []
        for t, (target, columns) in enumerate(zip(ctx.targets, groups)):
            values = response_output(log_probs[:, columns].sum(axis=1), target.output)
            if not np.all(np.isfinite(values)):
                raise ModelOutputError(f"target {target.label!r} has probability 1 (or 0) under some ablation, so its "
                                       f"{target.output} is infinite there; explain it with output='log_probability'")
            weights, intercept = fit_surrogate(masks, values[1:], len(columns), self.alpha)
            scores[t, sources] = weights
            intercepts.append(intercept)
            full.append(values[0])
        cache = {"sources": sources.tolist(), "masks": masks.astype(int).tolist(), "log_probs": log_probs.tolist(),
                 "token_positions": [tk.position for tk in tokens], "token_ids": [tk.index for tk in tokens],
                 "groups": groups, "intercepts": intercepts, "alpha": self.alpha}
        return Attribution(scores=scores, output_value=np.array(full),
                           details={"baseline": baseline, "sources": len(sources), "ablations": self.n_ablations},
                           extras={CACHE: cache})


def response_tokens(targets: Sequence[Target]) -> tuple[list[Target], list[list[int]]]:
    """The distinct tokens the targets cover (a token target's own; a span target's every token), as
    log-probability targets in order of position, and each target's columns among them. A target
    without a position (a classifier's class) is its own "token": its log-probability is read."""
    found: dict[object, Target] = {}
    keys: list[list[object]] = []
    for target in targets:
        if target.foil is not None:
            raise ParameterError("context_cite explains a response's probability; a contrast (foil) has none")
        if target.output not in OUTPUTS:
            raise ParameterError(f"context_cite explains the response as {', '.join(OUTPUTS)}; not {target.output!r}")
        if target.position is None:
            key: object = ("class", target.index)
            found.setdefault(key, Target(target.index, target.label, "log_probability"))
            keys.append([key])
            continue
        ids = target.span if target.span is not None else (target.index,)
        for j, token in enumerate(ids):
            known = found.setdefault(target.position + j, Target(token, str(token), "log_probability", target.position + j))
            if known.index != token:
                raise ParameterError(f"two targets read different tokens at position {target.position + j}")
        keys.append([target.position + j for j in range(len(ids))])
    order = sorted(found, key=lambda k: (0, k) if isinstance(k, int) else (1, 0))  # stable: classes in given order
    column = {k: c for c, k in enumerate(order)}
    return [found[k] for k in order], [[column[k] for k in group] for group in keys]


def ablation_masks(n_sources: int, n: int, keep_prob: float, rng: np.random.Generator) -> np.ndarray:
    """(n, S) bool: each source kept independently with probability ``keep_prob``."""
    return rng.random((n, n_sources)) < keep_prob


def response_output(log_probability: np.ndarray, output: str) -> np.ndarray:
    """A response's output from its log-probability S: log(P / (1 - P)) = S - log(-expm1(S))
    (``"log_odds"``), S, or P = exp(S)."""
    s = np.asarray(log_probability, dtype=np.float64)
    if output == "log_odds":
        with np.errstate(divide="ignore"):
            return s - np.log(-np.expm1(s))
    if output == "log_probability":
        return s
    if output == "probability":
        return np.exp(s)
    raise ParameterError(f"context_cite explains the response as {', '.join(OUTPUTS)}; not {output!r}")


def fit_surrogate(masks: np.ndarray, values: np.ndarray, n_tokens: int, alpha: float) -> tuple[np.ndarray, float]:
    """The package's surrogate: Lasso of values / n_tokens on the standardised masks, mapped back to
    0/1 masks and multiplied by n_tokens. Returns (weights (S,), intercept)."""
    x = np.asarray(masks, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64) / n_tokens
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale < 10 * np.finfo(np.float64).eps, 1.0, scale)  # a constant column (StandardScaler's rule)
    z = (x - mean) / scale
    coef = lasso(z, y - y.mean(), alpha)
    weights = coef / scale
    intercept = float(y.mean() - mean @ weights)
    return weights * n_tokens, intercept * n_tokens


def lasso(z: np.ndarray, y: np.ndarray, alpha: float, *, tol: float = 1e-14, max_sweeps: int = 100_000) -> np.ndarray:
    """argmin_w (1 / 2n) |y - z w|^2 + alpha |w|_1 for centred ``z`` (n, S) and ``y`` (n,), by cyclic
    coordinate descent on the Gram matrix until no weight moves by more than ``tol`` (relative)."""
    n, width = z.shape
    gram, corr = z.T @ z / n, z.T @ y / n
    w = np.zeros(width)
    for _ in range(max_sweeps):
        largest = 0.0
        for j in range(width):
            if gram[j, j] <= 0.0:
                continue
            rho = corr[j] - gram[j] @ w + gram[j, j] * w[j]
            new = np.sign(rho) * max(abs(rho) - alpha, 0.0) / gram[j, j]
            largest = max(largest, abs(new - w[j]))
            w[j] = new
        if largest <= tol * max(1.0, float(np.abs(w).max())):
            return w
    raise ModelOutputError(f"the Lasso did not converge in {max_sweeps} sweeps")


def rescore(explanation: Any, response_span: Sequence[int], *, output: str | None = None) -> np.ndarray:
    """ContextCite scores (F,) of the tokens ``response_span = (start, end)`` of the response (indices
    into the tokens a ``context_cite`` explanation scored, in order: for one whose target is the whole
    response, its tokens), from the log-probabilities it cached: no model pass. Equal to a fresh run
    whose target is that span, with the same seed. ``output``: as the explanation's target's by
    default. Features that are not sources are NaN."""
    cache = getattr(explanation, "extras", {}).get(CACHE)
    if not isinstance(cache, Mapping):
        raise ParameterError("this explanation has no ContextCite ablations to re-score (explain it with method='context_cite')")
    start, end = span_bounds(response_span, len(cache["token_positions"]))
    kind = output or explanation.targets[0].output
    log_probs = np.asarray(cache["log_probs"], dtype=np.float64)
    values = response_output(log_probs[1:, start:end].sum(axis=1), kind)
    weights, _ = fit_surrogate(np.asarray(cache["masks"], dtype=bool), values, end - start, float(cache["alpha"]))
    scores = np.full(len(explanation.features), np.nan)
    scores[np.asarray(cache["sources"], dtype=int)] = weights
    return scores
