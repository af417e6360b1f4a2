"""Local engine vs the Ray engine (1 and 2 workers) on one small study, Ray's overhead per batch, and
the rows per second the single result writers sustain. Writes benchmarks/RESULTS-ray.md.

    flock /tmp/salience-cpu.lock env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ray_engine.py

The study: zoo:minilm-sentiment on the first --examples movie-snippets (test split), methods
saliency and occlusion, metrics comprehensiveness, sufficiency and token_f1, output probability.
Every engine computes every unit into a fresh database (nothing reused). For each run: the wall
time of ``run_evaluation`` (model and dataset loading in the driver included), the time to the
first stored unit (start-up: for Ray, actors started and the model loaded in each) and the steady
rate, (units - 1) / (last unit - first unit), in examples per second (a unit is one example x one
method). Ray runs on a local instance started once with ``num_cpus=2`` (its start is timed apart).

Ray's overhead per batch: an actor pool of one actor whose callable returns stored unit JSON
without computing anything, fed one example per batch: (last - first batch) / (batches - 1), the
cost of a round trip through Ray Data (scheduling, object store, the driver's stream) per batch.

The writers alone: every unit of the local run replayed N times under new example ids into (a) a
fresh SQLite store through ``UnitResult.save`` (one transaction per unit, as the runner writes) and
(b) the Parquet sink (a part file every 256 units); units per second and rows per second (a unit
writes one explanation row and one row per metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, fmt_s, log, run_and_write, table  # noqa: E402

METHODS = ("saliency", "occlusion")
METRICS = ("comprehensiveness", "sufficiency", "token_f1")
PACKAGES = ("torch", "transformers", "ray", "pyarrow")


def _config(examples: int) -> Any:
    from salience.evaluate.config import RunConfig, parse_method_spec, parse_metric_spec

    return RunConfig(model="zoo:minilm-sentiment", dataset="movie-snippets", methods=tuple(map(parse_method_spec, METHODS)),
                     metrics=tuple(map(parse_metric_spec, METRICS)), name=f"bench-{examples}")


class _Clock:
    """Wraps an engine: the time each unit reaches the driver."""

    def __init__(self, engine: Any) -> None:
        from salience.evaluate.runner import local_engine

        self.engine = engine or local_engine
        self.times: list[float] = []

    def __call__(self, *args: Any) -> Any:
        for unit in self.engine(*args):
            self.times.append(time.perf_counter())
            yield unit


def _timed_run(config: Any, examples: int, folder: Path, engine: Any, label: str) -> dict[str, Any]:
    from salience.evaluate.runner import run_evaluation
    from salience.evaluate.store import Store

    clock = _Clock(engine)
    started = time.perf_counter()
    with Store(folder / f"{label}.db") as store:
        outcome = run_evaluation(config, store, limit=examples, progress=False, log=log, engine=clock)
    wall = time.perf_counter() - started
    units = len(clock.times)
    steady = (units - 1) / (clock.times[-1] - clock.times[0]) if units > 1 else float("nan")
    row = {"engine": label, "units": units, "wall": wall, "first": clock.times[0] - started,
           "steady_examples_per_s": steady / len(METHODS), "overall_examples_per_s": outcome.computed / len(METHODS) / wall}
    log(f"{label}: {json.dumps(row)}")
    return row


class _Echo:
    """An actor that returns a stored unit's JSON for every unit of its batch (no model work)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, batch: Any) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"example_id": [], "method": [], "unit": [], "fatal": []}
        for blob, methods in zip(batch["example"], batch["methods"]):
            example = pickle.loads(blob)
            for label in json.loads(methods):
                out["example_id"].append(example.id)
                out["method"].append(label)
                out["unit"].append(self.text)
                out["fatal"].append("")
        return out


def _batch_overhead(ray: Any, examples: list[Any], text: str, batches: int) -> dict[str, float]:
    rows = [{"example": pickle.dumps(examples[i % len(examples)]), "methods": json.dumps(list(METHODS))} for i in range(batches)]
    dataset = ray.data.from_items(rows, override_num_blocks=batches).map_batches(
        _Echo, batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_kwargs={"text": text}, num_cpus=1)
    started = time.perf_counter()
    times = []
    for _ in dataset.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=1):
        times.append(time.perf_counter())
    return {"batches": len(times), "first": times[0] - started, "per_batch": (times[-1] - times[0]) / (len(times) - 1)}


