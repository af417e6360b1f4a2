"""Results database: SQLite in WAL mode, one transaction per (example, method) unit.

Tables (schema version ``SCHEMA_VERSION``, kept in ``meta``):

* ``runs``: one row per run: id (hash of its configuration), name, status, model, dataset, the
  full configuration and the versions (JSON), created/updated times.
* ``examples``: the run's examples: input (a text, a pair, or an image's reference: its path or
  ``builtin-name:index``, never its pixels), gold label, rationale and box (JSON), position in the
  dataset.
* ``explanations``: one row per (run, example, method): the Explanation's versioned JSON, or the
  error that prevented it, with its cost.
* ``results``: one row per (run, example, method, metric): the value (NULL when the metric could not
  be computed, then ``error`` says why), direction, details (JSON, e.g. curves) and forward passes.
* ``writers``: the process writing a run (pid, host, process start time, heartbeat).

A unit's explanation and all its metric rows are written in one transaction, so an interrupted
run leaves whole units only; primary keys make a duplicate row impossible. Only one process may
write a run: a second one is refused while the first is alive; a lock left by a killed process is
taken over.

Version 2 added ``examples.box``; a version 1 database is migrated when opened (the column is
added, NULL for its examples).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salience.errors import SalienceError

SCHEMA_VERSION = 2
STALE_AFTER = 3600.0  # seconds without a heartbeat after which another host's lock counts as stale
BUSY_TIMEOUT = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    config TEXT NOT NULL,
    versions TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS examples (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    example_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    input TEXT NOT NULL,
    label TEXT,
    rationale TEXT,
    box TEXT,
    PRIMARY KEY (run_id, example_id)
);
CREATE TABLE IF NOT EXISTS explanations (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    example_id TEXT NOT NULL,
    method TEXT NOT NULL,
    explanation TEXT,
    error TEXT,
    seconds REAL,
    forward_passes INTEGER,
    backward_passes INTEGER,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, example_id, method),
    FOREIGN KEY (run_id, example_id) REFERENCES examples(run_id, example_id)
);
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL,
    example_id TEXT NOT NULL,
    method TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    higher_is_better INTEGER,
    details TEXT,
    forward_passes INTEGER,
    error TEXT,
    PRIMARY KEY (run_id, example_id, method, metric),
    FOREIGN KEY (run_id, example_id, method) REFERENCES explanations(run_id, example_id, method)
);
CREATE TABLE IF NOT EXISTS writers (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    process_start TEXT,
    acquired REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""


class StoreError(SalienceError):
    """The results database cannot be used (another schema version, unknown run, ...)."""


class RunLockedError(StoreError):
    """Another live process is writing the same run."""


@dataclass(frozen=True)
class MetricRow:
    """One metric outcome of a unit: a value, or an error (value None)."""

    metric: str
    value: float | None
    higher_is_better: bool | None
    details: dict[str, Any]
    forward_passes: int
    error: str | None = None


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str | None
    status: str
    model: str
    dataset: str
    config: dict[str, Any]
    versions: dict[str, Any]
    created: float
    updated: float
    examples: int
    units: int
    writer: str | None  # "pid 123 on host" while a live process writes it


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a reused pid from the original process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, process_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False  # a zombie: killed, not yet reaped
    except OSError:
        pass
    return process_start is None or _process_start(pid) in (None, process_start)


class Store:
    """An open results database (created with its schema when missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.process_start = _process_start(self.pid)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                self._create()
        except (sqlite3.DatabaseError, OSError) as error:
            raise StoreError(f"cannot use {self.path} as a results database: {error}") from error

    def _create(self) -> None:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self.conn.execute(statement)
        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        found = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if found == "1":  # version 1: no examples.box
            self.conn.execute("ALTER TABLE examples ADD COLUMN box TEXT")
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            found = str(SCHEMA_VERSION)
        if found != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has results schema version {found}; this Salience reads version {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception (Ctrl-C included) rolls back."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:  # not when the interruption came after COMMIT
                self.conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ runs
    def ensure_run(self, run_id: str, *, name: str | None, model: str, dataset: str, config: dict[str, Any],
                   versions: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Create the run if new. Returns (created, the versions stored with it)."""
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute("SELECT versions FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None:
                return False, json.loads(row["versions"])
            conn.execute("INSERT INTO runs VALUES (?, ?, 'new', ?, ?, ?, ?, ?, ?)",
                         (run_id, name, model, dataset, json.dumps(config, default=str), json.dumps(versions), now, now))
        return True, versions

    def set_status(self, run_id: str, status: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET status = ?, updated = ? WHERE run_id = ?", (status, time.time(), run_id))

    def find_run(self, prefix: str) -> str:
        """The run id starting with ``prefix`` (unique), or a StoreError."""
        query = "SELECT run_id FROM runs WHERE run_id LIKE ? || '%' ORDER BY run_id"
        rows = self.conn.execute(query, (prefix.strip(),)).fetchall()
        if not prefix.strip() or not rows:
            raise StoreError(f"no run {prefix!r} in {self.path}; see `salience runs list --db {self.path}`")
        if len(rows) > 1:
            raise StoreError(f"run prefix {prefix!r} is ambiguous: {', '.join(r['run_id'] for r in rows[:5])}")
        return str(rows[0]["run_id"])

    def runs(self) -> list[RunInfo]:
        """Every run, newest first, with counts and the live writer if any."""
        rows = self.conn.execute("""
            SELECT r.*, (SELECT COUNT(*) FROM examples e WHERE e.run_id = r.run_id) AS n_examples,
                        (SELECT COUNT(*) FROM explanations x WHERE x.run_id = r.run_id) AS n_units
            FROM runs r ORDER BY r.created DESC""").fetchall()
        return [self._info(row) for row in rows]

    def run(self, run_id: str) -> RunInfo:
        for info in self.runs():
            if info.run_id == run_id:
                return info
        raise StoreError(f"no run {run_id!r} in {self.path}")

    def _info(self, row: sqlite3.Row) -> RunInfo:
        writer = self.conn.execute("SELECT * FROM writers WHERE run_id = ?", (row["run_id"],)).fetchone()
        live = None
        if writer is not None and self._holder_alive(writer):
            live = f"pid {writer['pid']} on {writer['host']}"
        status = row["status"]
        if status == "running" and live is None:
            status = "interrupted"  # its writer died without saying so (killed)
        return RunInfo(row["run_id"], row["name"], status, row["model"], row["dataset"], json.loads(row["config"]),
                       json.loads(row["versions"]), row["created"], row["updated"], row["n_examples"], row["n_units"], live)

    # ------------------------------------------------------------------ the writer lock
    def _holder_alive(self, writer: sqlite3.Row) -> bool:
        if writer["host"] == socket.gethostname():
            return _pid_alive(int(writer["pid"]), writer["process_start"])
        return time.time() - float(writer["heartbeat"]) < STALE_AFTER

    def acquire(self, run_id: str) -> str | None:
        """Become the run's only writer. Raises RunLockedError while another live process holds
        it; takes over a lock whose process is gone and returns a note saying so (else None)."""
        now = time.time()
        note = None
        with self.transaction() as conn:
            writer = conn.execute("SELECT * FROM writers WHERE run_id = ?", (run_id,)).fetchone()
            if writer is not None:
                mine = writer["pid"] == self.pid and writer["host"] == self.host
                if not mine and self._holder_alive(writer):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(writer["acquired"]))
                    raise RunLockedError(
                        f"run {run_id} is being written by another process (pid {writer['pid']} on {writer['host']}, "
                        f"since {since}); wait for it to finish or stop it, then run the command again")
                if not mine:
                    note = f"took over run {run_id} from process {writer['pid']}, which is no longer running"
                conn.execute("DELETE FROM writers WHERE run_id = ?", (run_id,))
            conn.execute("INSERT INTO writers VALUES (?, ?, ?, ?, ?, ?)",
                         (run_id, self.pid, self.host, self.process_start, now, now))
            conn.execute("UPDATE runs SET status = 'running', updated = ? WHERE run_id = ?", (now, run_id))
        return note

    def release(self, run_id: str, status: str) -> None:
        """Give the lock up and record the run's status ("complete", "partial", "interrupted")."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM writers WHERE run_id = ? AND pid = ? AND host = ?", (run_id, self.pid, self.host))
            conn.execute("UPDATE runs SET status = ?, updated = ? WHERE run_id = ?", (status, time.time(), run_id))

    def _check_writer(self, conn: sqlite3.Connection, run_id: str) -> None:
        writer = conn.execute("SELECT pid, host FROM writers WHERE run_id = ?", (run_id,)).fetchone()
        if writer is None or writer["pid"] != self.pid or writer["host"] != self.host:
            raise RunLockedError(f"this process no longer holds the write lock of run {run_id}; stopped without writing")

    # ------------------------------------------------------------------ writing
    def add_examples(self, run_id: str, examples: Iterable[tuple[Any, ...]]) -> None:
        """(example_id, position, input, label, rationale[, box]) rows (``input`` JSON-ready: an
        image's reference, not its pixels); already stored ones are left alone."""
        rows = []
        for eid, pos, inp, label, rat, *rest in examples:
            box = rest[0] if rest else None
            rows.append((run_id, eid, pos, json.dumps(inp), json.dumps(label), None if rat is None else json.dumps(list(rat)),
                         None if box is None else json.dumps(list(box))))
        with self.transaction() as conn:
            self._check_writer(conn, run_id)
            conn.executemany("INSERT OR IGNORE INTO examples (run_id, example_id, position, input, label, rationale, box) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def save_unit(self, run_id: str, example_id: str, method: str, *, explanation: dict[str, Any] | None,
                  error: str | None, seconds: float, forward_passes: int, backward_passes: int,
                  metrics: Sequence[MetricRow]) -> None:
        """Write one (example, method) unit, its explanation and every metric row, atomically."""
        now = time.time()
        with self.transaction() as conn:
            self._check_writer(conn, run_id)
            conn.execute("INSERT INTO explanations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (run_id, example_id, method, None if explanation is None else json.dumps(explanation), error,
                          seconds, forward_passes, backward_passes, now))
            conn.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (run_id, example_id, method, m.metric, m.value, None if m.higher_is_better is None else int(m.higher_is_better),
                 json.dumps(m.details, default=str), m.forward_passes, m.error) for m in metrics])
            conn.execute("UPDATE writers SET heartbeat = ? WHERE run_id = ?", (now, run_id))
            conn.execute("UPDATE runs SET updated = ? WHERE run_id = ?", (now, run_id))

    # ------------------------------------------------------------------ reading
    def done_units(self, run_id: str) -> set[tuple[str, str]]:
        rows = self.conn.execute("SELECT example_id, method FROM explanations WHERE run_id = ?", (run_id,)).fetchall()
        return {(r["example_id"], r["method"]) for r in rows}

    def results(self, run_id: str, example_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Metric rows (dicts, details parsed), in example position order."""
        rows = self.conn.execute("""
            SELECT r.run_id, r.example_id, e.position, r.method, r.metric, r.value, r.higher_is_better, r.error,
                   r.forward_passes, r.details
            FROM results r JOIN examples e ON e.run_id = r.run_id AND e.example_id = r.example_id
            WHERE r.run_id = ? ORDER BY e.position, r.method, r.metric""", (run_id,)).fetchall()
        wanted = None if example_ids is None else set(example_ids)
        out = []
        for row in rows:
            if wanted is not None and row["example_id"] not in wanted:
                continue
            item = dict(row)
            item["details"] = json.loads(item["details"]) if item["details"] else {}
            item["higher_is_better"] = None if item["higher_is_better"] is None else bool(item["higher_is_better"])
            out.append(item)
        return out

    def explanations(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("""
            SELECT x.run_id, x.example_id, e.position, x.method, x.error, x.seconds, x.forward_passes, x.backward_passes,
                   x.explanation
            FROM explanations x JOIN examples e ON e.run_id = x.run_id AND e.example_id = x.example_id
            WHERE x.run_id = ? ORDER BY e.position, x.method""", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    def examples(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM examples WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        return [{**dict(r), "input": json.loads(r["input"]), "label": json.loads(r["label"]) if r["label"] else None,
                 "rationale": json.loads(r["rationale"]) if r["rationale"] else None,
                 "box": json.loads(r["box"]) if r["box"] else None} for r in rows]
