"""Lay features back into the text the user typed, for renderers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from salience.core.explanation import Explanation


def segments(explanation: Explanation) -> Iterator[tuple[int, list[tuple[str, float | None]]]]:
    """Per input text (segment index), its pieces in order: (text, score) for features and
    (text, None) for the characters between them. Token-level features of one word may overlap;
    overlapping characters are shown once."""
    texts = list(explanation.input) if isinstance(explanation.input, tuple) else [explanation.input]
    for segment, text in enumerate(texts):
        pieces: list[tuple[str, float | None]] = []
        cursor = 0
        spans = sorted((f.start, f.end, s) for f, s in zip(explanation.features, explanation.scores) if f.segment == segment)
        for start, end, score in spans:
            start = max(start, cursor)
            if start > cursor:
                pieces.append((text[cursor:start], None))
            if end > start:
                pieces.append((text[start:end], float(score)))
                cursor = end
        if cursor < len(text):
            pieces.append((text[cursor:], None))
        yield segment, pieces


def scale(explanation: Explanation) -> float:
    """The largest |score| (1.0 when all are zero), used to normalise colour intensity."""
    scores = np.abs(np.asarray(explanation.scores, dtype=float))
    largest = float(np.nanmax(scores)) if scores.size and not np.all(np.isnan(scores)) else 0.0  # NaN: unavailable
    return largest if largest > 0 else 1.0


def describe(explanation: Explanation) -> str:
    """One line of provenance: model, method, target and output, prediction, delta, cost."""
    e = explanation
    parts = [f"model {e.model}", f"method {e.method}"]
    if len(e.targets) == 1:
        parts.append(f"target {e.target.label} ({e.target.output})")
    else:
        parts.append(f"{len(e.targets)} targets ({e.target.output})")
    if e.prediction is not None:  # a generation has no class prediction
        parts.append(f"prediction {e.prediction.label} p={e.prediction.probabilities[e.prediction.index]:.3f}")
    if e.delta is not None:
        relative = e.relative_delta
        deltas = np.abs(np.asarray(e.delta, dtype=float))
        shown = f"delta {e.delta:+.2e}" if deltas.ndim == 0 else f"max |delta| {np.nanmax(deltas):.2e}"
        parts.append(shown + (f" ({100 * relative:.2g}% of the gap)" if relative is not None else ""))
    cached = f" ({e.cost.cached_positions} token positions from a cache)" if e.cost.cached_positions else ""
    parts.append(f"{e.cost.forward_passes} fwd{cached} / {e.cost.backward_passes} bwd passes, {e.cost.seconds:.2f} s")
    return " | ".join(parts)
