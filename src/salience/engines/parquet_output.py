"""Results as Parquet partitions (``--results parquet://PATH``) and their import into a database.

Layout under ``PATH`` (a local folder, or any URI pyarrow's filesystems open: ``s3://``, ``gs://``,
``hdfs://``)::

    PATH/run_id=<run id>/run.json                 the run: name, model, dataset, configuration,
                                                  versions and its examples (as the database keeps them)
    PATH/run_id=<run id>/part-<time>-<pid>-<n>.parquet   units: one row per (example, method)

A part file's columns: ``run_id``, ``example_id``, ``method`` (the key) and ``unit``, the unit's
:class:`~salience.evaluate.runner.UnitResult` as JSON (explanation, error, cost, metric rows). The
driver buffers the units that stream in and writes a part every ``flush_units`` units or
``flush_seconds`` seconds and when the run ends or is interrupted; a local part is written under a
temporary name and renamed, so a killed driver leaves whole files only (it loses at most its buffer,
computed again on the next run). Running the same command again skips the units found in the parts
it can read; a unit written twice (two drivers, or parts gathered from several machines) is one row
after the import, which keeps the first copy.

``salience runs import PATH --db DB`` (:func:`import_parquet`) merges every run under ``PATH`` into
the database with the store's writer: the run, its examples, then each unit not already stored.
Importing twice adds nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from salience.evaluate.config import RunConfig
from salience.evaluate.runner import Engine, RunOutcome, UnitResult, consume, local_engine, prepare_run
from salience.evaluate.store import Store, StoreError

SCHEME = "parquet://"
MANIFEST = "run.json"
RUN_PREFIX = "run_id="
SCHEMA = pa.schema([("run_id", pa.string()), ("example_id", pa.string()), ("method", pa.string()), ("unit", pa.large_string())])


class ParquetOutputError(StoreError):
    """A Parquet results folder cannot be read or written."""


def parse_results(value: str) -> str:
    """``parquet://PATH`` -> PATH (``parquet://s3://bucket/x`` -> ``s3://bucket/x``); anything else is an error."""
    if not value.startswith(SCHEME) or not value[len(SCHEME):].strip():
        raise ParquetOutputError(f"--results {value!r}: give parquet://PATH (a folder or an s3://, gs://, hdfs:// URI)")
    return value[len(SCHEME):]


