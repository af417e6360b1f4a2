"""The results database: WAL, schema version, atomic units, no duplicates, the writer lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from salience.evaluate.store import SCHEMA_VERSION, MetricRow, RunLockedError, Store, StoreError


def _store_with_run(path, run_id="r1"):
    store = Store(path)
    store.ensure_run(run_id, name=None, model="m", dataset="d", config={"a": 1}, versions={"torch": "x"})
    assert store.acquire(run_id) is None
    store.add_examples(run_id, [("e1", 0, "good film", 1, [0, 1]), ("e2", 1, ["a", "b"], None, None)])
    return store


def _save(store, example="e1", method="occlusion", metrics=None):
    rows = metrics or [MetricRow("comprehensiveness", 0.5, True, {"k": 1}, 2),
                       MetricRow("token_f1", None, True, {}, 0, "example e1: no rationale")]
    store.save_unit("r1", example, method, explanation={"schema": "x"}, error=None, seconds=0.1, forward_passes=3,
                    backward_passes=0, metrics=rows)


def test_wal_schema_and_round_trip(tmp_path):
    store = _store_with_run(tmp_path / "sub" / "r.db")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    _save(store)
    assert store.done_units("r1") == {("e1", "occlusion")}
    rows = store.results("r1")
    assert [(r["metric"], r["value"], r["error"]) for r in rows] == [
        ("comprehensiveness", 0.5, None), ("token_f1", None, "example e1: no rationale")]
    assert rows[0]["details"] == {"k": 1} and rows[0]["higher_is_better"] is True
    assert store.examples("r1")[1]["input"] == ["a", "b"]
    created, versions = store.ensure_run("r1", name=None, model="m", dataset="d", config={}, versions={"torch": "y"})
    assert not created and versions == {"torch": "x"}  # the stored versions, for a mismatch note


def test_a_unit_is_all_or_nothing_and_never_duplicated(tmp_path):
    store = _store_with_run(tmp_path / "r.db")
    bad = [MetricRow("comprehensiveness", 0.5, True, {}, 1), MetricRow("comprehensiveness", 0.6, True, {}, 1)]
    with pytest.raises(sqlite3.IntegrityError):
        _save(store, metrics=bad)  # the second metric row collides: the whole unit is rolled back
    assert store.done_units("r1") == set() and store.results("r1") == []
    _save(store)
    with pytest.raises(sqlite3.IntegrityError):
        _save(store)
    assert len(store.results("r1")) == 2
    with pytest.raises(KeyboardInterrupt), store.transaction() as conn:
        conn.execute("DELETE FROM results")
        raise KeyboardInterrupt  # Ctrl-C inside a transaction rolls it back
    assert len(store.results("r1")) == 2


def test_other_schema_version_is_refused(tmp_path):
    Store(tmp_path / "r.db").close()
    conn = sqlite3.connect(tmp_path / "r.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "r.db")
    (tmp_path / "junk.db").write_text("not a database at all, just text " * 100)
    with pytest.raises(StoreError, match="cannot use"):
        Store(tmp_path / "junk.db")


def _pretend_writer(store, pid):
    """Hand the run's lock to process ``pid`` on this host (as that process would have taken it)."""
    from salience.evaluate.store import _process_start

    with store.transaction() as conn:
        conn.execute("UPDATE writers SET pid = ?, process_start = ? WHERE run_id = 'r1'", (pid, _process_start(pid)))


def test_second_live_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    store = _store_with_run(tmp_path / "r.db")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _pretend_writer(store, other.pid)
        with pytest.raises(RunLockedError, match=rf"being written by another process \(pid {other.pid} on .*wait for it"):
            store.acquire("r1")
        with pytest.raises(RunLockedError, match="no longer holds the write lock"):
            _save(store)  # this process lost the lock: it must not write
        assert store.run("r1").writer == f"pid {other.pid} on {store.host}"
    finally:
        other.kill()
        other.wait()
    assert store.run("r1").status == "interrupted"  # "running", but its writer is gone
    note = store.acquire("r1")
    assert note and f"from process {other.pid}, which is no longer running" in note
    _save(store)
    store.release("r1", "complete")
    assert store.run("r1").status == "complete" and store.run("r1").writer is None


def test_find_run_by_prefix(tmp_path):
    store = _store_with_run(tmp_path / "r.db", run_id="abc123")
    store.ensure_run("abd999", name=None, model="m", dataset="d", config={}, versions={})
    assert store.find_run("abc") == "abc123"
    with pytest.raises(StoreError, match="ambiguous"):
        store.find_run("ab")
    with pytest.raises(StoreError, match="no run 'zz'"):
        store.find_run("zz")
