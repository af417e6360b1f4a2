"""Aggregate an :class:`~salience.core.explanation.Explanation` without recomputing anything:
features into words, sentences or user character spans, and targets (a generation's tokens) into
spans of targets. Only the explanation's features (character offsets, segments, token indices)
and its scores are used.

Rules (also in docs/explanations.md):

- **Membership** of a feature in a group (a word, a sentence, a span) is decided by the feature's
  first character, ``start``: the group whose span [start, end) contains it. A feature whose first
  character is whitespace outside every group (a byte-level BPE token " Paris", a "\\n" token)
  belongs to the group that begins at the next non-whitespace character of its text, if any (the
  rule by which the adapters build words, so token -> word aggregation groups tokens exactly as
  ``level="word"`` does). A token straddling two words or sentences therefore goes to the one its
  first character lies in. Features with no characters (``end <= start``: special tokens) are in
  no group. User spans may overlap: a feature then counts in every span holding its first
  character.
- **Reduction** of a group's feature scores, per target: ``"sum"`` (default), ``"mean"``, or
  ``"max_abs"`` (the signed score of largest magnitude; the first such feature on a tie).
- **NaN** marks a feature that cannot influence a target (a causal LM's token at or after the
  target). By default (``strict=False``) such a part contributes nothing: the group's value is
  reduced over its available parts, and is NaN only when every part is NaN. With ``strict=True``
  a group is NaN as soon as one part is NaN, the causal-LM adapter's own rule for a multi-token
  feature (a word holding the target's token or a later one is NaN at ``level="word"``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from salience.core.features import Feature
from salience.core.target import Target
from salience.errors import ParameterError

if TYPE_CHECKING:
    from salience.core.explanation import Explanation

# A word is a run of letters and digits (inner apostrophes allowed) or one punctuation mark; the
# token adapters build their word features with this same pattern.
WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
# A sentence ends after a run of . ! ? (with closing quotes or brackets) followed by whitespace or
# the end of the text, or at a line break.
SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|\n")
LEVELS = ("word", "sentence", "span")
RULES = ("sum", "mean", "max_abs")
_RANK = {"token": 0, "word": 1, "sentence": 2}  # finer -> coarser; aggregation goes up only

__all__ = ["LEVELS", "RULES", "aggregate_features", "aggregate_targets", "sentence_spans", "word_spans"]


# ------------------------------------------------------------------ splitting
def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the words of ``text`` (:data:`WORD_PATTERN`)."""
    return [(m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of ``text``: a sentence ends after a run of
    ``.``, ``!`` or ``?`` (closing quotes and brackets included) followed by whitespace or the end
    of the text, or at a line break; surrounding whitespace is left out and empty pieces dropped.
    A plain rule: abbreviations such as "Dr. Smith" split, as in many simple splitters."""
    cuts = [0, *(m.end() for m in SENTENCE_END.finditer(text)), len(text)]
    spans = []
    for begin, end in zip(cuts, cuts[1:]):
        piece = text[begin:end]
        left = len(piece) - len(piece.lstrip())
        right = len(piece.rstrip())
        if right > left:
            spans.append((begin + left, begin + right))
    return spans


# ------------------------------------------------------------------ features
def aggregate_features(explanation: Explanation, level: str | None = None, *, spans: Sequence[Sequence[int]] | None = None,
                       rule: str = "sum", strict: bool = False) -> Explanation:
    """A new explanation whose features are the words (``level="word"``), sentences
    (``"sentence"``) or character ``spans`` (level ``"span"``) of the input, each scoring the
    ``rule`` of its member features' scores per target (see the module docstring for membership
    and NaN). ``spans`` are ``(start, end)`` in the first text (a classifier's text or premise, a
    causal LM's prompt) or ``(segment, start, end)`` (a pair's second text: 1; a generation's
    continuation: 1). Words and sentences holding no feature are left out; a span holding none is
    an error. Features, scores and ``level`` are new; ``params["aggregation"]`` records the level,
    rule, NaN rule and the level aggregated from; ``token_scores``, outputs and ``delta`` (the
    method's completeness error) are kept as they were. With ``rule="sum"`` over groups that cover
    every feature, scores still sum to the same totals.

    Which methods give the same scores aggregated as computed at the coarser level: those whose
    feature score is the sum of position scores over one shared path or point (saliency, input x
    gradient, IG, SmoothGrad, gradient SHAP). Perturbation methods (occlusion, LIME, KernelSHAP)
    and SIG (one path per feature) are not additive: removing a word is not the sum of removing
    its tokens one at a time, so their aggregated scores summarise, not recompute.
    """
    texts = _segment_texts(explanation)
    _check_rule(rule)
    level = _check_level(explanation, level, spans)
    _check_disjoint(explanation.features)
    groups = _groups(texts, level, spans)
    members = _members(explanation.features, texts, groups)
    if level != "span":
        kept = [g for g, m in enumerate(members) if m]
        groups, members = [groups[g] for g in kept], [members[g] for g in kept]
    else:
        for (segment, start, end), m in zip(groups, members):
            if not m:
                raise ParameterError(f"span ({segment}, {start}, {end}) {texts[segment][start:end]!r} holds no feature")
    scores = np.stack([_reduce(explanation.scores[..., m], rule, strict) for m in members], axis=-1) \
        if members else np.zeros((*explanation.scores.shape[:-1], 0))
    features = [Feature(texts[segment][start:end], start, end, segment,
                        tuple(sorted({t for i in m for t in explanation.features[i].tokens})))
                for (segment, start, end), m in zip(groups, members)]
    record: dict[str, Any] = {"level": level, "rule": rule, "strict": strict, "from": explanation.level}
    if level == "span":
        record["spans"] = [list(g) for g in groups]
    return _replace(explanation, features=features, scores=scores, level=level, record=record)


def _segment_texts(explanation: Explanation) -> list[str]:
    """The texts the features' offsets point into, by segment."""
    if explanation.kind == "image":
        raise ParameterError("aggregate() groups the features of texts and generations; for image regions "
                             "explain with level='patch' or level='superpixel'")
    raw = explanation.input
    if explanation.kind == "generation":
        texts = [explanation.extras.get("prompt", raw)]
        if "continuation" in explanation.extras:
            texts.append(explanation.extras["continuation"])
    else:
        texts = list(raw) if isinstance(raw, tuple) else [raw]
    if not all(isinstance(t, str) for t in texts):
        raise ParameterError("aggregate() needs the texts the features' offsets point into; this explanation's input "
                             f"is a {type(raw).__name__}, not text")
    for f in explanation.features:
        if not 0 <= f.segment < len(texts):
            raise ParameterError(f"feature {f.text!r} points into text {f.segment}, but the explanation keeps {len(texts)}")
    return texts


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ParameterError(f"unknown aggregation rule {rule!r}; choose one of {', '.join(RULES)}")


def _check_level(explanation: Explanation, level: str | None, spans: Sequence[Sequence[int]] | None) -> str:
    if spans is not None:
        if level not in (None, "span"):
            raise ParameterError(f"give either a level ({level!r}) or spans, not both")
        return "span"
    if level is None:
        raise ParameterError("aggregate() needs a level ('word' or 'sentence') or spans=[(start, end), ...]")
    if level == "span":
        raise ParameterError("level 'span' needs spans=[(start, end), ...] (character offsets)")
    if level not in LEVELS:
        raise ParameterError(f"unknown aggregation level {level!r}; choose 'word', 'sentence' or spans=[...]")
    source = _RANK.get(explanation.level)
    if source is None or source > _RANK[level]:
        raise ParameterError(f"a {explanation.level}-level explanation cannot be aggregated to {level}s: aggregation "
                             "only joins features into coarser units (token < word < sentence)")
    return level


def _check_disjoint(features: Sequence[Feature]) -> None:
    """Features that share a position would be counted twice in a group."""
    seen: set[int] = set()
    for f in features:
        if seen.intersection(f.tokens):
            raise ParameterError(f"features overlap (feature {f.text!r} shares tokens with another): their sum would count "
                                 "those tokens twice; aggregate a token- or word-level explanation")
        seen.update(f.tokens)


def _groups(texts: list[str], level: str, spans: Sequence[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    """(segment, start, end) of every group, in order."""
    if level == "word":
        return [(s, a, b) for s, text in enumerate(texts) for a, b in word_spans(text)]
    if level == "sentence":
        return [(s, a, b) for s, text in enumerate(texts) for a, b in sentence_spans(text)]
    assert spans is not None
    if not spans:
        raise ParameterError("spans is empty; give at least one (start, end)")
    groups = []
    for span in spans:
        values = tuple(span)
        if len(values) not in (2, 3) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise ParameterError(f"a span is (start, end) or (segment, start, end) in characters, got {span!r}")
        segment, start, end = (0, *values) if len(values) == 2 else values
        if not 0 <= segment < len(texts):
            raise ParameterError(f"span {span!r} names text {segment}, but the input has {len(texts)} (0-{len(texts) - 1})")
        if not 0 <= start < end <= len(texts[segment]):
            raise ParameterError(f"span {span!r} is outside text {segment} (0-{len(texts[segment])} characters) or empty")
        groups.append((int(segment), int(start), int(end)))
    return groups


def _members(features: Sequence[Feature], texts: list[str], groups: list[tuple[int, int, int]]) -> list[list[int]]:
    """Indices of the features in each group (see the module docstring for the rule)."""
    members: list[list[int]] = [[] for _ in groups]
    if not groups:
        return members
    segment_of = np.array([g[0] for g in groups])
    starts, ends = np.array([g[1] for g in groups]), np.array([g[2] for g in groups])
    for i, f in enumerate(features):
        if f.end <= f.start or f.start < 0:
            continue
        text, mine = texts[f.segment], segment_of == f.segment
        inside = mine & (starts <= f.start) & (f.start < ends)
        if not inside.any():
            anchor = len(text) - len(text[f.start:].lstrip())  # the next non-whitespace character
            if anchor == f.start or anchor >= len(text):
                continue
            inside = mine & (starts <= anchor) & (anchor < ends)
        for g in np.flatnonzero(inside):
            members[int(g)].append(i)
    return members


def _reduce(values: np.ndarray, rule: str, strict: bool) -> np.ndarray:
    """``values`` (..., k) -> (...) by ``rule`` over the last axis, NaN parts as in the module docstring."""
    missing = np.isnan(values)
    absent = missing.all(axis=-1)
    filled = np.where(missing, 0.0, values)
    if rule == "sum":
        out = filled.sum(axis=-1)
    elif rule == "mean":
        count = (~missing).sum(axis=-1)
        out = filled.sum(axis=-1) / np.maximum(count, 1)
    else:
        magnitude = np.where(missing, -1.0, np.abs(values))
        pick = np.argmax(magnitude, axis=-1)
        out = np.take_along_axis(filled, pick[..., None], axis=-1)[..., 0]
    unavailable = missing.any(axis=-1) if strict else absent
    return np.where(unavailable, np.nan, out)


def _replace(explanation: Explanation, *, record: dict[str, Any], **changes: Any) -> Explanation:
    """A copy with ``changes`` and the aggregation ``record`` in params (an earlier one kept under
    ``previous``); lists and dicts copied so the two explanations share nothing mutable."""
    params = dict(explanation.params)
    if "aggregation" in params:
        record = {**record, "previous": params["aggregation"]}
    params["aggregation"] = record
    base = {"params": params, "warnings": list(explanation.warnings), "extras": dict(explanation.extras),
            "tokens": list(explanation.tokens), "targets": list(explanation.targets)}
    return dataclasses.replace(explanation, **{**base, **changes})


# ------------------------------------------------------------------- targets
def aggregate_targets(explanation: Explanation, spans: Sequence[Sequence[int]], *, rule: str = "sum",
                      strict: bool = False) -> Explanation:
    """A new explanation with one target per span ``(start, end)`` of target indices (0 = the first
    target, end exclusive; spans may overlap): its scores, ``token_scores``, ``output_value`` and
    ``baseline_value`` are the ``rule`` of the span's target rows (per feature; NaN as in the module
    docstring: a feature that cannot influence a target contributes nothing to it, so by default a
    feature is NaN only for a span none of whose targets it can influence). ``delta`` is summed
    with ``rule="sum"`` and averaged with ``"mean"``; with ``"max_abs"`` outputs and delta are None.

    With ``rule="sum"`` and an additive method (gradient methods; IG over one shared path), the
    sum of the span's rows is the attribution of the sum of the span's outputs: with
    ``output="log_probability"`` the log-probability of the whole span given the prompt; with
    ``"probability"`` a sum of probabilities, which is not the span's probability (a warning says
    so). For non-additive methods (occlusion, LIME, KernelSHAP, SIG) the sum of rows summarises the
    targets' scores and is not what the method would give for the span's output.

    Each new target is labelled with the span's text (from token-level features' offsets into the
    continuation, else the tokens' texts joined); its ``index`` is -1 and ``position`` None, since
    it is not one token (metrics that re-run the model on a target cannot use it).
    """
    if explanation.kind == "image":
        raise ParameterError("aggregate_targets() is for generations (one target per token); image explanations have classes")
    if not explanation.multi_target:
        raise ParameterError("this explanation has one target (scores (F,)); there are no targets to aggregate")
    _check_rule(rule)
    count = len(explanation.targets)
    if not spans:
        raise ParameterError("target spans is empty; give at least one (start, end) of target indices")
    checked = []
    for span in spans:
        values = tuple(span)
        if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise ParameterError(f"a target span is (start, end) of target indices, got {span!r}")
        start, end = int(values[0]), int(values[1])
        if not 0 <= start < end <= count:
            raise ParameterError(f"target span {span!r} is outside the {count} targets (0-{count}) or empty")
        checked.append((start, end))

    def rows(values: Any) -> Any:
        if values is None or np.ndim(values) == 0:
            return values
        array = np.asarray(values, dtype=np.float64)
        return np.stack([_reduce(np.moveaxis(array[a:b], 0, -1), rule, strict) for a, b in checked])

    def output(values: Any) -> Any:
        return None if rule == "max_abs" else rows(values)

    targets = [_span_target(explanation, a, b) for a, b in checked]
    warnings = list(explanation.warnings)
    if rule == "sum" and explanation.target.output == "probability" and any(b - a > 1 for a, b in checked):
        warnings.append("target spans sum probabilities, which is not the probability of the span; "
                        "explain with output='log_probability' for the span's log-probability")
    record = {"target_spans": [list(s) for s in checked], "rule": rule, "strict": strict}
    token_scores = explanation.token_scores
    return _replace(explanation, record=record, scores=rows(explanation.scores), targets=targets, target=targets[0],
                    token_scores=rows(token_scores) if token_scores is not None and token_scores.ndim == 2 else token_scores,
                    output_value=output(explanation.output_value), baseline_value=output(explanation.baseline_value),
                    delta=output(explanation.delta), warnings=warnings)


def _span_target(explanation: Explanation, start: int, end: int) -> Target:
    """The target standing for targets [start, end): labelled with their text."""
    chosen = explanation.targets[start:end]
    label = "".join(t.label for t in chosen)
    continuation = explanation.extras.get("continuation")
    positions = {t.position for t in chosen}
    if isinstance(continuation, str) and None not in positions:
        # the continuation's features (tokens, or words lying wholly inside the span) covering its tokens
        pieces = [f for f in explanation.features if f.segment == 1 and positions.intersection(f.tokens)]
        covered = {p for f in pieces for p in f.tokens}
        if covered == positions:
            label = continuation[min(f.start for f in pieces):max(f.end for f in pieces)]
    return Target(-1, label, explanation.target.output, None)