def _filesystem(root: str) -> tuple[Any, str]:
    """pyarrow filesystem and path for ``root`` (a local path or a URI)."""
    if "://" in root:
        try:
            return pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ParquetOutputError(f"cannot open {root}: {error}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


@dataclass
class ParquetRun:
    """The partition of one run under ``root``: its manifest, the units already there, and a buffer
    of new units written out as part files."""

    root: str
    run_id: str
    flush_units: int = 256
    flush_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.fs, base = _filesystem(self.root)
        self.folder = f"{base.rstrip('/')}/{RUN_PREFIX}{self.run_id}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.buffer: list[UnitResult] = []
        self.last_flush = time.monotonic()
        self.parts = 0
        self.fs.create_dir(self.folder, recursive=True)

    def write_manifest(self, record: dict[str, Any], examples: list[tuple[Any, ...]]) -> bool:
        """Write ``run.json`` (the run and its examples; a larger limit rewrites it with more). Returns
        True when the run had none yet."""
        path = f"{self.folder}/{MANIFEST}"
        new = self.fs.get_file_info(path).type == pafs.FileType.NotFound
        rows = [] if new else self.manifest()["examples"]
        known = {row[0] for row in rows}
        rows += [list(e) for e in examples if e[0] not in known]  # a smaller limit later keeps the examples written before
        manifest = {"run_id": self.run_id, **record, "examples": rows}
        self._write(path, json.dumps(manifest, default=str).encode())
        return new

    def manifest(self) -> dict[str, Any]:
        """The run's ``run.json``."""
        path = f"{self.folder}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(path) as stream:
                return dict(json.loads(stream.read()))
        except (OSError, json.JSONDecodeError) as error:
            raise ParquetOutputError(f"run {self.run_id}: cannot read {path}: {error}") from None

    def done_units(self) -> set[tuple[str, str]]:
        """(example_id, method) of every unit in the part files readable here."""
        done: set[tuple[str, str]] = set()
        for path in self.part_paths():
            table = _read_part(path, self.fs, ["example_id", "method"])
            if table is not None:
                done.update(zip(table.column("example_id").to_pylist(), table.column("method").to_pylist()))
        return done

    def part_paths(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith("part-")
                      and i.base_name.endswith(".parquet"))

    def add(self, unit: UnitResult) -> None:
        self.buffer.append(unit)
        if len(self.buffer) >= self.flush_units or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered units as one part file."""
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        units, self.buffer = self.buffer, []
        table = pa.table({"run_id": [self.run_id] * len(units), "example_id": [u.example_id for u in units],
                          "method": [u.method for u in units], "unit": [u.to_json() for u in units]}, schema=SCHEMA)
        self.parts += 1
        name = f"part-{time.time_ns()}-{os.getpid()}-{self.parts}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self._write(f"{self.folder}/{name}", sink.getvalue().to_pybytes())

    def _write(self, path: str, data: bytes) -> None:
        """Whole files only: locally a temporary name renamed into place; object stores write objects whole."""
        target = f"{path}.tmp-{os.getpid()}" if self.local else path
        with self.fs.open_output_stream(target) as stream:
            stream.write(data)
        if self.local:
            os.replace(target, path)


def _read_part(path: str, fs: Any, columns: list[str]) -> pa.Table | None:
    try:
        return pq.read_table(path, filesystem=fs, columns=columns, schema=SCHEMA)
    except (OSError, pa.ArrowInvalid):
        return None


def run_to_parquet(config: RunConfig, root: str, *, limit: int | None = None, batch_size: int | None = None,
                   progress: bool = True, skip_invalid: bool = False, log: Callable[[str], None] = print,
                   engine: Engine | None = None, flush_units: int = 256) -> RunOutcome:
    """Evaluate ``config`` like :func:`~salience.evaluate.runner.run_evaluation`, writing the units to
    Parquet partitions under ``root`` instead of a database; resumes from the parts found there."""
    prepared = prepare_run(config, limit=limit, skip_invalid=skip_invalid, log=log)
    dataset = prepared.dataset
    sink = ParquetRun(root, prepared.run_id, flush_units=flush_units)
    created = sink.write_manifest(prepared.record, prepared.stored_examples())
    outcome = RunOutcome(prepared.run_id, created, dataset, [e.id for e in dataset.examples],
                         [s.label for s in config.methods], [s.label for s in config.metrics])
    done = sink.done_units()
    units = prepared.units()
    pending = [(e, s) for e, s in units if (e.id, s.label) not in done]
    outcome.reused = len(units) - len(pending)
    try:
        results = (engine or local_engine)(config, prepared.model, pending, batch_size)
        outcome.computed = consume(results, sink.add, total=len(units), done=outcome.reused, progress=progress,
                                   label=config.name or prepared.run_id[:12])
    finally:
        sink.flush()  # Ctrl-C included: what was computed is kept
    return outcome


@dataclass(frozen=True)
class ImportOutcome:
    """One run merged by :func:`import_parquet`."""

    run_id: str
    added: int  # units written now
    already: int  # units found in the database (or twice in the parts)
    unreadable: int  # part files that could not be read (left out)
    status: str  # "complete" when every (example, method) unit is stored, else "partial"


def import_parquet(root: str, store: Store, *, log: Callable[[str], None] = print) -> list[ImportOutcome]:
    """Merge every run under ``root`` (see the module's layout) into ``store``; idempotent."""
    fs, base = _filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    folders = sorted(i.base_name[len(RUN_PREFIX):] for i in infos
                     if i.type == pafs.FileType.Directory and i.base_name.startswith(RUN_PREFIX))
    if not folders:
        raise ParquetOutputError(f"no run partitions ({RUN_PREFIX}...) under {root}")
    return [_import_run(ParquetRun(root, run_id), store, log) for run_id in folders]


def _import_run(run: ParquetRun, store: Store, log: Callable[[str], None]) -> ImportOutcome:
    manifest = run.manifest()
    run_id = manifest["run_id"]
    store.ensure_run(run_id, name=manifest["name"], model=manifest["model"], dataset=manifest["dataset"],
                     config=manifest["config"], versions=manifest["versions"])
    note = store.acquire(run_id)
    if note:
        log(note)
    added = already = unreadable = 0
    status = "failed"
    try:
        store.add_examples(run_id, [tuple(e) for e in manifest["examples"]])
        done = store.done_units(run_id)
        for path in run.part_paths():
            table = _read_part(path, run.fs, ["example_id", "method", "unit"])
            if table is None:
                unreadable += 1
                log(f"run {run_id}: left out {path}, which is not a readable Parquet file")
                continue
            for key_e, key_m, text in zip(*(table.column(c).to_pylist() for c in ("example_id", "method", "unit"))):
                if (key_e, key_m) in done:
                    already += 1
                    continue
                UnitResult.from_json(text).save(store, run_id)
                done.add((key_e, key_m))
                added += 1
        expected = len(manifest["examples"]) * len(manifest["config"]["methods"])
        status = "complete" if len(done) >= expected else "partial"
    finally:
        store.release(run_id, status)
    return ImportOutcome(run_id, added, already, unreadable, status)
