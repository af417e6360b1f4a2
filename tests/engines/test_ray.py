"""The Ray engine on a local Ray (2 CPUs, one instance for the module): the same rows as the local
engine with a worker killed while it holds a batch, a deterministic failure stored as error rows,
Parquet results imported, and, marked slow (each costs more Ray start-ups than the file's budget of
about a minute on 2 cores allows), the driver killed mid-run then run again and a parameter error
stopping the run as it does locally. After each scenario the database is checked: exact row
count, no duplicate (the snapshot asserts it), every value equal to the local engine's.

Equality is exact (==, floats included): the actors run the same code (compute_unit) on the same
float32 model loaded from the same files, one thread each (Ray sets OMP_NUM_THREADS=1 for a 1-CPU
actor, as the test command does here), with the same batch sizes and seed, so every sum is taken in
the same order; only the wall-clock seconds differ, and the snapshot leaves them out."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from enginekit import FAILING, METRICS, TOTAL, cli_args, local_reference, poisoned_toy, snapshot, stored_units, study_config  # noqa: E402

from salience.cli import main  # noqa: E402
from salience.engines.ray_engine import TRACE_ENV, UNIT_DELAY_ENV, RayEngine  # noqa: E402
from salience.errors import ParameterError  # noqa: E402
from salience.evaluate.config import parse_method_spec  # noqa: E402
from salience.evaluate.runner import run_evaluation  # noqa: E402
from salience.evaluate.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def study(toy_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    config = study_config(poisoned_toy(toy_dir, folder / "model"), folder)
    return config, local_reference(config, folder / "reference.db")


def _ray_run(config, db, engine):
    with Store(db) as store:
        return run_evaluation(config, store, progress=False, log=lambda _: None, engine=engine)


def test_same_rows_as_local_with_a_worker_killed_while_holding_a_batch(cluster, study, tmp_path, monkeypatch):
    config, reference = study
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(trace))  # forwarded to the actors: each marks the batch it holds
    monkeypatch.setenv(UNIT_DELAY_ENV, "0.25")  # slow enough to be caught with a batch in hand
    killed: list[tuple[int, str]] = []
    finished = threading.Event()

    def kill_one_holder() -> None:  # watches until the run ends (actors start late on a busy machine)
        while not finished.is_set():
            for marker in trace.glob("*.batch"):
                try:
                    held = marker.read_text()
                except FileNotFoundError:  # finished meanwhile
                    continue
                if not held:
                    continue
                pid = int(marker.stem)
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, held))
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_holder)
    killer.start()
    try:
        outcome = _ray_run(config, tmp_path / "r.db", RayEngine(workers=2, examples_per_batch=2, max_restarts=2,
                                                                 max_task_retries=2))
    finally:
        finished.set()
        killer.join()
    assert len(killed) == 1, "no actor was caught holding a batch"
    pid, held = killed[0]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (trace / f"{pid}.batch").exists()  # it died inside the batch (the marker is removed at the batch's end)
    assert (outcome.computed, outcome.reused) == (TOTAL, 0)
    stored = snapshot(tmp_path / "r.db")
    assert stored == reference and stored["status"] == "complete"  # the killed batch was computed again; stored once
    assert len(stored["units"]) == TOTAL and len(stored["results"]) == TOTAL * len(METRICS)
    errors = {k[:2] for k, v in stored["results"].items() if v[-1] is not None}  # the failing example only
    assert errors == {(FAILING, "occlusion"), (FAILING, "saliency")}
    assert stored["units"][(FAILING, "occlusion")][1].startswith("ModelOutputError: the model returned NaN")


@pytest.mark.slow  # a second driver process and two actor pools: about 25-35 s on 2 shared cores
def test_driver_killed_mid_run_then_run_again(cluster, study, tmp_path, capsys):
    config, reference = study
    db = tmp_path / "r.db"
    argv = [*cli_args(config), "--db", str(db), "--engine", "ray", "--workers", "1"]
    env = {**os.environ, "SALIENCE_EVAL_UNIT_DELAY": "0.25", "OMP_NUM_THREADS": "1"}  # the driver stores slowly
    process = subprocess.Popen([sys.executable, "-m", "salience.cli", *argv, "--address", cluster], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while stored_units(db) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    stored = stored_units(db)
    assert 2 <= stored < TOTAL, "the driver was not killed midway"
    partial = snapshot(db)
    assert len(partial["results"]) == stored * len(METRICS)  # whole units only
    assert all(reference["units"][k] == v for k, v in partial["units"].items())

    assert main(argv) == 0  # this process: joins the module's Ray
    err = capsys.readouterr().err
    assert "resumed run" in err and f"{TOTAL - stored} units computed, {stored} already stored" in err
    assert snapshot(db) == reference


def test_parquet_results_then_import(cluster, study, tmp_path, capsys):
    config, reference = study
    root = tmp_path / "parts"
    argv = [*cli_args(config), "--engine", "ray", "--workers", "1", "--results", f"parquet://{root}"]
    assert main(argv) == 0
    assert f"{TOTAL} units computed, 0 already written" in capsys.readouterr().err
    db = tmp_path / "merged.db"
    for added, already in ((TOTAL, 0), (0, TOTAL)):  # importing twice adds nothing
        assert main(["runs", "import", str(root), "--db", str(db)]) == 0
        assert f"{added} units added, {already} already stored (complete)" in capsys.readouterr().out
        assert snapshot(db) == reference


@pytest.mark.slow  # another actor pool (about 10 s on 2 shared cores) for a rarer path
def test_parameter_error_stops_the_run_as_locally(cluster, study, tmp_path):
    config, _ = study
    bad = dataclasses.replace(config, methods=(parse_method_spec("occlusion:level=span"),))
    with Store(tmp_path / "local.db") as store, pytest.raises(ParameterError) as local:
        run_evaluation(bad, store, progress=False, log=lambda _: None)
    with pytest.raises(ParameterError) as remote:
        _ray_run(bad, tmp_path / "r.db", RayEngine(workers=1))
    assert str(remote.value) == str(local.value) and "needs spans" in str(local.value)
    with Store(tmp_path / "r.db") as store:
        assert store.runs()[0].status == "failed" and store.runs()[0].units == 0
