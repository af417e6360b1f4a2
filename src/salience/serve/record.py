"""``salience serve --model M --record``: each live explanation is written to the results database,
in a run named ``live-YYYY-MM-DD`` (one run per model and day; its id is ``live-`` and 12 hex
digits of the SHA-256 of the model name and the date), one example per request and one unit per
method, with no metric rows. Without ``--record`` nothing here runs.

This is the only code of the viewer that opens the database read-write: a
:class:`~salience.evaluate.store.Store` opened for one request and closed after it, holding the
run's writer lock only while it writes (a second process recording the same model on the same
day waits for nothing: it is refused, and its page says the explanation was not recorded). The
pages keep their read-only connections. A typed text is stored as it is; an uploaded image is
stored by reference only (``upload:`` and 16 hex digits of the SHA-256 of its pixels), never its
pixels, so the example browser draws its explanation as a heatmap without the picture.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from salience.evaluate.store import Store


def run_identity(model: str, day: datetime.date) -> tuple[str, str]:
    """(run id, run name) of the live run of ``model`` on ``day``."""
    digest = hashlib.sha256(f"{model}\n{day.isoformat()}".encode()).hexdigest()[:12]
    return f"live-{digest}", f"live-{day.isoformat()}"


def stored_input(value: Any) -> Any:
    """What the examples table keeps of a live input: a text as it is, an image as a reference."""
    if isinstance(value, np.ndarray):
        return f"upload:{hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]}"
    return value


class Recorder:
    """Writes live explanations into ``database`` (created when missing)."""

    def __init__(self, database: str | Path, model: str, kind: str, methods: Sequence[str]) -> None:
        self.database = Path(database).expanduser()
        self.model, self.kind, self.methods = model, kind, list(methods)
        self.lock = threading.Lock()  # one writer per server (the live worker is one thread anyway)

    def record(self, value: Any, units: Sequence[tuple[str, Any, str | None, float]]) -> tuple[str, str]:
        """Store one request: ``units`` are (method, Explanation or None, error, seconds). Returns
        (the new example's id, the run's name)."""
        import salience
        from salience.evaluate.runner import environment_versions

        day = datetime.date.today()
        run_id, name = run_identity(self.model, day)
        config = {"model": self.model, "dataset": "live", "kind": self.kind, "seed": 0, "metrics": [],
                  "methods": [{"label": m, "name": m, "params": {}} for m in self.methods]}
        with self.lock, Store(self.database) as store:
            store.ensure_run(run_id, name=name, model=self.model, dataset="live", config=config,
                             versions={**environment_versions(), "salience": salience.__version__})
            store.acquire(run_id)
            try:
                position = int(store.conn.execute("SELECT COUNT(*) FROM examples WHERE run_id = ?", (run_id,)).fetchone()[0])
                example_id = f"live{position}"
                store.add_examples(run_id, [(example_id, position, stored_input(value), None, None)])
                for method, explanation, error, seconds in units:
                    cost = getattr(explanation, "cost", None)
                    store.save_unit(run_id, example_id, method,
                                    explanation=None if explanation is None else explanation.to_dict(),
                                    error=error, seconds=seconds, forward_passes=getattr(cost, "forward_passes", 0),
                                    backward_passes=getattr(cost, "backward_passes", 0), metrics=[])
            finally:
                store.release(run_id, "complete")
        return example_id, name