def _writers(db_units: list[Any], folder: Path, repeats: int) -> list[dict[str, Any]]:
    from salience.engines.parquet_output import ParquetRun
    from salience.evaluate.store import Store

    rows_per_unit = 1 + len(METRICS)
    replay = [dataclasses.replace(u, example_id=f"{u.example_id}-{r}") for r in range(repeats) for u in db_units]
    out = []
    with Store(folder / "writer.db") as store:
        store.ensure_run("w", name=None, model="m", dataset="d", config={}, versions={})
        store.acquire("w")
        store.add_examples("w", [(u.example_id, i, "x", None, None) for i, u in enumerate(replay)])
        started = time.perf_counter()
        for unit in replay:
            unit.save(store, "w")
        seconds = time.perf_counter() - started
        store.release("w", "complete")
    out.append({"writer": "SQLite store (one transaction a unit, WAL)", "units": len(replay), "seconds": seconds})
    sink = ParquetRun(str(folder / "parts"), "w")
    started = time.perf_counter()
    for unit in replay:
        sink.add(unit)
    sink.flush()
    out.append({"writer": "Parquet sink (a part every 256 units)", "units": len(replay), "seconds": time.perf_counter() - started})
    for row in out:
        row["units_per_s"] = row["units"] / row["seconds"]
        row["rows_per_s"] = row["units"] * rows_per_unit / row["seconds"]
        log(json.dumps(row))
    return out


def _stored_units(db: Path) -> list[Any]:
    """The units of the (only) run in ``db``, as UnitResults with their metric rows."""
    from salience.evaluate.runner import UnitResult
    from salience.evaluate.store import MetricRow, Store

    with Store(db) as store:
        run_id = store.runs()[0].run_id
        rows = store.explanations(run_id)
        by_unit: dict[tuple[str, str], list[Any]] = {}
        for r in store.results(run_id):
            by_unit.setdefault((r["example_id"], r["method"]), []).append(
                MetricRow(r["metric"], r["value"], r["higher_is_better"], r["details"], r["forward_passes"], r["error"]))
    return [UnitResult(r["example_id"], r["method"], json.loads(r["explanation"]), r["error"], r["seconds"],
                       r["forward_passes"], r["backward_passes"], tuple(by_unit[(r["example_id"], r["method"])])) for r in rows]


