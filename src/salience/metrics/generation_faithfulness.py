"""Removal rows of the faithfulness metrics for a causal LM's generation (an Explanation with T
targets, one per generated token or span, and a (T, F) score matrix).

What is measured: for each target t, the probability of its token (a span: of all its tokens, the
product) under teacher forcing of the *original* continuation: the generated tokens stay in the
sequence as they were generated (nothing is regenerated after a removal), only features of the
context change. Which features a target's ranking draws from (its *candidates*):

- ``context="prompt"`` (the default): the prompt's features, as in ERASER where the input is what
  is perturbed and the output fixed;
- ``context="preceding"``: the prompt's features and the generated tokens before the target (the
  whole context the model saw when it produced the token, as ReAGent's evaluation, Zhao et al. 2024).

In both, a candidate must be able to influence the target (all its positions before it: the
adapter's ``available``) and have a finite score in the target's row (the API writes NaN for the
others; a context-attribution method leaves non-source features NaN).

This module builds no metric: it re-encodes the explained sequence, says which features each
target may rank, and reads every target's probability for per-target rows of kept features in ONE
``score_perturbed`` call over the distinct rows, every target read from every row (a row
that two targets share, such as the unperturbed input or the same top-k removed, runs once).
The metrics themselves live in :mod:`salience.metrics.faithfulness`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from salience.core.explanation import Explanation
from salience.core.features import FeatureSet, as_feature_set
from salience.core.target import Target
from salience.errors import ParameterError
from salience.metrics.base import MetricError
from salience.models.base import Encoded
from salience.models.causal_lm import PROMPT

CONTEXTS: tuple[str, ...] = ("prompt", "preceding")

__all__ = ["CONTEXTS", "candidates", "probability_targets", "target_probabilities", "teacher_forced"]


def teacher_forced(model: Any, explanation: Explanation, what: str) -> Encoded:
    """The explained prompt with its continuation teacher-forced, checked to be the explained token
    sequence (the same tokens, and each target's token id at its position). The continuation's text
    is tokenised again first (no model pass); when that gives other tokens (a decoded text need not
    re-tokenise alike) and the continuation was generated, it is generated again with the recorded
    settings (greedy, or sampled with its seed: one counted pass per token). ``what`` names the
    example in errors."""
    extras = explanation.extras
    if getattr(model, "explanation_kind", None) != "generation" or "prompt" not in extras or "continuation" not in extras:
        raise MetricError(f"the explanation of {what} is a generation: score it with the causal LM that generated it")
    prompt = extras.get("messages") or extras["prompt"]
    encoded: Encoded = model.encode(prompt, continuation=extras["continuation"], truncate=explanation.truncated,
                                    template_tokens=bool(explanation.params.get("template_tokens", False)))
    if not _same_sequence(encoded, explanation) and extras.get("generated"):
        new = len(explanation.tokens) - int(extras["prompt_length"])
        encoded = model.encode(prompt, max_new_tokens=new, sample=bool(extras.get("sample", False)),
                               seed=int(extras.get("seed", 0)), truncate=explanation.truncated, step_scores=False,
                               template_tokens=bool(explanation.params.get("template_tokens", False)))
    if not _same_sequence(encoded, explanation):
        raise MetricError(f"re-encoding {what} gives other tokens than the explanation's (another model or tokenizer?)")
    return encoded


def _same_sequence(encoded: Encoded, explanation: Explanation) -> bool:
    if list(encoded.tokens) != list(explanation.tokens):
        return False
    ids = encoded.input_ids.tolist()
    for target in explanation.targets:
        wanted = target.span if target.span is not None else (target.index,)
        start = int(target.position or 0)
        if tuple(ids[start:start + len(wanted)]) != tuple(wanted):
            return False
    return True


def candidates(model: Any, explanation: Explanation, encoded: Encoded, context: str, what: str) -> list[np.ndarray]:
    """For each target, the indices of the features its ranking draws from (see the module
    docstring), in input order. Raises :class:`MetricError` when a target has none."""
    if context not in CONTEXTS:
        raise ParameterError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
    scores = score_matrix(explanation)
    features = feature_set(explanation, encoded)
    allowed = np.asarray(model.available(encoded, explanation.targets, features), dtype=bool) & np.isfinite(scores)
    if context == "prompt":
        allowed &= np.array([f.segment == PROMPT for f in explanation.features], dtype=bool)[None, :]
    found = [np.flatnonzero(row) for row in allowed]
    for t, indices in enumerate(found):
        if len(indices) == 0:
            where = "prompt feature" if context == "prompt" else "feature before it"
            raise MetricError(f"the explanation of {what} scores no {where} for target {t} "
                              f"({explanation.targets[t].label!r}): nothing to remove")
    return found


def score_matrix(explanation: Explanation) -> np.ndarray:
    """The scores as (T, F) float64 (one target's (F,) as one row)."""
    scores = np.asarray(explanation.scores, dtype=np.float64)
    return scores[None] if scores.ndim == 1 else scores


def feature_set(explanation: Explanation, encoded: Encoded) -> FeatureSet:
    return as_feature_set(list(explanation.features), encoded.length, explanation.level)


def probability_targets(targets: Sequence[Target]) -> list[Target]:
    """Each target read as the probability of its own token (a span: the product of its tokens'
    probabilities, exp of their summed log-probabilities); a contrast's foil is dropped."""
    return [replace(t, output="probability", foil=None) for t in targets]


def target_probabilities(model: Any, explanation: Explanation, encoded: Encoded, keeps: Sequence[np.ndarray],
                         baseline: str, batch_size: int | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """p_t(x) (T,) and, for each target t, its probability on each row of ``keeps[t]`` (R_t, F) bool
    (features not kept are removed by ``baseline``). The unperturbed input and every distinct row
    go through one ``score_perturbed`` call with all targets; each target reads its own rows."""
    n_features = len(explanation.features)
    index: dict[bytes, int] = {}
    rows: list[np.ndarray] = []

    def row_of(keep: np.ndarray) -> int:
        key = np.packbits(keep).tobytes()
        if key not in index:
            index[key] = len(rows)
            rows.append(keep)
        return index[key]

    row_of(np.ones(n_features, dtype=bool))
    where = [[row_of(np.asarray(keep, dtype=bool)) for keep in target_rows] for target_rows in keeps]
    values = model.score_perturbed(encoded, torch.as_tensor(np.stack(rows)), feature_set(explanation, encoded), baseline,
                                   probability_targets(explanation.targets), batch_size=batch_size)
    values = np.asarray(torch.as_tensor(values).detach().double().cpu().numpy(), dtype=np.float64).reshape(len(rows), -1)
    return values[0].copy(), [values[np.asarray(w, dtype=np.int64), t] for t, w in enumerate(where)]
