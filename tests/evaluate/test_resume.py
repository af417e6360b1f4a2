"""Resuming: a `salience evaluate` process interrupted midway (Ctrl-C or SIGKILL) and started
again ends with exactly the rows of an uninterrupted run: nothing lost, nothing duplicated,
nothing stored recomputed. While the first process runs, a second writer is refused."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from evalkit import toy_records, write_jsonl

from salience.cli import main

N_EXAMPLES, METHODS = 6, ("occlusion", "lime:n_samples=64", "saliency")
TOTAL = N_EXAMPLES * len(METHODS)


def _argv(model_dir, data, db):
    argv = ["evaluate", "--model", str(model_dir), "--dataset", str(data), "--db", str(db), "--no-progress",
            "--metric", "comprehensiveness", "--metric", "token_f1", "--metric", "deletion_auc"]
    for method in METHODS:
        argv += ["--method", method]
    return argv


def _stored_units(db) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def _rows(db) -> dict[tuple[str, str, str], float | None]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT example_id, method, metric, value FROM results").fetchall()
    keyed = {(e, m, k): v for e, m, k, v in rows}
    assert len(keyed) == len(rows)  # no duplicates
    return keyed


@pytest.fixture(scope="module")
def setup(toy_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    data = write_jsonl(folder / "data.jsonl", toy_records(N_EXAMPLES))
    reference_db = folder / "reference.db"
    assert main(_argv(toy_dir, data, reference_db)) == 0
    reference = _rows(reference_db)
    assert len(reference) == TOTAL * 3 and all(v is not None for v in reference.values())
    return toy_dir, data, reference


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_run_resumes_to_the_same_rows(setup, tmp_path, capsys, how):
    toy_dir, data, reference = setup
    db = tmp_path / "r.db"
    argv = _argv(toy_dir, data, db)
    env = {**os.environ, "SALIENCE_EVAL_UNIT_DELAY": "0.3", "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a test run started in the background of a script
    # (`cmd &`) ignores SIGINT, children inherit that, and Python then installs no ctrl-c handler
    process = subprocess.Popen([sys.executable, "-m", "salience.cli", *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while _stored_units(db) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        # stopped, the first writer stays alive and mid-run however long the checks below take (on a
        # busy machine the run could otherwise finish before the signal arrives)
        process.send_signal(signal.SIGSTOP)
        assert main(argv) == 2  # a second writer on the same run, while the first is alive
        refused = capsys.readouterr().err
        assert refused.startswith("error: run ") and f"being written by another process (pid {process.pid}" in refused
        process.send_signal(how)  # delivered when the process continues (SIGKILL: at once)
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if how == signal.SIGINT:
        assert process.returncode == 130 and "run the same command again to continue" in err
    else:
        assert process.returncode == -signal.SIGKILL
    stored = _stored_units(db)
    assert 2 <= stored < TOTAL, "the run was not interrupted midway"
    partial = _rows(db)
    assert len(partial) == stored * 3  # whole units only

    assert main(argv) == 0
    resumed = capsys.readouterr()
    assert "resumed run" in resumed.err and f"{TOTAL - stored} units computed, {stored} already stored" in resumed.err
    final = _rows(db)
    assert final.keys() == reference.keys()
    assert all(final[k] == partial[k] for k in partial)  # stored rows were not recomputed
    assert np.allclose([final[k] for k in reference], [reference[k] for k in reference], rtol=1e-6, atol=1e-9)
    assert main(argv) == 0 and "0 units computed" in capsys.readouterr().err
