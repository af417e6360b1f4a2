"""Synthetic results databases for the viewer's tests and benchmarks/viewer_load.py: a text run of
any size written straight through SQLite in one transaction (no model), with valid explanation
documents (salience.explanation/2), metric rows and deletion curves, and hand-set runs for exact
checks (:func:`write_run`).

Only numpy, the store and the core types: importable by a benchmark without the test fixtures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salience.core.explanation import Explanation
from salience.core.features import Feature
from salience.core.target import Prediction, Target
from salience.evaluate.store import Store

WORDS = ("the", "film", "was", "good", "bad", "plot", "acting", "slow", "great", "dull", "music", "ending", "a", "and")
LABELS = ("negative", "positive")


def text_document(text: str, scores: Sequence[float] | np.ndarray, method: str, predicted: int = 1) -> dict[str, Any]:
    """The JSON dict of a text explanation of ``text`` (one feature per space-separated word)."""
    features, start = [], 0
    for word in text.split(" "):
        features.append(Feature(word, start, start + len(word)))
        start += len(word) + 1
    probabilities = (0.3, 0.7) if predicted == 1 else (0.7, 0.3)
    explanation = Explanation(input=text, features=features, scores=np.asarray(scores, dtype=np.float64), method=method,
                              params={}, model="synthetic", target=Target(predicted, LABELS[predicted]),
                              prediction=Prediction(predicted, LABELS[predicted], probabilities), level="word")
    return explanation.to_dict()


def write_run(path: Path, run_id: str, methods: Sequence[str], metrics: Sequence[str],
              units: Iterable[tuple[str, str, dict[str, Any] | None, str, dict[str, float | None]]],
              examples: Iterable[tuple[str, int, Any, Any]], *, name: str | None = None, status: str = "complete") -> Path:
    """A run written in one transaction: ``examples`` (id, position, input, label), ``units``
    (example id, method, explanation dict or None, error or "", {metric: value}); each
    deletion_auc row carries a straight-line curve in its details."""
    config = {"model": "synthetic", "dataset": "synthetic", "seed": 0,
              "methods": [{"label": m, "name": m, "params": {}} for m in methods],
              "metrics": [{"label": m, "name": m, "params": {}} for m in metrics]}
    now = time.time()
    with Store(path) as store, store.transaction() as conn:
        conn.execute("INSERT INTO runs VALUES (?, ?, ?, 'synthetic', 'synthetic', ?, '{}', ?, ?)",
                     (run_id, name, status, json.dumps(config), now, now))
        conn.executemany("INSERT INTO examples (run_id, example_id, position, input, label) VALUES (?, ?, ?, ?, ?)",
                         [(run_id, eid, pos, json.dumps(inp), json.dumps(label)) for eid, pos, inp, label in examples])
        for example_id, method, document, error, values in units:
            conn.execute("INSERT INTO explanations VALUES (?, ?, ?, ?, ?, 0.01, 1, 1, ?)",
                         (run_id, example_id, method, None if document is None else json.dumps(document), error or None, now))
            conn.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, 1, NULL)", [
                (run_id, example_id, method, metric, value, 0 if metric == "deletion_auc" else 1,
                 json.dumps({"x": [0.0, 1.0], "y": [1.0, 1.0 - value]} if metric == "deletion_auc" and value is not None else {}))
                for metric, value in values.items()])
    return path


def synthetic_run(path: Path, n: int, methods: Sequence[str] = ("occlusion", "saliency", "integrated_gradients"),
                  metrics: Sequence[str] = ("comprehensiveness", "deletion_auc"), *, seed: int = 0, run_id: str = "synthetic",
                  scores: Callable[[np.random.Generator, int, int], np.ndarray] | None = None) -> Path:
    """A complete text run of ``n`` examples (4-24 words each), every method explained, every
    metric a value in [0, 1]. ``scores(rng, method number, words)`` gives a method's scores (by
    default: a shared signal plus method-specific noise, so the methods mostly agree)."""
    rng = np.random.default_rng(seed)

    def default(rng: np.random.Generator, _: int, words: int) -> np.ndarray:
        return shared[:words] + rng.normal(0.0, 1.0, words)

    make = scores or default
    examples, units = [], []
    for i in range(n):
        words = int(rng.integers(4, 25))
        text = " ".join(rng.choice(WORDS, words))
        label = int(rng.integers(0, 2))
        predicted = label if rng.random() < 0.8 else 1 - label
        examples.append((f"ex{i}", i, text, label))
        shared = rng.normal(0.0, 1.0, words)
        for number, method in enumerate(methods):
            document = text_document(text, make(rng, number, words), method, predicted)
            units.append((f"ex{i}", method, document, "", {m: float(rng.random()) for m in metrics}))
    return write_run(path, run_id, methods, metrics, units, examples)
