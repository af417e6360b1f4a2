"""The viewer's read-only view of a results database.

:class:`ReadOnlyStore` opens the SQLite file with the URI ``file:PATH?mode=ro``: every statement
that would write fails in SQLite itself (``attempt to write a readonly database``), so the viewer
cannot change a run, and a ``salience evaluate`` writing the same file keeps working (WAL mode:
readers never block the writer). SQLite may still create the ``-wal`` and ``-shm`` side files
next to the database when they are missing (that is how a reader joins a WAL database); the
database file itself is never written.

It inherits the reading methods of :class:`~salience.evaluate.store.Store` (``runs``, ``run``,
``find_run``, ``results``) and adds lighter queries for pages: the metric values without their
details, the curves of one metric, the example index and the explanations of one page only.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salience.evaluate.store import SCHEMA_VERSION, Store, StoreError


@dataclass(frozen=True)
class ExampleEntry:
    """One example as the browser lists it: ``label`` as stored (index or name, None when the
    dataset has none), the model's prediction read from the first stored explanation (a causal
    LM's: its continuation; None when no explanation of the example is stored yet), and ``input``
    as stored (a text, a pair, or an image's reference)."""

    example_id: str
    position: int
    input: Any
    label: int | str | None
    prediction: str | None
    prediction_index: int | None

    @property
    def correct(self) -> bool | None:
        """Whether the prediction is the gold label (by name or by index); None when either is missing."""
        if self.label is None or self.prediction is None:
            return None
        if isinstance(self.label, int) and not isinstance(self.label, bool):
            return self.label == self.prediction_index
        return str(self.label) == self.prediction or str(self.label) == str(self.prediction_index)


class ReadOnlyStore(Store):
    """A results database opened read-only (see the module docstring). Raises StoreError when the
    file is missing, is not a results database, or has another schema version."""

    def __init__(self, path: str | Path) -> None:  # noqa: D107 - does not call Store.__init__, which writes
        self.path = Path(path).expanduser()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.process_start = None  # this store never takes a run's writer lock
        self.fingerprints: dict[str, tuple[float, int]] = {}
        if not self.path.is_file():
            raise StoreError(f"no results database at {self.path}")
        try:
            self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0,
                                        check_same_thread=False, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            found = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as error:
            raise StoreError(f"cannot read {self.path} as a results database: {error}") from error
        if found is None or found[0] != str(SCHEMA_VERSION):
            version = None if found is None else found[0]
            self.conn.close()
            raise StoreError(f"{self.path} has results schema version {version}; the viewer reads version "
                             f"{SCHEMA_VERSION} (open it once with `salience runs list --db {self.path}` to upgrade it)")

    def metric_rows(self, run_id: str) -> list[dict[str, Any]]:
        """Every metric row of the run without its details (for summaries): method, metric, value,
        higher_is_better, error; in the order of :meth:`Store.results` (example position, method,
        metric), so that the seeded bootstrap resamples the same sequence as ``salience runs show``."""
        rows = self.conn.execute("""
            SELECT r.method, r.metric, r.value, r.higher_is_better, r.error
            FROM results r JOIN examples e ON e.run_id = r.run_id AND e.example_id = r.example_id
            WHERE r.run_id = ? ORDER BY e.position, r.method, r.metric""", (run_id,)).fetchall()
        return [{**dict(r), "higher_is_better": None if r["higher_is_better"] is None else bool(r["higher_is_better"])}
                for r in rows]

    def curve_rows(self, run_id: str, metrics: Sequence[str]) -> list[dict[str, Any]]:
        """The rows of ``metrics`` with their details parsed (deletion / insertion curves)."""
        if not metrics:
            return []
        marks = ", ".join("?" for _ in metrics)
        rows = self.conn.execute(f"SELECT method, metric, value, details FROM results WHERE run_id = ? AND metric IN ({marks})",
                                 (run_id, *metrics)).fetchall()
        return [{**dict(r), "details": json.loads(r["details"]) if r["details"] else {}} for r in rows]

    def curve_metric_names(self, run_id: str) -> list[str]:
        """Metrics of the run whose details hold a curve (``x`` and ``y``), judged on one row each."""
        names = []
        for (metric,) in self.conn.execute("SELECT DISTINCT metric FROM results WHERE run_id = ?", (run_id,)).fetchall():
            row = self.conn.execute("SELECT details FROM results WHERE run_id = ? AND metric = ? AND value IS NOT NULL "
                                    "LIMIT 1", (run_id, metric)).fetchone()
            details = json.loads(row["details"]) if row is not None and row["details"] else {}
            if isinstance(details, dict) and "x" in details and "y" in details:
                names.append(str(metric))
        return names

    def example_index(self, run_id: str) -> list[ExampleEntry]:
        """Every example of the run in dataset order, with its prediction read from its first
        stored explanation (by method name; a generation has no class prediction: its continuation
        is shown as one): by SQLite's JSON functions, or in Python for a document SQLite's JSON
        parser refuses (NaN scores, e.g. a causal LM's later tokens)."""
        rows = self.conn.execute("""
            SELECT e.example_id, e.position, e.input, e.label,
                   CASE WHEN json_valid(x.explanation) THEN coalesce(json_extract(x.explanation, '$.prediction.label'),
                                                                     json_extract(x.explanation, '$.extras.continuation'))
                   END AS prediction,
                   CASE WHEN json_valid(x.explanation) THEN json_extract(x.explanation, '$.prediction.index') END
                       AS prediction_index,
                   CASE WHEN NOT json_valid(x.explanation) THEN x.explanation END AS raw
            FROM examples e LEFT JOIN explanations x ON x.rowid = (
                SELECT y.rowid FROM explanations y WHERE y.run_id = e.run_id AND y.example_id = e.example_id
                AND y.explanation IS NOT NULL ORDER BY y.method LIMIT 1)
            WHERE e.run_id = ? ORDER BY e.position""", (run_id,)).fetchall()
        entries = []
        for r in rows:
            label, index = r["prediction"], r["prediction_index"]
            if r["raw"] is not None:
                document = json.loads(r["raw"])
                prediction = document.get("prediction") or {}
                label, index = prediction.get("label"), prediction.get("index")
                if label is None:
                    label = (document.get("extras") or {}).get("continuation")
            entries.append(ExampleEntry(r["example_id"], int(r["position"]), json.loads(r["input"]),
                                        json.loads(r["label"]) if r["label"] else None,
                                        None if label is None else str(label), None if index is None else int(index)))
        return entries

    def metric_values(self, run_id: str, method: str, metric: str) -> dict[str, float | None]:
        """example id -> the value of ``metric`` for ``method`` (None where it could not be computed)."""
        rows = self.conn.execute("SELECT example_id, value FROM results WHERE run_id = ? AND method = ? AND metric = ?",
                                 (run_id, method, metric)).fetchall()
        return {r["example_id"]: r["value"] for r in rows}

    def units(self, run_id: str, example_ids: Sequence[str]) -> dict[tuple[str, str], dict[str, Any]]:
        """(example id, method) -> the stored unit (explanation JSON text or error, cost) of those examples only."""
        if not example_ids:
            return {}
        marks = ", ".join("?" for _ in example_ids)
        rows = self.conn.execute(f"SELECT example_id, method, explanation, error, seconds, forward_passes, backward_passes "
                                 f"FROM explanations WHERE run_id = ? AND example_id IN ({marks})",
                                 (run_id, *example_ids)).fetchall()
        return {(r["example_id"], r["method"]): dict(r) for r in rows}

    def example_results(self, run_id: str, example_ids: Sequence[str]) -> dict[tuple[str, str, str], dict[str, Any]]:
        """(example id, method, metric) -> value and error, for those examples only."""
        if not example_ids:
            return {}
        marks = ", ".join("?" for _ in example_ids)
        rows = self.conn.execute(f"SELECT example_id, method, metric, value, error FROM results "
                                 f"WHERE run_id = ? AND example_id IN ({marks})", (run_id, *example_ids)).fetchall()
        return {(r["example_id"], r["method"], r["metric"]): dict(r) for r in rows}

    def fingerprint(self, run_id: str) -> tuple[float, int]:
        """(last update time, stored units): changes whenever the run gains a unit (cache key).
        Counted once per run and store: a store lives for one request, whose caches share it."""
        if run_id not in self.fingerprints:
            self.fingerprints[run_id] = self._count(run_id)
        return self.fingerprints[run_id]

    def _count(self, run_id: str) -> tuple[float, int]:
        row = self.conn.execute("SELECT updated, (SELECT COUNT(*) FROM explanations WHERE run_id = ?) AS n FROM runs "
                                "WHERE run_id = ?", (run_id, run_id)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r} in {self.path}")
        return float(row["updated"]), int(row["n"])