def _engine_lines(runs: list[dict[str, Any]], ray_start: float, examples: int) -> tuple[list[str], list[str]]:
    local = [r for r in runs if r["engine"].startswith("local")]
    local_rate = sum(r["steady_examples_per_s"] for r in local) / len(local)
    by_name = {r["engine"]: r for r in runs}
    one, two = by_name["ray, 1 worker(s)"], by_name["ray, 2 worker(s)"]
    lines = ["## Engines", "",
             f"Study: zoo:minilm-sentiment, the first {examples} movie-snippets test sentences, methods "
             f"{', '.join(METHODS)}, metrics {', '.join(METRICS)} ({examples * len(METHODS)} units). "
             f"Ray started once before the Ray runs: `ray.init(num_cpus=2)` took {fmt_s(ray_start)} s (not in the "
             "rows). Start-up = time from the call to the first stored unit (driver loading model and dataset "
             "included; for Ray also the actors' start and model load). Steady = (units - 1) / (last - first "
             "unit), per example (2 units); overall = examples / wall.", "",
             *table(["engine", "wall s", "start-up s (to 1st unit)", "steady examples/s", "overall examples/s",
                     "steady vs local (mean of both local runs)"],
                    [[r["engine"], fmt_s(r["wall"]), fmt_s(r["first"]), f"{r['steady_examples_per_s']:.2f}",
                      f"{r['overall_examples_per_s']:.2f}", f"{r['steady_examples_per_s'] / local_rate:.2f}x"] for r in runs])]
    summary = [f"- steady rate: local {local_rate:.2f} examples/s, Ray 1 worker {one['steady_examples_per_s']:.2f}, "
               f"Ray 2 workers {two['steady_examples_per_s']:.2f} ({two['steady_examples_per_s'] / local_rate:.2f}x local) "
               "on 2 shared cores",
               f"- start-up: Ray instance {fmt_s(ray_start)} s once; to the first unit: local {fmt_s(local[-1]['first'])} s "
               f"(second run; first {fmt_s(local[0]['first'])} s), Ray {fmt_s(one['first'])} s (1 worker) / "
               f"{fmt_s(two['first'])} s (2 workers)"]
    return summary, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--batches", type=int, default=60, help="batches of the overhead measurement")
    parser.add_argument("--writer-repeats", type=int, default=20, help="times the local run's units are replayed")
    parser.add_argument("--parts", nargs="+", default=["engines", "overhead", "writer"],
                        choices=["engines", "overhead", "writer"], help="what to measure (default all)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS-ray.md")
    args = parser.parse_args()

    def body() -> tuple[list[str], list[str]]:
        import ray

        from salience.engines.ray_engine import RayEngine, connect

        config = _config(args.examples)
        folder = Path(tempfile.mkdtemp(prefix="salience-ray-bench-"))
        summary: list[str] = []
        lines: list[str] = []
        runs = [_timed_run(config, args.examples, folder, None, "local")]  # also the units the other parts replay
        units = _stored_units(folder / "local.db")
        if "engines" in args.parts or "overhead" in args.parts:
            started = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray_start = time.perf_counter() - started
            connect(ray, None)  # Ray Data settings (no progress bars); joins the instance just started
        if "engines" in args.parts:
            for workers in (1, 2):
                runs.append(_timed_run(config, args.examples, folder, RayEngine(workers=workers), f"ray, {workers} worker(s)"))
            runs.append(_timed_run(config, args.examples, folder, None, "local (again)"))
            summary, lines = _engine_lines(runs, ray_start, args.examples)
        if "overhead" in args.parts:
            from salience.evaluate.datasets import load_dataset
            from salience.models.loading import load_model

            dataset = load_dataset("movie-snippets", load_model("zoo:minilm-sentiment"), limit=args.examples)
            overhead = _batch_overhead(ray, dataset.examples, units[0].to_json(), args.batches)
            log(f"overhead: {overhead}")
            summary.append(f"- Ray overhead per batch: {overhead['per_batch'] * 1e3:.1f} ms (ray.init: {fmt_s(ray_start)} s)")
            lines += ["", "## Ray's overhead per batch", "",
                      f"One actor returning a stored unit's JSON ({len(units[0].to_json())} characters) for each of the 2 "
                      f"units of a one-example batch, no model work; {overhead['batches']} batches. `ray.init(num_cpus=2)` "
                      f"took {fmt_s(ray_start)} s.", "",
                      *table(["batches", "to 1st batch s (actor start)", "per batch ms"],
                             [[overhead["batches"], fmt_s(overhead["first"]), f"{overhead['per_batch'] * 1e3:.1f}"]])]
        if ray.is_initialized():
            ray.shutdown()
        if "writer" in args.parts:
            writers = _writers(units, folder, args.writer_repeats)
            sizes = [len(u.to_json()) for u in units]
            summary.append(f"- single writer: SQLite {writers[0]['rows_per_s']:.0f} rows/s ({writers[0]['units_per_s']:.0f} "
                           f"units/s); Parquet sink {writers[1]['rows_per_s']:.0f} rows/s ({writers[1]['units_per_s']:.0f} units/s)")
            lines += ["", "## The single writers alone", "",
                      f"The local run's {len(units)} units (JSON {min(sizes)}-{max(sizes)} characters, median "
                      f"{sorted(sizes)[len(sizes) // 2]}) replayed {args.writer_repeats} times under new example ids. "
                      f"A unit is {1 + len(METRICS)} rows (its explanation + {len(METRICS)} metric rows).", "",
                      *table(["writer", "units", "seconds", "units/s", "rows/s"],
                             [[w["writer"], w["units"], fmt_s(w["seconds"]), f"{w['units_per_s']:.0f}", f"{w['rows_per_s']:.0f}"]
                              for w in writers])]
        return summary, lines

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_and_write("The Ray engine: local vs Ray, overhead, the single writer", "ray_engine.py", None, PACKAGES, args.output, body)


if __name__ == "__main__":
    main()
