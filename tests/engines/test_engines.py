"""Engine plumbing that needs no Ray: Parquet results written by the local engine, resumed, and
imported into a database (equal to a database run, idempotent); the one-line errors of the engine
flags and of a missing Ray."""

from __future__ import annotations

import sys

import pytest
import torch
from enginekit import FAILING, METRICS, TOTAL, cli_args, local_reference, poisoned_toy, snapshot, study_config

from salience.cli import main
from salience.engines.parquet_output import ParquetRun, run_to_parquet
from salience.engines.ray_engine import EngineError, RayEngine, import_ray
from salience.evaluate.runner import local_engine, run_evaluation
from salience.evaluate.store import Store


@pytest.fixture(autouse=True)
def _one_thread():
    """Local runs on one torch thread, as the reference (enginekit.local_reference): equal sums to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(toy_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    config = study_config(poisoned_toy(toy_dir, folder / "model"), folder)
    reference = local_reference(config, folder / "reference.db")
    assert reference["status"] == "complete" and len(reference["units"]) == TOTAL
    assert len(reference["results"]) == TOTAL * len(METRICS)
    failed = {k: v for k, v in reference["units"].items() if v[1] is not None}
    assert set(failed) == {(FAILING, m) for m in ("occlusion", "saliency")}
    assert all(v[1].startswith("ModelOutputError: the model returned NaN") for v in failed.values())
    return config, reference


def test_parquet_results_resume_and_import_to_the_same_rows(study, tmp_path, capsys):
    config, reference = study
    root = tmp_path / "parts"
    first = run_to_parquet(config, str(root), progress=False, log=lambda _: None, flush_units=4)
    assert (first.created, first.computed, first.reused) == (True, TOTAL, 0)
    run = ParquetRun(str(root), first.run_id)
    parts = run.part_paths()
    assert len(parts) == 3  # 12 units, a part every 4
    assert len(run.done_units()) == TOTAL
    (root / f"run_id={first.run_id}" / parts[1].rsplit("/", 1)[1]).unlink()  # as if that part had not been written
    again = run_to_parquet(config, str(root), progress=False, log=lambda _: None)
    assert (again.created, again.computed, again.reused) == (False, 4, TOTAL - 4)  # only the lost units

    db = tmp_path / "merged.db"
    assert main(["runs", "import", str(root), "--db", str(db)]) == 0
    assert f"run {first.run_id}: {TOTAL} units added, 0 already stored (complete)" in capsys.readouterr().out
    assert snapshot(db) == reference
    assert main(["runs", "import", f"parquet://{root}", "--db", str(db)]) == 0  # twice: nothing added
    assert f"0 units added, {TOTAL} already stored (complete)" in capsys.readouterr().out
    assert snapshot(db) == reference


def test_import_leaves_out_an_unreadable_part_and_reports_partial(study, tmp_path, capsys):
    config, _ = study
    root = tmp_path / "parts"
    outcome = run_to_parquet(config, str(root), progress=False, log=lambda _: None, flush_units=6)
    folder = root / f"run_id={outcome.run_id}"
    victim = sorted(folder.glob("part-*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # a truncated file
    db = tmp_path / "merged.db"
    assert main(["runs", "import", str(root), "--db", str(db)]) == 0
    captured = capsys.readouterr()
    assert f"left out {victim}, which is not a readable Parquet file" in captured.err
    assert "6 units added, 0 already stored, 1 unreadable part files left out (partial)" in captured.out
    assert snapshot(db)["status"] == "partial"


def test_cli_parquet_results_and_engine_flags(study, tmp_path, capsys):
    config, _ = study
    argv = [*cli_args(config), "--db", str(tmp_path / "unused.db")]
    assert main([*argv, "--results", f"parquet://{tmp_path / 'p'}"]) == 0
    assert f"{TOTAL} units computed, 0 already written" in capsys.readouterr().err
    assert not (tmp_path / "unused.db").exists()
    assert main([*argv, "--results", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --results {str(tmp_path / 'p')!r}: give parquet://PATH")
    assert main([*argv, "--workers", "2"]) == 2
    assert capsys.readouterr().err == "error: --workers goes with --engine ray\n"


def test_missing_ray_is_one_line_before_any_work(study, tmp_path, monkeypatch, capsys):
    config, _ = study
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    with pytest.raises(EngineError, match=r'needs Ray Data \(ray is not installed\): pip install "salience\[ray\]"'):
        import_ray()
    db = tmp_path / "r.db"
    assert main([*cli_args(config), "--db", str(db), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --engine ray needs Ray Data") and err.count("\n") == 1
    assert not db.exists()


@pytest.mark.parametrize("settings, message", [({"workers": 0}, "--workers must be at least 1, got 0"),
                                               ({"gpus_per_worker": -1}, "--gpus-per-worker must be >= 0"),
                                               ({"examples_per_batch": 0}, "examples per batch must be at least 1"),
                                               ({"max_restarts": -1}, "max_restarts and max_task_retries must be >= 0")])
def test_bad_engine_settings_are_one_line_errors(settings, message):
    with pytest.raises(EngineError, match=message):
        RayEngine(**settings)


def test_a_unit_delivered_twice_is_stored_once(study, tmp_path):
    config, reference = study

    def twice(*args):  # an engine that, after a fault, sent its batches again
        for unit in local_engine(*args):
            yield unit
            yield unit

    with Store(tmp_path / "r.db") as store:
        outcome = run_evaluation(config, store, progress=False, log=lambda _: None, engine=twice)
    assert outcome.computed == TOTAL
    assert snapshot(tmp_path / "r.db") == reference


def test_an_unreachable_cluster_is_one_line_before_any_work(study, tmp_path, capsys):
    pytest.importorskip("ray")
    config, _ = study
    db = tmp_path / "r.db"
    assert main([*cli_args(config), "--db", str(db), "--engine", "ray", "--address", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot reach a Ray cluster at 127.0.0.1:1: ")
    assert not db.exists()
