"""Disagreement between two methods on each example of a run: the Spearman rank correlation ρ of
their feature scores (the example browser's ``rank_a`` / ``rank_b`` filter and sort).

For one example, ρ is Pearson's correlation of the ranks of the two score arrays (ties take their
average rank), i.e. :func:`scipy.stats.spearmanr` of the flattened scores, over the entries that are
finite in both (a causal LM's later tokens score NaN for earlier targets; a generation's (T, F)
matrix is compared entry by entry). It lies in [-1, 1]: 1 when both methods order the features
alike, -1 when reversed. It is undefined (None, shown as "—") when the two arrays have different
shapes, fewer than 2 common finite entries remain, or either array is constant there (the ranks
then have no variance); undefined examples never pass a ρ threshold and sort last.

The whole run is read once per (run, method pair) and state of the run, in chunks of
``CHUNK`` examples through SQLite's ``json_extract`` (only the ``scores`` member leaves SQLite, not
the whole document; a document with NaN, which SQLite's JSON parser refuses, is read whole), and
the per-example ρ is kept by the viewer's bounded cache. Examples in a chunk with the same
number of entries are ranked together in vectorised calls (:func:`scipy.stats.rankdata` along
rows, at most ``ENTRIES`` entries a call), which equals spearmanr per example.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from salience.core.explanation import decode_array
from salience.serve.database import ReadOnlyStore

CHUNK = 500  # examples read from SQLite at a time (bounds the memory of a scan)
ENTRIES = 2_000_000  # score entries ranked in one vectorised call (an image's pixel scores can be 50,000 a row)


def spearman_rho(first: np.ndarray, second: np.ndarray) -> float | None:
    """ρ of one example's two score arrays (see the module docstring); None when undefined."""
    if np.shape(first) != np.shape(second):
        return None
    a, b = _common(first, second)
    rho = _batch_rho(a[None, :], b[None, :])[0]
    return None if np.isnan(rho) else float(rho)


def _common(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flattened entries finite in both arrays."""
    a, b = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _batch_rho(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ρ of each row pair of two (N, K) arrays (NaN where a row's ranks are constant or K < 2)."""
    from scipy.stats import rankdata

    if a.shape[1] < 2:
        return np.full(a.shape[0], np.nan)
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (ra * rb).sum(axis=1) / norm
    rho[~(norm > 0)] = np.nan
    return np.clip(rho, -1.0, 1.0)


def _scores(text: str | None) -> np.ndarray | None:
    """Scores from SQLite's ``json_extract`` (a JSON array or base64 object), or from a whole
    document SQLite could not parse (``{"scores": ...}`` with NaN, which Python's json reads)."""
    if text is None:
        return None
    try:
        data = json.loads(text)
        return decode_array(data["scores"] if isinstance(data, dict) and "schema" in data else data)
    except (ValueError, KeyError, TypeError):
        return None


def _chunk_rhos(rows: Iterable[Any]) -> dict[str, float | None]:
    """example id -> ρ for rows (example_id, scores of a, scores of b), ranked by common length."""
    out: dict[str, float | None] = {}
    groups: dict[int, list[tuple[str, np.ndarray, np.ndarray]]] = defaultdict(list)
    for example_id, first_text, second_text in rows:
        first, second = _scores(first_text), _scores(second_text)
        if first is None or second is None or first.shape != second.shape:
            out[example_id] = None
            continue
        a, b = _common(first, second)
        groups[a.size].append((example_id, a, b))
    for size, group in groups.items():
        step = max(1, ENTRIES // max(size, 1))
        for start in range(0, len(group), step):
            batch = group[start:start + step]
            rhos = _batch_rho(np.stack([g[1] for g in batch]), np.stack([g[2] for g in batch]))
            for (example_id, _, _), rho in zip(batch, rhos, strict=True):
                out[example_id] = None if np.isnan(rho) else float(rho)
    return out


def rank_correlations(store: ReadOnlyStore, run_id: str, first: str, second: str) -> dict[str, float | None]:
    """example id -> ρ between methods ``first`` and ``second`` for every example where both have
    a stored unit (None: undefined, see the module docstring, or either method failed there);
    examples not yet explained by both are absent."""
    cursor = store.conn.execute("""
        SELECT a.example_id,
               CASE WHEN json_valid(a.explanation) THEN json_extract(a.explanation, '$.scores') ELSE a.explanation END,
               CASE WHEN json_valid(b.explanation) THEN json_extract(b.explanation, '$.scores') ELSE b.explanation END
        FROM explanations a JOIN explanations b
          ON b.run_id = a.run_id AND b.example_id = a.example_id AND b.method = ?
        WHERE a.run_id = ? AND a.method = ?""", (second, run_id, first))
    out: dict[str, float | None] = {}
    while rows := cursor.fetchmany(CHUNK):
        out.update(_chunk_rhos(rows))
    return out
