"""Helpers shared by the engine tests: a toy study with one example that fails deterministically,
its local-engine reference, and what two runs must agree on.

A plain module, not a conftest.py (see tests/evaluate/evalkit.py)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))

from evalkit import toy_records, write_jsonl  # noqa: E402

from salience.evaluate.config import RunConfig, parse_method_spec, parse_metric_spec  # noqa: E402
from salience.evaluate.runner import run_evaluation  # noqa: E402
from salience.evaluate.store import Store  # noqa: E402

METHODS = ("occlusion", "saliency")
METRICS = ("comprehensiveness", "token_f1")
N_EXAMPLES = 6  # 5 toy sentences + the failing one
TOTAL = N_EXAMPLES * len(METHODS)
FAILING = "odd"  # its text holds a word out of the toy's vocabulary: [UNK], whose embedding is NaN


def poisoned_toy(toy_dir: Path, dest: Path) -> Path:
    """A copy of the toy classifier whose [UNK] embedding row is NaN: an input with an unknown word
    makes every forward pass non-finite, so its explanations fail with a ModelOutputError (a
    deterministic per-example failure); the other inputs are untouched (the toy's sentences, and
    occlusion's [MASK], never use [UNK])."""
    shutil.copytree(toy_dir, dest)
    weights = load_file(dest / "model.safetensors")
    weights["bert.embeddings.word_embeddings.weight"][1] = torch.nan  # id 1 = [UNK] (tests/toy.py SPECIAL)
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def study_config(model_dir: Path, folder: Path) -> RunConfig:
    records = toy_records(N_EXAMPLES - 1)
    records.append({"id": FAILING, "text": "the film was zyzzyva good", "label": "positive", "rationale": [4]})
    data = write_jsonl(folder / "data.jsonl", records)
    return RunConfig(model=str(model_dir), dataset=str(data), methods=tuple(map(parse_method_spec, METHODS)),
                     metrics=tuple(map(parse_metric_spec, METRICS)))


def cli_args(config: RunConfig) -> list[str]:
    """``salience evaluate`` arguments for ``config`` (without --db)."""
    argv = ["evaluate", "--model", config.model, "--dataset", config.dataset, "--no-progress"]
    for spec in config.methods:
        argv += ["--method", spec.name]
    for spec in config.metrics:
        argv += ["--metric", spec.name]
    return argv


def local_reference(config: RunConfig, db: Path) -> dict[str, Any]:
    """The local engine's run of ``config`` (its snapshot), on one torch thread as Ray's 1-CPU actors
    run (Ray sets their OMP_NUM_THREADS to 1), so that sums are taken in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Store(db) as store:
            outcome = run_evaluation(config, store, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    return snapshot(db, outcome.run_id)


def _without_seconds(explanation: str | None) -> Any:
    if explanation is None:
        return None
    data = json.loads(explanation)
    data["cost"].pop("seconds")  # wall-clock time: the only field that differs between two runs
    return data


def snapshot(db: Path, run_id: str | None = None) -> dict[str, Any]:
    """Everything a run stored but the timings: examples, units (explanation JSON, error, passes) and
    metric rows (value, direction, details, passes, error), keyed; asserts there is no duplicate."""
    with sqlite3.connect(db) as conn:
        run_ids = [r[0] for r in conn.execute("SELECT run_id FROM runs")]
        assert run_id is None or run_id in run_ids
        assert len(run_ids) == 1, run_ids
        examples = conn.execute("SELECT example_id, position, input, label, rationale, box FROM examples").fetchall()
        units = conn.execute("SELECT example_id, method, explanation, error, forward_passes, backward_passes "
                             "FROM explanations").fetchall()
        results = conn.execute("SELECT example_id, method, metric, value, higher_is_better, details, forward_passes, error "
                               "FROM results").fetchall()
        status = conn.execute("SELECT status FROM runs").fetchone()[0]
    keyed_units = {(e, m): (_without_seconds(x), err, f, b) for e, m, x, err, f, b in units}
    keyed_results = {(e, m, k): rest for e, m, k, *rest in results}
    assert len(keyed_units) == len(units) and len(keyed_results) == len(results)  # primary keys: no duplicate
    return {"run_id": run_ids[0], "status": status, "examples": sorted(examples), "units": keyed_units,
            "results": keyed_results}


def stored_units(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0
